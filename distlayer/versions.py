"""The tested version ranges of the libraries whose behaviour decides distlayer's answers,
and the guard that refuses to run outside them.

The ranges are the package's own declared requirements (``pyproject.toml``, or the
installed metadata made from it), so they are written in one place. CI runs the exactness
tests at both ends of each range. pip keeps a normal install inside them; the guard
protects installs that bypass pip's resolver (``--no-deps``, conda, preinstalled
images), where a transformers whose cache API differs can give wrong tokens with exit 0.
"""

from __future__ import annotations

import functools
import importlib.metadata as metadata
import os
import tomllib
import warnings
from dataclasses import dataclass
from pathlib import Path

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import InvalidVersion, Version

from .errors import VersionError

GUARDED = ("transformers", "torch", "ray")
LOCAL = ("transformers", "torch")  # what a process that starts no Ray actor runs on
# Set to 1 to run outside the tested ranges anyway, with a warning.
ALLOW_ENV = "DISTLAYER_ALLOW_UNTESTED"


@dataclass(frozen=True)
class Check:
    """One library against its tested range."""

    name: str
    installed: str | None   # None: not installed
    supported: str          # the specifier, e.g. ">=5.4,<5.26"

    @property
    def ok(self) -> bool:
        if self.installed is None:
            return False
        try:
            return SpecifierSet(self.supported).contains(Version(self.installed), prereleases=True)
        except InvalidVersion:
            return False

    @property
    def fix(self) -> str:
        """The pip command that puts this library in range."""
        return f'pip install "{self.name}{self.supported}"'

    def sentence(self, where: str = "") -> str:
        """What is wrong and what to change, for a check that is not ok."""
        place = f" on {where}" if where else ""
        have = f"{self.name} {self.installed} is installed{place}" if self.installed else \
            f"{self.name} is not installed{place}"
        return (f"{have}, but distlayer is tested with {self.name}{self.supported}: run `{self.fix}`"
                f"{place and ' there'} (or set {ALLOW_ENV}=1 to run anyway, unchecked)")


@functools.cache
def supported() -> dict[str, str]:
    """The declared range of each guarded library, ``{"transformers": ">=5.6,<5.26", ...}``:
    from ``pyproject.toml`` in a source checkout (an editable install's metadata goes stale
    when the file changes), else from the installed package's metadata."""
    pyproject = Path(__file__).parent.parent / "pyproject.toml"
    if pyproject.is_file():
        lines = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    else:
        lines = metadata.requires("distlayer") or []
    out = {}
    for line in lines:
        req = Requirement(line)
        if req.marker is None and req.name in GUARDED:
            out[req.name] = ",".join(sorted(map(str, req.specifier), key=lambda s: not s.startswith(">")))
    return out


def installed() -> dict[str, str | None]:
    """The installed version of each guarded library (None where it is not installed)."""
    out = {}
    for name in GUARDED:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def checks(versions: dict[str, str | None] | None = None, names=GUARDED) -> list[Check]:
    """Each of ``names`` at ``versions`` (default: this process's) against its range."""
    versions = installed() if versions is None else versions
    ranges = supported()
    return [Check(n, versions.get(n), ranges[n]) for n in names if n in ranges]


def guard(versions: dict[str, str | None] | None = None, names=GUARDED, where: str = "") -> None:
    """Refuse to run where a library of ``names`` is outside its tested range.

    Args:
        versions: installed versions to check (default: this process's); a stage on
            another node reports its own.
        names: which libraries matter here (Ray only where stages are Ray actors).
        where: the node the versions were read on, for the message.

    Raises:
        VersionError: naming the installed version, the tested range and the pip command
            that fixes it, unless ``DISTLAYER_ALLOW_UNTESTED=1``, which warns instead.
    """
    bad = [c for c in checks(versions, names) if not c.ok]
    if not bad:
        return
    message = "; ".join(c.sentence(where) for c in bad)
    if os.environ.get(ALLOW_ENV) == "1":
        warnings.warn(f"{message}. Running anyway because {ALLOW_ENV}=1: answers are unchecked.", stacklevel=2)
        return
    raise VersionError(message + ".")
