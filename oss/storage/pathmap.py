"""Path-prefix remapping for the storage service (pure: no I/O but a readlink callable).

A `PathMap` maps virtual prefixes (what the program sees, e.g. /data) to real
ones (where the bytes live, e.g. /srv/dcp/data).  `resolve` turns a path a
program passed to a syscall into the real path the kernel must use, resolving
relative paths against the caller's (virtual) directory and `..` as the kernel
would: a symlink met just before `..` is followed first.
"""

from __future__ import annotations

import posixpath
from collections.abc import Callable, Mapping

ReadLink = Callable[[bytes], bytes | None]
MAX_LINKS = 40  # the kernel's ELOOP limit


class PathMapError(ValueError):
    """A mapping is invalid."""


def _components(path: bytes) -> list[bytes]:
    return [c for c in path.split(b"/") if c and c != b"."]


def _walk(stack: list[bytes], path: bytes) -> list[bytes]:
    """Lexically apply `path`'s components (with `..`) to a directory stack."""
    out = list(stack)
    for comp in _components(path):
        if comp == b"..":
            if out:
                out.pop()
        else:
            out.append(comp)
    return out


def _norm(path: str) -> bytes:
    if not path.startswith("/"):
        raise PathMapError(f"not an absolute path: {path!r}")
    return posixpath.normpath(path).encode().replace(b"//", b"/")


class PathMap:
    """Virtual -> real path prefixes, longest prefix first."""

    def __init__(self, mapping: Mapping[str, str]) -> None:
        pairs = [(_norm(v), _norm(r)) for v, r in mapping.items()]
        self.pairs = sorted(pairs, key=lambda p: -len(p[0]))
        self.reverse = sorted(((r, v) for v, r in pairs), key=lambda p: -len(p[0]))

    def __bool__(self) -> bool:
        return bool(self.pairs)

    @staticmethod
    def _swap(path: bytes, pairs: list[tuple[bytes, bytes]]) -> bytes | None:
        for src, dst in pairs:
            if src == b"/":
                rest = b"" if path == b"/" else path
            elif path == src or path.startswith(src + b"/"):
                rest = path[len(src) :]
            else:
                continue
            return ((b"" if dst == b"/" else dst) + rest) or b"/"
        return None

    def to_real(self, virtual: bytes) -> bytes | None:
        """The real path of a normalized absolute virtual path, or None if unmapped."""
        return self._swap(virtual, self.pairs)

    def to_virtual(self, real: bytes) -> bytes:
        """The virtual path a program should see for a real absolute path."""
        return self._swap(real, self.reverse) or real

    def resolve(
        self, path: bytes, base: bytes | None, readlink: ReadLink, follow: bool = True
    ) -> bytes | None:
        """The real path to pass to the kernel instead of `path`, or None to keep it.

        `base` is the real directory a relative path is resolved against (the
        cwd or the dirfd's path); None when unknown (the path is then kept).
        As under a bind mount, the walk happens in the program's (virtual)
        namespace: every symlink on the way is followed by its stored target
        read as a virtual path (the last component only when `follow`), so a
        link to `/mnt/v/a` reaches the mapped file and `..` climbs out of a
        mapped directory to its virtual parent.  Paths that name nothing
        mapped, lexically, are left to the kernel; so is whatever lies under
        /proc (its magic links are the caller's, not the tracer's).
        """
        if not path:
            return None
        if path.startswith(b"/"):
            stack: list[bytes] = []
        else:
            if base is None:
                return None
            vbase = self.to_virtual(base)
            stack = _components(vbase)
            if vbase != base:  # a mapped directory: always answered in the view
                return self._walk_links(stack, path, readlink, follow, touched=True)
        if self.to_real(b"/") is None and not self._touches(stack, path):
            return None
        return self._walk_links(stack, path, readlink, follow)

    def _touches(self, stack: list[bytes], path: bytes) -> bool:
        """Does some prefix of the lexical walk name a mapped path (or is `..` in it)?"""
        here = list(stack)
        for comp in _components(path):
            if comp == b"..":
                return True  # climbing may pass a symlink: walk it for real
            here.append(comp)
            if self.to_real(b"/" + b"/".join(here)) is not None:
                return True
        return False

    def _walk_links(
        self,
        stack: list[bytes],
        path: bytes,
        readlink: ReadLink,
        follow: bool,
        touched: bool = False,
    ) -> bytes | None:
        queue = _components(path)
        touched = touched or self.to_real(b"/" + b"/".join(stack)) is not None
        follow = follow or path.endswith(b"/")  # a trailing slash resolves the last link
        links = 0
        while queue:
            comp = queue.pop(0)
            if comp == b"..":
                if stack:
                    stack.pop()
                continue
            stack.append(comp)
            virtual = b"/" + b"/".join(stack)
            real = self.to_real(virtual)
            touched = touched or real is not None
            if stack[0] == b"proc" or (not queue and not follow) or links >= MAX_LINKS:
                continue  # past MAX_LINKS the kernel's ELOOP is left to the kernel
            target = readlink(real or virtual)
            if target is None:
                continue
            links += 1
            stack.pop()
            if target.startswith(b"/"):
                stack = []
            queue[:0] = _components(target)
        if not touched:
            return None
        virtual = b"/" + b"/".join(stack)
        real = self.to_real(virtual) or virtual
        if path.endswith(b"/") and not real.endswith(b"/"):
            real += b"/"
        return real


def parse_mapping(spec: str) -> tuple[str, str]:
    """Parse one `--map SRC=DST` (both absolute paths)."""
    src, sep, dst = spec.partition("=")
    if not sep or not src.startswith("/") or not dst.startswith("/"):
        raise PathMapError(f"--map expects SRC=DST with absolute paths, got {spec!r}")
    return src, dst
