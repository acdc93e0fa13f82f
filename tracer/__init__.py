"""The tracer: runs an unmodified program under ptrace and hands its syscalls to a coordinator.

It owns the engine (layer 1): the declarative syscall table (`syscalls.py`,
`syscalls_x86_64.py`, `arch.py`), the seccomp filter that stops only the calls the
OSS must see (`seccomp.py`), spawning the seized program (`spawn.py`), the waitpid
loop and all ptrace I/O (`runner.py`, `ptraceio.py`), the pure per-stop state
machine (`machine.py`), the `Coordinator` seam the OSS serves (`coordinator.py`),
the front/tracer process split (`front.py`) and the run's outputs (`decode.py`,
`report.py`, `outputs.py`).  The engine imports nothing of DCP above `net`/`images`.
On top of it, in the same folder because it runs beside the program, sits the
`dcptrace` command (the top layer): `cli.py`, `config.py` and `compose.py`, the one
module that wires the embedded OSS and the cluster into a run
(docs/ARCHITECTURE.md; tests/unit/test_layering.py checks the layers).
"""
