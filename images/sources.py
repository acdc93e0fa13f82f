"""Reading the machine's apt sources (pure parsing; the caller reads the files).

The guest image is bootstrapped from the same mirrors the host uses, so no
registry host name ever appears in the repository.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class AptSource:
    """One `deb` source: a URI, a suite and its components."""

    uri: str
    suite: str
    components: tuple[str, ...]

    def line(self) -> str:
        """The one-line form mmdebstrap accepts as a mirror argument."""
        return f"deb {self.uri} {self.suite} {' '.join(self.components)}"


def parse_one_line(text: str) -> list[AptSource]:
    """Parse a classic sources.list file (`deb [opts] URI SUITE COMP...`)."""
    out: list[AptSource] = []
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        words = line.split()
        if words[0] != "deb":
            continue
        words = words[1:]
        if words and words[0].startswith("["):
            # Options may span several words: `[arch=amd64 signed-by=...]`.
            while words and not words[0].endswith("]"):
                words = words[1:]
            words = words[1:]
        if len(words) < 2:
            continue
        out.append(AptSource(words[0], words[1], tuple(words[2:])))
    return out


def parse_deb822(text: str) -> list[AptSource]:
    """Parse a deb822 `.sources` file (stanzas of `Key: value` lines)."""
    out: list[AptSource] = []
    for stanza in _stanzas(text):
        if stanza.get("enabled", "yes").lower() == "no":
            continue
        if "deb" not in stanza.get("types", "").split():
            continue
        comps = tuple(stanza.get("components", "").split())
        for uri in stanza.get("uris", "").split():
            for suite in stanza.get("suites", "").split():
                out.append(AptSource(uri, suite, comps))
    return out


def _stanzas(text: str) -> Iterable[dict[str, str]]:
    current: dict[str, str] = {}
    key = ""
    for raw in text.splitlines() + [""]:
        if raw.startswith("#"):
            continue
        if not raw.strip():
            if current:
                yield current
            current, key = {}, ""
            continue
        if raw[0] in " \t" and key:
            current[key] += " " + raw.strip()
            continue
        if ":" in raw:
            key, value = raw.split(":", 1)
            key = key.strip().lower()
            current[key] = value.strip()


def mirrors_for(sources: Iterable[AptSource], suite: str) -> list[AptSource]:
    """The sources that serve `suite` itself or its -updates/-security pockets.

    Third-party repositories (other suites) are left out: the guest gets Debian only.
    """
    wanted = {suite, f"{suite}-updates", f"{suite}-security"}
    seen: set[AptSource] = set()
    out: list[AptSource] = []
    for src in sources:
        if src.suite in wanted and src not in seen:
            seen.add(src)
            out.append(src)
    # The main suite first: mmdebstrap takes the first mirror's suite as the target.
    out.sort(key=lambda s: s.suite != suite)
    return out
