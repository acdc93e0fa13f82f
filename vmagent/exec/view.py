"""What a program sees, as a value that travels with its processes (pure codec).

A `View` is submitted with the program (`ProgramSubmit.view`, from `--map` and a
config file's `[map]`), stored by the OSS, and follows every placed process: the
deputy carries it in its argv (`--view HEX`, not secret) and in HELLO (`view`);
the agent hands it to the instance tracer, which maps paths as the home one does.

It is trusted only through the exec ticket: the OSS MACs the digest of the view
it stored, and the program id, into each ticket (`vmagent.exec.tickets`); the
agent refuses a HELLO whose view has another digest or names another program
(`checked`).  A process therefore cannot widen its maps or claim another
program's view.  The digest is `oss.compute.exectickets.view_digest`, the one
definition both sides use.

The encoding is a `protocol.pairs` record (the deputy's codec: no json), with the
maps as a record of (virtual, real) records in a canonical order, so equal views
encode, and hash, the same.
"""

from dataclasses import dataclass, field

from oss.compute.exectickets import NO_PROGRAM, view_digest
from vmagent.errors import AuthError, BadRequest
from vmagent.exec import protocol as P

METERING = ("exec", "full")
MAX_VIEW = 1 << 16  # bytes of an encoded view a peer may send
MAX_MAPS = 256


class BadView(BadRequest):
    """The view is malformed."""


@dataclass(frozen=True, slots=True)
class View:
    """The program's view of the system: path maps and how it is placed and metered."""

    program: str = ""  # the OSS program id ("" before the OSS knows it)
    maps: tuple[tuple[str, str], ...] = ()  # (virtual prefix, real directory), sorted
    placement: str = "spread"
    metering: str = "exec"  # "full": every syscall is intercepted and counted
    home: str = ""  # where the program's root process runs (a host name)
    extra: tuple[tuple[str, str], ...] = field(default=(), repr=False)  # later issues' fields

    def __post_init__(self) -> None:
        if self.metering not in METERING:
            raise BadView(f"view metering must be one of {', '.join(METERING)}")
        if len(self.maps) > MAX_MAPS:
            raise BadView(f"a view has at most {MAX_MAPS} maps")
        for virtual, real in self.maps:
            if not virtual.startswith("/") or not real.startswith("/"):
                raise BadView("a view's maps take absolute paths")
            if "\0" in virtual or "\0" in real:
                raise BadView("a view's map has a NUL byte")
        object.__setattr__(self, "maps", tuple(sorted(self.maps)))

    @classmethod
    def of(
        cls, program: str, maps: dict[str, str], placement: str = "spread", home: str = ""
    ) -> "View":
        """A view from a `--map` mapping (virtual -> real)."""
        return cls(program, tuple(maps.items()), placement, "exec", home)

    def mapping(self) -> dict[str, str]:
        """The maps as `PathMap` takes them (virtual -> real)."""
        return dict(self.maps)

    def real(self, path: bytes) -> bytes:
        """The real path of an absolute path the program sees (itself when unmapped).

        A deputy runs under its view's tracer, so the cwd and descriptor paths it
        reads (`getcwd`, `/proc/self/fd`) are virtual; the agent sets the placed
        process up with their real paths before its tracer maps them back.
        """
        if not self.maps or not path.startswith(b"/"):
            return path
        from oss.storage.pathmap import PathMap  # only for views that map something

        return PathMap(self.mapping()).to_real(path) or path

    def encode(self) -> bytes:
        """The canonical record of this view."""
        maps = P.record([P.record([v.encode(), r.encode()]) for v, r in self.maps])
        fields = {
            b"program": self.program.encode(),
            b"maps": maps,
            b"placement": self.placement.encode(),
            b"metering": self.metering.encode(),
            b"home": self.home.encode(),
        }
        for key, value in self.extra:
            fields[key.encode()] = value.encode()
        return P.unpairs(fields)

    def digest(self) -> str:
        """What exec tickets bind (32 hex digits; the program is bound on its own)."""
        return view_digest(self.maps, self.placement, self.metering, self.home, self.extra)

    def hex(self) -> str:
        """The encoding as hex (the deputy's `--view` argument; bytes.fromhex needs no import)."""
        return self.encode().hex()


def decode(data: bytes) -> View:
    """The view of an encoding; BadView if malformed."""
    if len(data) > MAX_VIEW:
        raise BadView(f"a view is at most {MAX_VIEW} bytes")
    try:
        fields = P.pairs(data)
        maps = []
        for item in P.unrecord(fields.get(b"maps", b"")):
            pair = P.unrecord(item)
            if len(pair) != 2:
                raise BadView("a view's map is not a (virtual, real) pair")
            maps.append((pair[0].decode(), pair[1].decode()))
        known = {b"program", b"maps", b"placement", b"metering", b"home"}
        extra = tuple(sorted((k.decode(), v.decode()) for k, v in fields.items() if k not in known))
        return View(
            fields.get(b"program", b"").decode(),
            tuple(maps),
            fields.get(b"placement", b"spread").decode(),
            fields.get(b"metering", b"exec").decode(),
            fields.get(b"home", b"").decode(),
            extra,
        )
    except (P.FrameError, UnicodeDecodeError) as exc:
        raise BadView(f"malformed view: {exc}") from exc


def from_hex(text: str) -> View:
    """The view of a `--view` argument; BadView if malformed."""
    try:
        data = bytes.fromhex(text)
    except ValueError as exc:
        raise BadView("a view argument is not hex") from exc
    return decode(data)


EMPTY = View()


def checked(raw: bytes, program: str, digest: str) -> View:
    """The view a HELLO carries (`raw`, empty: none), if the ticket vouches for it.

    AuthError unless its digest is the ticket's `digest` and its program the
    ticket's `program` (`-`: a ticket of a run the OSS does not know).
    """
    found = decode(raw) if raw else View("" if program == NO_PROGRAM else program)
    if found.digest() != digest:
        raise AuthError("the view does not match the exec ticket (a view cannot be widened)")
    if program != NO_PROGRAM and found.program != program:
        raise AuthError("the view names another program than the exec ticket")
    return found
