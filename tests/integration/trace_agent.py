"""A real agent whose session hooks print every instance-tracer record (test helper).

`python trace_agent.py INSTANCE TOKEN_FILE [TRACE_TIMEOUT]` starts the agent as `dcp-agent`
does (the zygote forked before the loop), adds a `SessionHooks` observer the
way the agent's other services do, and prints on stdout:
`listening HOST:PORT`, `agent PID zygote PID`, then one JSON object per record
(`vmagent.trace.channel`; values decoded, `argv` as a list).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from vmagent.agent import Agent  # noqa: E402
from vmagent.config import AgentConfig, read_token  # noqa: E402
from vmagent.exec import protocol as P  # noqa: E402
from vmagent.exec.hooks import NullHooks  # noqa: E402
from vmagent.exec.session import Session  # noqa: E402
from vmagent.trace.zygote import Tracing  # noqa: E402


class Printer(NullHooks):
    """Prints each tracer record as one JSON line."""

    def trace_message(self, session: Session, record: dict[bytes, bytes]) -> None:
        out: dict[str, object] = {k.decode(): v.decode(errors="replace") for k, v in record.items()}
        if b"argv" in record:
            out["argv"] = [a.decode(errors="replace") for a in P.unrecord(record[b"argv"])]
        out["session_pid"] = session.pid
        print(json.dumps(out), flush=True)


async def serve(config: AgentConfig, tracing: Tracing) -> None:
    agent = Agent(config, tracing)
    agent.service.hooks.add(Printer())
    address = await agent.start()
    print(f"listening {address}", flush=True)
    print(f"agent {os.getpid()} zygote {tracing.pid}", flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    try:
        await stop.wait()
    finally:
        await agent.close()


def main() -> None:
    instance, token_file = sys.argv[1], sys.argv[2]
    config = AgentConfig(
        instance=instance,
        token=read_token(token_file, None),
        listen_host="127.0.0.1",
        listen_port=0,
        reconnect_window=3.0,
        trace_timeout=float(sys.argv[3]) if len(sys.argv) > 3 else 10.0,
    )
    tracing = Tracing.fork(instance)
    asyncio.run(serve(config, tracing))


if __name__ == "__main__":
    main()
