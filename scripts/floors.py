"""Print pip constraints that pin every core dependency of distlayer to its declared
lowest version (``pyproject.toml``'s ``name>=X`` becomes ``name==X``), for the floor
test environment (scripts/floor.sh). The floors are written only in pyproject.toml."""

import re
import sys
import tomllib
from pathlib import Path

project = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())["project"]
for line in project["dependencies"]:
    m = re.match(r"^([A-Za-z0-9_.-]+)(\[[^\]]*\])?\s*(.*)$", line)
    name, spec = m.group(1), m.group(3)
    low = re.search(r">=\s*([^,;\s]+)", spec)
    if not low:
        sys.exit(f"pyproject.toml: {line!r} declares no lowest version (name>=X): add one, CI tests it")
    print(f"{name}=={low.group(1)}")
