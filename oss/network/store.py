"""The network service's SQL: the address pool, members and listeners of programs.

Every function takes a connection inside the caller's transaction
(`Store.write`/`read`), so an allocation and the rows that use it commit together.
"""

from __future__ import annotations

import ipaddress

from oss.db.store import Conn
from oss.errors import Conflict
from oss.network.plan import Listener, Pin, ProgramNet


class PortTaken(Conflict):
    """The port is already listened on by the program on another instance."""


class PoolExhausted(Conflict):
    """No program address is left in the network prefix."""


def reserved(prefix: ipaddress.IPv4Network) -> set[ipaddress.IPv4Address]:
    """Addresses of `prefix` never given out: network, broadcast and the first host."""
    return {prefix.network_address, prefix.broadcast_address, prefix.network_address + 1}


def allocate(c: Conn, program_id: str, prefix: ipaddress.IPv4Network, now: float) -> str:
    """The program's address, allocated from `prefix` the first time (lowest free)."""
    row = c.execute(
        "SELECT address FROM net_addresses WHERE program_id=?", (program_id,)
    ).fetchone()
    if row is not None:
        return str(row["address"])
    used = {
        ipaddress.IPv4Address(r["address"]) for r in c.execute("SELECT address FROM net_addresses")
    }
    skip = used | reserved(prefix)
    for ip in prefix.hosts():
        if ip not in skip:
            c.execute("INSERT INTO net_addresses VALUES(?,?,?)", (program_id, str(ip), now))
            return str(ip)
    raise PoolExhausted(f"every address of {prefix} is in use")


def address_of(c: Conn, program_id: str) -> str | None:
    """The program's address, if it has one."""
    row = c.execute(
        "SELECT address FROM net_addresses WHERE program_id=?", (program_id,)
    ).fetchone()
    return str(row["address"]) if row else None


def join(c: Conn, program_id: str, instance: str) -> bool:
    """Make `instance` a member; False if it already was."""
    cur = c.execute("INSERT OR IGNORE INTO net_members VALUES(?,?)", (program_id, instance))
    return cur.rowcount > 0


def listen(c: Conn, program_id: str, listener: Listener, now: float) -> None:
    """Record a listener; PortTaken if another instance holds the port."""
    row = c.execute(
        "SELECT instance FROM net_listeners WHERE program_id=? AND proto=? AND port=?",
        (program_id, listener.proto, listener.port),
    ).fetchone()
    if row is not None and row["instance"] != listener.instance:
        raise PortTaken(
            f"port {listener.port} of program {program_id} listens on {row['instance']}",
            port=listener.port,
            instance=row["instance"],
        )
    c.execute(
        "INSERT OR REPLACE INTO net_listeners VALUES(?,?,?,?,?,?,?)",
        (program_id, listener.proto, listener.port, listener.instance, listener.pid,
         listener.bound, now),
    )  # fmt: skip


def unlisten(c: Conn, program_id: str, instance: str, proto: int, port: int) -> bool:
    """Forget the listener of `instance` on port; False if there was none."""
    cur = c.execute(
        "DELETE FROM net_listeners WHERE program_id=? AND proto=? AND port=? AND instance=?",
        (program_id, proto, port, instance),
    )
    return cur.rowcount > 0


def move(c: Conn, net: ProgramNet) -> None:
    """Store `net`'s members and listeners' instances (after a migration)."""
    for m in net.members:
        join(c, net.program, m)
    for x in net.listeners:
        c.execute(
            "UPDATE net_listeners SET instance=? WHERE program_id=? AND proto=? AND port=?",
            (x.instance, net.program, x.proto, x.port),
        )


def program_net(c: Conn, program_id: str) -> ProgramNet | None:
    """The program's address, members and listeners (None: it has no address)."""
    address = address_of(c, program_id)
    if address is None:
        return None
    members = tuple(
        r["instance"]
        for r in c.execute(
            "SELECT instance FROM net_members WHERE program_id=? ORDER BY instance", (program_id,)
        )
    )
    listeners = tuple(
        Listener(r["instance"], r["port"], r["bound"], r["proto"], r["pid"])
        for r in c.execute(
            "SELECT * FROM net_listeners WHERE program_id=? ORDER BY proto, port", (program_id,)
        )
    )
    pinned = tuple(
        Pin(r["instance"], r["port"], r["proto"])
        for r in c.execute("SELECT * FROM net_pins WHERE program_id=? ORDER BY seq", (program_id,))
    )
    return ProgramNet(program_id, address, members, listeners, pinned)


def set_pins(c: Conn, program_id: str, pinned: tuple[Pin, ...]) -> None:
    """The ports pinned by moves of the program's processes (replacing what was)."""
    c.execute("DELETE FROM net_pins WHERE program_id=?", (program_id,))
    c.executemany(
        "INSERT INTO net_pins VALUES(?,?,?,?,?)",
        [(program_id, i, x.instance, x.port, x.proto) for i, x in enumerate(pinned)],
    )


def programs(c: Conn) -> list[str]:
    """Every program holding an address."""
    return [r["program_id"] for r in c.execute("SELECT program_id FROM net_addresses")]


def release(c: Conn, program_id: str) -> None:
    """Free the program's address, members and listeners."""
    for table in ("net_listeners", "net_members", "net_addresses", "net_pins"):
        c.execute(f"DELETE FROM {table} WHERE program_id=?", (program_id,))
