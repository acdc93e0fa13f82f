"""Signals between a program's instances (issue 11, item 7): one PID space per program.

A placed process signals one of its program's pids.  Its instance tracer
answers what that instance holds; a pid it lacks goes home through the
session's deputy, where every pid the home numbered is (its processes, and the
deputies of processes placed elsewhere).  What the home cannot reach is a
process *forked* on an instance (a placed shell's subshell, a forked worker):
such a pid is `base + its pid there`, `base` a multiple of 2^22 above every
home pid (`vmagent.trace.pidspace`).  For those the asking agent comes here:
the OSS checks the program runs on the asking instance, and orders every
instance the program runs on to send the signal (a heartbeat command
`signal`); the one whose session numbered that pid delivers it, the others
hold no such pid and ignore it.

The program's home asks the same for its own processes (`OssCoordinator`,
with the account's token).  Delivery therefore waits for the next heartbeat of
the instance that holds the pid (at most one tick), and kill's answer is given
before it: 0 when the program runs on some instance, ESRCH (404) when it runs
nowhere.
"""

from __future__ import annotations

from oss import models as m
from oss.errors import Conflict, NotFound
from oss.service import Oss


async def send(oss: Oss, program_id: str, asker: str, body: m.SignalRequest) -> list[str]:
    """Queue `body.signal` for the program's `body.pid` on every instance it runs on.

    NotFound unless the program runs on `asker` (an instance signals only for a
    program it runs, as it places only for one).
    """
    await oss.programs.placed_on(program_id, asker)
    return await _queue(oss, program_id, body)


async def send_from_home(
    oss: Oss, account_id: str, program_id: str, body: m.SignalRequest
) -> list[str]:
    """The same for the program's home (its tracer, with the account's token).

    NotFound unless the program is the account's; Conflict (409) once it ended.
    """
    program = await oss.programs.program(account_id, program_id)
    if program["state"] not in ("running", "recovering"):
        raise Conflict(f"program {program_id} is {program['state']}")
    return await _queue(oss, program_id, body)


async def _queue(oss: Oss, program_id: str, body: m.SignalRequest) -> list[str]:
    instances = await oss.programs.instances_of(program_id)
    if not instances:
        raise NotFound(f"program {program_id} runs on no instance")
    oss.commands.signal(instances, program_id, body.pid, body.signal, body.thread, body.sender)
    return instances
