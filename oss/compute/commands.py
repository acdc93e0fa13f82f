"""Commands for agents, carried by heartbeat replies (issue 10: limits act).

When metering stops a program, each instance running it gets `freeze` then
`kill` for it.  A command stays queued for its instance until the agent lists
its id as done in a later heartbeat (a lost reply is sent again); a command is
only ever handed to the instance it names.  The OSS also remembers the nonces
of the exec tickets it minted for each program on each instance, so the agent
can find the sessions a program started there (kept in memory: after an OSS
restart a stop order names the program alone).
"""

from __future__ import annotations

import itertools
from collections import defaultdict, deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

Action = Literal[
    "freeze", "kill", "thaw", "migrate", "signal", "resume", "mount", "unmount", "network",
    "checkpoint", "restore",
]
MAX_NONCES = 4096  # per program and instance; older sessions are long gone


@dataclass(frozen=True, slots=True)
class Command:
    """One order for one instance."""

    id: int
    instance: str
    program: str
    action: Action
    reason: str
    tickets: tuple[str, ...]
    # migrate (issue 12): the session's program pid, the target instance and its address
    pid: int = 0
    to: str = ""
    address: str = ""
    # network (issue 13): the instance's node state for the program (wire form)
    state: dict[str, Any] | None = None
    signal: int = 0  # signal (issue 11): the signal for the program's `pid`
    thread: bool = False  # signal: `pid` is a thread's id (tgkill/tkill), which alone gets it
    sender: int = 0  # signal: the sending process's program pid (0: not known)
    checkpoint: bool = False  # kill (issue 12): suspend (CRIU dump, then kill) what can be
    # mount / unmount (issue 14): the program's storage spec (mount carries its key)
    storage: Mapping[str, object] | None = field(default=None, repr=False)
    # checkpoint (issue 12, failover): seconds between the program's checkpoints there
    every: float = 0.0
    # restore (issue 12, failover): the session (hex id) whose last checkpoint to restore
    session: str = ""


class CommandQueue:
    """Commands waiting for their instance's heartbeat; minted ticket nonces per program."""

    def __init__(self, first: int = 1) -> None:
        """`first`: the first command's id (agents ignore an id they saw before: an OSS
        restarted beside running agents starts past the ids its last run gave out)."""
        self._ids = itertools.count(first)
        self._queued: dict[str, dict[int, Command]] = defaultdict(dict)
        self._nonces: dict[str, dict[str, deque[str]]] = defaultdict(dict)

    def minted(self, program: str, instance: str, nonces: Iterable[str]) -> None:
        """Tickets for `program` on `instance` were handed out."""
        per = self._nonces[program].setdefault(instance, deque(maxlen=MAX_NONCES))
        per.extend(nonces)

    def stop(
        self, program: str, instances: Iterable[str], reason: str, checkpoint: bool = False
    ) -> list[Command]:
        """Queue freeze then kill of `program` on each instance; forget its nonces.

        With `checkpoint` (issue 12) the kill suspends what the agent can
        checkpoint, and the nonces are kept for a later `resume`.
        """
        nonces = self._nonces.get(program, {}) if checkpoint else self._nonces.pop(program, {})
        out = []
        for inst in sorted(set(instances) | set(nonces)):
            tickets = tuple(nonces.get(inst, ()))
            actions: tuple[Action, ...] = ("freeze", "kill")
            for action in actions:
                cmd = Command(
                    next(self._ids), inst, program, action, reason, tickets,
                    checkpoint=checkpoint and action == "kill",
                )  # fmt: skip
                self._queued[inst][cmd.id] = cmd
                out.append(cmd)
        return out

    def resume(self, program: str, instances: Iterable[str], reason: str) -> list[Command]:
        """Queue: restore the suspended sessions of `program` on each instance (issue 12)."""
        nonces = self._nonces.get(program, {})
        out = []
        for inst in sorted(set(instances) | set(nonces)):
            tickets = tuple(nonces.get(inst, ()))
            cmd = Command(next(self._ids), inst, program, "resume", reason, tickets)
            self._queued[inst][cmd.id] = cmd
            out.append(cmd)
        return out

    def migrate(self, instance: str, program: str, pid: int, to: str, address: str) -> Command:
        """Queue: move the session of `program` whose program is `pid` to `to` (issue 12)."""
        cmd = Command(
            next(self._ids), instance, program, "migrate", f"to {to}", (), pid, to, address
        )
        self._queued[instance][cmd.id] = cmd
        return cmd

    def network(self, instance: str, program: str, state: dict[str, Any]) -> Command:
        """Queue: `instance` must hold `state` for `program` (issue 13); replaces a
        state for the same program not carried out yet (the newest one counts)."""
        queued = self._queued[instance]
        for old in [c for c in queued.values() if c.action == "network" and c.program == program]:
            del queued[old.id]
        cmd = Command(next(self._ids), instance, program, "network", "", (), state=state)
        queued[cmd.id] = cmd
        return cmd

    def storage(
        self, instance: str, program: str, action: Action, spec: Mapping[str, object]
    ) -> Command:
        """Queue: mount (or unmount) the program's storage on `instance` (issue 14)."""
        name = str(spec.get("name", ""))
        cmd = Command(next(self._ids), instance, program, action, name, (), storage=spec)
        self._queued[instance][cmd.id] = cmd
        return cmd

    def signal(
        self,
        instances: Iterable[str],
        program: str,
        pid: int,
        sig: int,
        thread: bool = False,
        sender: int = 0,
    ) -> list[Command]:
        """Queue: send `sig` to the program's `pid` (a thread's id if `thread`), on each
        instance that holds it (issue 11)."""
        out = []
        for inst in sorted(set(instances)):
            cmd = Command(
                next(self._ids), inst, program, "signal", f"signal {sig} to pid {pid}", (),
                pid, signal=sig, thread=thread, sender=sender,
            )  # fmt: skip
            self._queued[inst][cmd.id] = cmd
            out.append(cmd)
        return out

    def checkpoints(self, instance: str, program: str, every: float) -> Command:
        """Queue: checkpoint the program's sessions on `instance` every `every` s (issue 12)."""
        cmd = Command(
            next(self._ids), instance, program, "checkpoint", f"every {every:g} s", (),
            every=every,
        )  # fmt: skip
        self._queued[instance][cmd.id] = cmd
        return cmd

    def restore(self, instance: str, program: str, session: str) -> Command:
        """Queue: restore `session` of `program` from its last checkpoint on `instance`."""
        cmd = Command(
            next(self._ids), instance, program, "restore", "failover", (), session=session
        )
        self._queued[instance][cmd.id] = cmd
        return cmd

    def fence(self, instance: str, program: str) -> Command:
        """Queue: kill whatever `instance` still runs of `program` (a lost instance came
        back; its sessions were restored elsewhere or lost).  No nonces: the agent
        matches the sessions tagged with the program."""
        cmd = Command(
            next(self._ids), instance, program, "kill", "fenced: the instance was lost", ()
        )
        self._queued[instance][cmd.id] = cmd
        return cmd

    def pending(self, instance: str, cid: int) -> Command | None:
        """The command `cid` if it is (still) queued for `instance`."""
        return self._queued.get(instance, {}).get(cid)

    def cancel(self, instance: str, cid: int) -> None:
        """Stop sending command `cid` (its instance may have got it already)."""
        queued = self._queued.get(instance)
        if queued is not None:
            queued.pop(cid, None)
            if not queued:
                del self._queued[instance]

    def forget_program(self, program: str) -> None:
        """The program ended on its own: its nonces are of no further use."""
        self._nonces.pop(program, None)

    def for_instance(self, instance: str, done: Iterable[int]) -> list[Command]:
        """Drop the commands `instance` says it carried out; return what it still has to do."""
        queued = self._queued.get(instance)
        if not queued:
            return []
        for i in done:
            queued.pop(i, None)
        if not queued:
            del self._queued[instance]
            return []
        return sorted(queued.values(), key=lambda c: c.id)

    def drop_instance(self, instance: str) -> None:
        """The instance is gone: nothing left to tell it."""
        self._queued.pop(instance, None)
        for per in self._nonces.values():
            per.pop(instance, None)
