"""Deciding how the guest gets DCP's Python dependencies (pure).

A dependency comes from a Debian package when bookworm's version satisfies the
project's requirement, and from a wheel otherwise (Debian 12's pydantic is 1.x
and its aiohttp 3.8, but the project needs pydantic 2 and aiohttp >= 3.9).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

# PyPI name -> Debian package where the rule `python3-<name>` does not hold.
DEBIAN_NAMES: Mapping[str, str] = {
    "python-ptrace": "python3-ptrace",
    "libvirt-python": "python3-libvirt",
}

# Dependencies the guest never needs (the agent does not drive libvirt).
GUEST_EXCLUDED: frozenset[str] = frozenset({"libvirt-python"})


@dataclass(frozen=True)
class PythonDepsPlan:
    """Debian packages to include and requirements to install from wheels."""

    debian: tuple[str, ...]
    wheels: tuple[str, ...]


def debian_name(requirement: str) -> str:
    """The Debian package name for a PyPI requirement."""
    name = canonicalize_name(Requirement(requirement).name)
    return DEBIAN_NAMES.get(name, f"python3-{name}")


def debian_upstream_version(version: str) -> Version | None:
    """The upstream part of a Debian version (`1:2.10.1-2+deb12u2` -> 2.10.1)."""
    upstream = version.split(":", 1)[-1].rsplit("-", 1)[0]
    upstream = upstream.split("+")[0].split("~")[0]
    try:
        return Version(upstream)
    except InvalidVersion:
        return None


def plan(requirements: Iterable[str], candidates: Mapping[str, str]) -> PythonDepsPlan:
    """Split requirements into Debian packages and wheels.

    `candidates` maps Debian package names to their candidate versions (what
    `apt-cache policy` reports); a package missing there is taken from a wheel.
    """
    debian: list[str] = []
    wheels: list[str] = []
    for text in requirements:
        req = Requirement(text)
        if canonicalize_name(req.name) in GUEST_EXCLUDED:
            continue
        pkg = debian_name(text)
        version = candidates.get(pkg)
        upstream = debian_upstream_version(version) if version else None
        if upstream is not None and req.specifier.contains(upstream, prereleases=True):
            debian.append(pkg)
        else:
            wheels.append(str(req))
    return PythonDepsPlan(tuple(debian), tuple(wheels))


def parse_apt_policy(text: str) -> dict[str, str]:
    """Candidate versions from `apt-cache policy PKG...` output."""
    out: dict[str, str] = {}
    pkg = ""
    for line in text.splitlines():
        if line and not line[0].isspace() and line.endswith(":"):
            pkg = line[:-1]
        elif line.strip().startswith("Candidate:") and pkg:
            value = line.split(":", 1)[1].strip()
            if value and value != "(none)":
                out[pkg] = value
    return out
