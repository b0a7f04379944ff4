"""Print pip constraints that pin every dependency of distlayer, the optional ones
included, to its declared lowest version (``pyproject.toml``'s ``name>=X`` becomes
``name==X``), for the floor test environment (scripts/floor.sh). The floors are written
only in pyproject.toml."""

import re
import sys
import tomllib
from pathlib import Path

project = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())["project"]
floors = {}
for line in project["dependencies"] + [d for extra in project["optional-dependencies"].values() for d in extra]:
    m = re.match(r"^([A-Za-z0-9_.-]+)(\[[^\]]*\])?\s*(.*)$", line)
    name, spec = m.group(1), m.group(3)
    low = re.search(r">=\s*([^,;\s]+)", spec)
    if not low:
        sys.exit(f"pyproject.toml: {line!r} declares no lowest version (name>=X): add one, CI tests it")
    if floors.get(name, low.group(1)) != low.group(1):
        sys.exit(f"pyproject.toml: {name} has two floors ({floors[name]} and {low.group(1)}): declare one")
    floors[name] = low.group(1)
print("\n".join(f"{name}=={low}" for name, low in floors.items()))
