"""The instance tracer's watch of listening sockets (issue 13): the OSS steers their ports.

Only under `--instances`/`--oss` (instance tracers): `listen`, `bind` and
`close` join the calls T intercepts.  At the exit of a successful `listen(fd)`
T reads the socket's local address and port from /proc/PID/net/tcp{,6} (the
socket's inode names it); at the exit of a successful `bind(fd)` of a UDP
socket to a port the program named (not 0: an ephemeral port is its
instance's already) from /proc/PID/net/udp{,6}.  Either way T asks the agent,
which asks the OSS, to steer the program's address and that port here
(`op=listen`); T holds the call until the answer (at most `ASK_TIMEOUT`), so
once `listen` (a UDP `bind`) returns the port is reachable from
the program's other instances and from outside.  When the OSS answers that
another instance of the program listens on that port, `listen` fails with
EADDRINUSE, as a second listener on one machine would.

A `close` of a descriptor naming a watched socket (checked by its inode, one
readlink, only while some socket is watched) is observed: when the socket is
gone from /proc/net (its last descriptor closed, in any process) T tells the
agent `op=unlisten`; the exit of a process checks every watched socket too.

A UDP socket has no `listen`: its bind is when it starts to receive.

IPv6 loopback: the program's instances share no IPv6 network, so `connect` to
`[::1]:port` with nothing on that port here is run as a connect to
`[::ffff:127.0.0.1]:port` (the same socket, through the IPv4 stack), which the
instance's NAT steers to the listener on another instance like 127.0.0.1.

Records: T -> agent `op=listen req pid port proto local`, `op=unlisten pid
port proto`; agent -> T `op=netack req address` or `op=netrefused req errno`.

AF_UNIX path sockets (`vmagent.trace.unixsock`): a bind is told and watched
like a listener (its end too); a connect to a path no socket of this network
namespace is bound to may be relayed to the instance that holds it; a
`sendmsg` with descriptors on a relayed socket fails with EOPNOTSUPP.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from tracer.coordinator import Allow, Complete, Decision, Rewrite, SyscallCall
from tracer.ptraceio import read_memory
from vmagent.trace import channel
from vmagent.trace import unixsock as U

log = logging.getLogger(__name__)

NET_CALLS = frozenset({"listen", "bind", "connect", "close"})
# Checked for descriptors sent on a relayed AF_UNIX socket (`unixsock`): one stop per
# call, so only where a relay can exist (`trap_relayed`).
RELAY_CALLS = frozenset({"sendmsg", "sendmmsg"})
_relays = [True]
IN6_LOOPBACK = bytes(15) + b"\x01"
IN6_MAPPED_LOOPBACK = bytes(10) + b"\xff\xff" + bytes((127, 0, 0, 1))
SOCKADDR_IN6 = 28
ASK_TIMEOUT = 2.0  # s T holds a listen for the agent's answer
OP_LISTEN = b"listen"
OP_UNLISTEN = b"unlisten"
OP_NETACK = b"netack"
OP_NETREFUSED = b"netrefused"
TCP_LISTEN = "0A"
ANSWERS = frozenset({OP_NETACK, OP_NETREFUSED, U.OP_UNIXRELAY})  # the agent's, to T's asks


def trap_relayed(on: bool) -> None:
    """Whether instance tracers of this process (and the zygote it forks) stop at
    `sendmsg`/`sendmmsg`: off for an agent whose instances share its kernel (a `dcptrace` run's
    own OSS, `unix:PATH`) or that has no OSS (no relay then).  Before any tracing."""
    _relays[0] = on


def net_calls() -> frozenset[str]:
    """The calls the listener watch intercepts."""
    return NET_CALLS | RELAY_CALLS if _relays[0] else NET_CALLS


@dataclass(frozen=True, slots=True)
class Socket:
    """A watched listening socket."""

    inode: int
    pid: int
    port: int
    local: str
    proto: str = "tcp"


def fd_inode(pid: int, fd: int) -> int:
    """The socket inode behind descriptor `fd` of `pid` (0: not a socket, or gone)."""
    try:
        link = os.readlink(f"/proc/{pid}/fd/{fd}")
    except OSError:
        return 0
    if link.startswith("socket:[") and link.endswith("]"):
        return int(link[8:-1])
    return 0


def _ipv4(hexaddr: str) -> str:
    return socket.inet_ntop(socket.AF_INET, bytes.fromhex(hexaddr)[::-1])


def _ipv6(hexaddr: str) -> str:
    raw = bytes.fromhex(hexaddr)
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4))
    return socket.inet_ntop(socket.AF_INET6, words)


def _socket_row(pid: int, inode: int, names: tuple[str, ...]) -> tuple[str, str, int] | None:
    """(state, local address, port) of socket `inode` in /proc/PID/net/NAME for NAME in
    `names` (tcp, tcp6, udp, udp6)."""
    for name in names:
        decode = _ipv6 if name.endswith("6") else _ipv4
        try:
            with open(f"/proc/{pid}/net/{name}") as f:
                next(f, None)
                for line in f:
                    cols = line.split()
                    if len(cols) > 9 and cols[9] == str(inode):
                        host, _, port = cols[1].partition(":")
                        return cols[3], decode(host), int(port, 16)
        except (OSError, ValueError):
            continue
    return None


def listening(pid: int, inode: int) -> tuple[str, int] | None:
    """(local address, port) of the listening TCP socket `inode` in `pid`'s namespace."""
    row = _socket_row(pid, inode, ("tcp", "tcp6"))
    if row is None or row[0] != TCP_LISTEN:
        return None
    return row[1], row[2]


def datagram(pid: int, inode: int) -> tuple[str, int] | None:
    """(local address, port) of the UDP socket `inode` in `pid`'s namespace."""
    row = _socket_row(pid, inode, ("udp", "udp6"))
    return None if row is None else (row[1], row[2])


def bind_port(pid: int, addr: int, size: int) -> int:
    """The port a `bind(fd, addr, size)` of `pid` named (0: none, or not AF_INET/INET6)."""
    head = read_memory(pid, addr, min(size, 4)) if size >= 4 else b""
    if len(head) < 4 or int.from_bytes(head[:2], "little") not in (
        socket.AF_INET, socket.AF_INET6):  # fmt: skip
        return 0
    return int.from_bytes(head[2:4], "big")


def port_used(pid: int, port: int) -> bool:
    """Whether a TCP socket listens, or a UDP socket is bound, on `port` in `pid`'s
    namespace (any address, IPv4 or IPv6)."""
    for name in ("tcp", "tcp6", "udp", "udp6"):
        try:
            with open(f"/proc/{pid}/net/{name}") as f:
                next(f, None)
                for line in f:
                    cols = line.split()
                    if len(cols) < 4 or int(cols[1].rpartition(":")[2], 16) != port:
                        continue
                    if name.startswith("udp") or cols[3] == TCP_LISTEN:
                        return True
        except (OSError, ValueError):
            continue
    return False


def loopback6(call: SyscallCall) -> Rewrite | None:
    """A connect to [::1]:port with nothing on that port here, run as one to
    [::ffff:127.0.0.1]:port (None: any other connect, left as it is)."""
    size = call.args[2] & 0xFFFFFFFF
    if size < 24:
        return None
    raw = read_memory(call.tid, call.args[1], min(size, SOCKADDR_IN6))
    if len(raw) < 24 or int.from_bytes(raw[:2], "little") != socket.AF_INET6:
        return None
    port = int.from_bytes(raw[2:4], "big")
    if raw[8:24] != IN6_LOOPBACK or port == 0 or port_used(call.pid, port):
        return None
    mapped = raw[:8] + IN6_MAPPED_LOOPBACK + bytes(len(raw) - 24)  # scope id 0
    return Rewrite({1: mapped, 2: len(mapped)})


def alive(inode: int, where: int) -> bool:
    """Whether socket `inode` still exists (any state) in the namespace of `where`."""
    needle = f" {inode} "
    for name in ("tcp", "tcp6", "udp", "udp6"):
        try:
            with open(f"/proc/{where}/net/{name}") as f:
                if needle in f.read():
                    return True
        except OSError:
            continue
    return False


def holders(inodes: set[int], pids: Iterable[int]) -> dict[int, int]:
    """inode -> a process among `pids` that has a descriptor on it."""
    out: dict[int, int] = {}
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            inode = fd_inode(pid, int(fd))
            if inode in inodes:
                out.setdefault(inode, pid)
    return out


def tgid(tid: int) -> int | None:
    """The process (thread group) thread `tid` belongs to (None: gone)."""
    try:
        with open(f"/proc/{tid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"Tgid:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def listen_record(req: int, s: Socket) -> bytes:
    """T -> agent: steer the program's address, port `s.port` here (T waits)."""
    return channel.encode(
        OP_LISTEN, req=f"n{req}", pid=s.pid, port=s.port, proto=s.proto, local=s.local
    )


def unlisten_record(s: Socket) -> bytes:
    """T -> agent: the listener on `s.port` closed (fire and forget)."""
    return channel.encode(OP_UNLISTEN, pid=s.pid, port=s.port, proto=s.proto)


class ChannelRequest:
    """Send a record on T's channel and wait for the answer with the same `req` (bounded)."""

    def __init__(
        self,
        chan: Callable[[], socket.socket | None],
        timeout: float = ASK_TIMEOUT,
        keep: Callable[[bytes], None] = lambda _data: None,
    ) -> None:
        self._chan = chan
        self.timeout = timeout
        self._keep = keep  # a command that arrived meanwhile (op=detach), for the runner

    def __call__(self, message: bytes, req: bytes) -> channel.Record | None:
        """The answer, or None (no agent, no answer in time)."""
        chan = self._chan()
        if chan is None:
            return None
        try:
            return channel.exchange(chan, message, req, self.timeout, self._keep, ANSWERS)
        except (OSError, channel.ChannelError) as exc:
            log.debug("listener report: %s", exc)
        return None


class Listeners:
    """Watches `listen`/`close` of one instance tracer's processes."""

    def __init__(
        self,
        ask: Callable[[bytes, bytes], channel.Record | None],
        tell: Callable[[bytes], None],
        ask_long: Callable[[bytes, bytes], channel.Record | None] | None = None,
    ) -> None:
        self._ask = ask
        self._ask_long = ask_long or ask  # a relay's set-up (the OSS, another agent)
        self._tell = tell
        self._req = 0
        self.watched: dict[int, Socket] = {}  # inode -> socket
        self._closing: dict[int, int] = {}  # tid -> inode of the descriptor it closes
        self.address = ""  # the program's address, once the OSS said it

    def on_syscall(self, call: SyscallCall) -> Decision:
        """Observe a listen's or a bind's result; a close of a watched socket's
        descriptor."""
        if call.name in ("listen", "bind"):
            return Allow(observe_result=True)
        if call.name == "connect":
            return loopback6(call) or self._unix_connect(call)
        if call.name in RELAY_CALLS:
            fd = call.args[0] & 0xFFFFFFFF
            carries = (
                U.sends_descriptors(call.tid, call.args[1])
                if call.name == "sendmsg"
                else U.any_sends_descriptors(call.tid, call.args[1], call.args[2] & 0xFFFFFFFF)
            )
            if carries and U.relayed(call.pid, fd):
                return Complete(-errno.EOPNOTSUPP)  # a descriptor cannot cross kernels
            return Allow()
        if not self.watched:
            return Allow()
        inode = fd_inode(call.pid, call.args[0] & 0xFFFFFFFF)
        if inode in self.watched:
            self._closing[call.tid] = inode
            return Allow(observe_result=True)
        return Allow()

    def on_result(self, call: SyscallCall, result: int) -> Complete | None:
        """Report a new listener (EADDRINUSE if the program listens there elsewhere)
        or a closed one."""
        if call.name == "close":
            inode = self._closing.pop(call.tid, 0)
            s = self.watched.get(inode)
            if s is not None and not (
                U.alive(call.pid, inode) if s.proto == "unix" else alive(inode, call.pid)
            ):
                self._gone(inode)
            return None
        if result != 0 or call.name not in ("listen", "bind"):
            return None
        inode = fd_inode(call.pid, call.args[0] & 0xFFFFFFFF)
        if not inode or inode in self.watched:
            return None  # not a socket; listen again on the same socket (a backlog change)
        if call.name == "bind":
            named = U.sockaddr_path(call.tid, call.args[1], call.args[2] & 0xFFFFFFFF)
            if named is not None:
                return self._unix_bound(call.pid, inode, named)
            # Only UDP: a TCP socket is steered when it listens.  Port 0 asked the
            # kernel for an ephemeral one: in this instance's block, routed here already.
            if bind_port(call.tid, call.args[1], call.args[2] & 0xFFFFFFFF) == 0:
                return None
            found, proto = datagram(call.pid, inode), "udp"
        else:
            found, proto = listening(call.pid, inode), "tcp"
        if found is None:
            return None  # not TCP (unix) at listen, not UDP at bind: nothing to steer
        local, port = found
        return self._steer(Socket(inode, call.pid, port, local, proto))

    def _steer(self, s: Socket) -> Complete | None:
        """Ask for socket `s`'s port here; EADDRINUSE when another instance holds it."""
        self._req += 1
        req = f"n{self._req}".encode()
        answer = self._ask(listen_record(self._req, s), req)
        if answer is not None and answer.get(b"op") == OP_NETREFUSED:
            try:
                err = int(answer.get(b"errno", b"98"))
            except ValueError:
                err = errno.EADDRINUSE
            return Complete(-err)
        if answer is not None:
            self.address = answer.get(b"address", b"").decode(errors="replace")
        self.watched[s.inode] = s
        return None

    def exited(self, pid: int, others: Iterable[int]) -> None:
        """Process `pid` is exiting (its descriptors still open): a socket of it that no
        other process of the session (`others`) holds is gone."""
        mine = [i for i, s in self.watched.items() if s.pid == pid]
        if not mine:
            return
        # Only other processes count: the exiting process's own threads share its
        # descriptor table and may still show it while they are being torn down.
        held = holders(set(mine), [p for p in others if p != pid and tgid(p) != pid])
        for inode in mine:
            if inode in held:
                s = self.watched[inode]
                self.watched[inode] = Socket(inode, held[inode], s.port, s.local, s.proto)
            else:
                self._gone(inode)

    def _gone(self, inode: int) -> None:
        s = self.watched.pop(inode)
        self._tell(U.gone_record(s.pid, s.local) if s.proto == "unix" else unlisten_record(s))

    def _unix_bound(self, pid: int, inode: int, named: bytes) -> Complete | None:
        """Tell the agent of a path socket bound here (EADDRINUSE: bound on another
        instance of the program)."""
        path = U.absolute(pid, named)
        file = U.socket_file(pid, path) if path is not None else None
        if path is None or file is None:
            return None
        self._req += 1
        record = U.bind_record(self._req, pid, path, U.kind_of(pid, inode), file)
        answer = self._ask(record, f"u{self._req}".encode())
        if answer is not None and answer.get(b"op") == OP_NETREFUSED:
            return Complete(-_errno(answer, errno.EADDRINUSE))
        self.watched[inode] = Socket(inode, pid, 0, path, "unix")
        return None

    def _unix_connect(self, call: SyscallCall) -> Decision:
        """A connect to a path bound on no socket of this network namespace: through
        the agent's relay when another kernel's instance of the program holds it."""
        named = U.sockaddr_path(call.tid, call.args[1], call.args[2] & 0xFFFFFFFF)
        if named is None:
            return Allow()
        path = U.absolute(call.pid, named)
        if path is None or U.bound_here(call.pid, path, named):
            return Allow()
        kind = U.kind_of(call.pid, fd_inode(call.pid, call.args[0] & 0xFFFFFFFF))
        self._req += 1
        req = f"u{self._req}".encode()
        answer = self._ask_long(U.connect_record(self._req, call.pid, path, kind), req)
        if answer is None:
            return Allow()
        if answer.get(b"op") == OP_NETREFUSED:
            return Complete(-_errno(answer, errno.ECONNREFUSED))
        name = answer.get(b"name", b"")
        if answer.get(b"op") != U.OP_UNIXRELAY or not name.isalnum() or len(name) > 64:
            return Allow()
        address = U.relay_address(name)
        return Rewrite({1: address, 2: len(address)})


def _errno(answer: channel.Record, default: int) -> int:
    """The errno of an `op=netrefused` answer."""
    try:
        return int(answer.get(b"errno", str(default).encode()))
    except ValueError:
        return default
