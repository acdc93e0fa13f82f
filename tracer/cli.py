"""`dcptrace [options] -- program [args...]`: run an unmodified program under DCP."""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import click

from oss.storage.pathmap import PathMap, PathMapError, parse_mapping
from tracer import compose
from tracer.arch import table_for
from tracer.compose import PLACEMENTS
from tracer.coordinator import Coordinator
from tracer.errors import OutputError, SpawnError, TracerError, UsageError
from tracer.front import LIMIT_STATUS, TracerLink, run_split
from tracer.outputs import Output, open_output, stderr_output
from tracer.report import build_record, render_record, write_summary
from tracer.runner import Runner, reraise
from tracer.spawn import initial_dispositions, resolve

if TYPE_CHECKING:
    from tracer.config import FileConfig

log = logging.getLogger("dcptrace")


@dataclass(frozen=True)
class RunDefaults:
    """Settings a config file may provide (see tracer.config.FileConfig)."""

    map: dict[str, str] = field(default_factory=dict)
    instances: int = 0
    placement: str = "auto"
    oss: str | None = None
    volumes: list[str] = field(default_factory=list)
    storage: dict[str, int | str] = field(default_factory=dict)
    share_cwd: bool | None = None
    checkpoint_every: float | None = None


def _seconds(text: str) -> float:
    """`--checkpoint-every`'s value: a positive number of seconds (UsageError otherwise)."""
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0 < value <= 86400:  # also refuses nan and inf
        raise UsageError(
            "--checkpoint-every: expected a positive number of seconds (at most 86400),"
            f" got {text!r}"
        )
    return value


def _storage_table(config: RunDefaults | FileConfig) -> dict[str, int | str]:
    """The [storage] table's settings that were given (issue 14)."""
    table = config.storage
    if isinstance(table, dict):
        return table
    return {k: v for k, v in table.model_dump().items() if v is not None}


def _real_in_view(pathmap: PathMap, path: str) -> str:
    """The real path behind a path the program sees (itself when not mapped)."""
    if not pathmap:
        return path

    def readlink(p: bytes) -> bytes | None:
        try:
            return os.readlink(p)
        except OSError:
            return None

    real = pathmap.resolve(os.fsencode(path), os.fsencode(os.getcwd()), readlink)
    return path if real is None else os.fsdecode(real)


def _in_view(pathmap: PathMap, path: str) -> str:
    """Where a program's path leads in the mapped view, for a start that failed."""
    real = _real_in_view(pathmap, path)
    if real == path:
        return ""
    missing = "" if os.path.lexists(real) else ", which does not exist"
    return f" (under --map, {path} is {real}{missing})"


# Exit status of a run whose program said 0 while a placed process lost data
# (the deputy's own status for a lost instance).
LOST_STATUS = 255
# After a limit stop, how long deputies may wait for their instances to end their programs.
DEPUTY_GRACE = 10.0


def _fail_on_loss(line: str, placed: list[Coordinator]) -> str:
    """The root's `exit 0` report becomes a failure if a placed process lost data.

    A shell keeps only a pipeline's last status, so `a | b | c` with `b` cut
    off from its instance would end in 0 with c's input lost.  The placing
    coordinator (vmagent.cluster.coordinator) lists such losses; the run then ends in
    LOST_STATUS with one line naming the first.
    """
    lost: list[str] = getattr(placed[0], "lost", []) if placed else []
    if line != "exit 0" or not lost:
        return line
    more = f" (and {len(lost) - 1} more)" if len(lost) > 1 else ""
    click.echo(f"dcptrace: data was lost: {lost[0]}{more}", err=True)
    return f"exit {LOST_STATUS}"


def _program_status(exit_status: int | None, sig: int | None) -> str:
    """How the program ended, for a line about outputs lost after it ran."""
    if sig:
        return f"the program was killed by {signal.Signals(sig).name}"
    if exit_status:
        return f"the program exited with status {exit_status}"
    return ""


def _finish(outputs: list[Output], program_status: str) -> bool:
    """Put every output in place; one line per one that failed. True if all were written."""
    ok = True
    for out in dict.fromkeys(outputs):  # -o may carry both the trace and the summary
        try:
            out.finish()
        except OutputError as exc:
            ok = False
            suffix = f" ({program_status})" if program_status else ""
            click.echo(f"dcptrace: {exc}{suffix}", err=True)
    return ok


@click.command(
    context_settings={"allow_interspersed_args": False, "help_option_names": ["-h", "--help"]},
    epilog="""\b
Examples:
  dcptrace -- ./build.sh                      run under the embedded coordinator
  dcptrace --summary -- make -j4              where the syscalls went
  dcptrace --trace -o trace.txt -- python3 x.py
  dcptrace --map /data=/srv/dcp/data -- ./app   the program sees /srv/dcp/data as /data
  dcptrace --instances 3 -- make -j6          processes placed on 3 local instances

The exit status is the program's (a death by signal is re-raised); 127 and 126
mean the program could not be found or run, 2 a usage error, 125 a tracer
failure, including a requested output (-o, --record) that could not be
written: the program ran, but what was asked of dcptrace is lost.""",
)
@click.option("--trace", is_flag=True, help="Print every syscall, strace-style.")
@click.option(
    "-o",
    "--output",
    "output",
    type=click.Path(dir_okay=False, writable=True),
    help="Write the --trace lines and the --summary table to FILE instead of stderr.",
)
@click.option(
    "--summary",
    is_flag=True,
    help="Print counts, errors and time per syscall, by category and service.",
)
@click.option(
    "--record",
    "record_path",
    type=click.Path(dir_okay=False, writable=True),
    help="Write a JSON run record to FILE.",
)
@click.option(
    "--map",
    "maps",
    multiple=True,
    metavar="SRC=DST",
    help="Show real directory DST to the program as SRC (repeatable).",
)
@click.option(
    "--volume",
    "volumes",
    multiple=True,
    metavar="PATH",
    help="Make directory PATH one namespace on every instance (repeatable; with --instances).",
)
@click.option(
    "--share-cwd/--no-share-cwd",
    default=None,
    help="Make the working directory one namespace on every instance, local or VM "
    "(default: on; not / or $HOME).",
)
@click.option("--config", "config_path", metavar="FILE", help="TOML configuration file.")
@click.option(
    "--instances",
    type=click.IntRange(min=0),
    default=None,
    help="Run on N local compute instances.",
)
@click.option(
    "--placement",
    type=click.Choice(PLACEMENTS),
    default=None,
    help="Where new programs run (default auto: a cost model keeps short ones home).",
)
@click.option("--oss", "oss_url", metavar="URL", help="Use a running dcp-oss coordinator.")
@click.option(
    "--checkpoint-every",
    "checkpoint_every",
    metavar="SECONDS",
    help="Checkpoint placed processes this often; a lost instance's are restored elsewhere.",
)
@click.option(
    "--data",
    "data_dir",
    metavar="DIR",
    help="Local OSS state (default $DCP_DATA or ~/.local/share/dcp).",
)
@click.option("--no-state", is_flag=True, help="Do not record this run in the local OSS state.")
@click.option("-v", "--verbose", count=True, help="More log output on stderr.")
@click.argument(
    "program", nargs=-1, required=True, type=click.UNPROCESSED, metavar="-- PROGRAM [ARGS]..."
)
def command(
    trace: bool,
    output: str | None,
    summary: bool,
    record_path: str | None,
    maps: tuple[str, ...],
    volumes: tuple[str, ...],
    share_cwd: bool | None,
    config_path: str | None,
    instances: int | None,
    placement: str | None,
    oss_url: str | None,
    checkpoint_every: str | None,
    data_dir: str | None,
    no_state: bool,
    verbose: int,
    program: tuple[str, ...],
) -> int:
    """Run PROGRAM under DCP, as if the cluster were one computer."""
    logging.basicConfig(
        level=logging.WARNING - 10 * verbose, format="dcptrace: %(levelname)s: %(message)s"
    )
    if trace:  # placement decisions (home or placed, and why) belong to the trace
        logging.getLogger("dcp.placement").setLevel(logging.INFO)
    if config_path:
        from tracer.config import load_config  # pydantic costs ~30 ms of start-up

        config: RunDefaults | FileConfig = load_config(config_path)
    else:
        config = RunDefaults()
    mapping = dict(config.map)
    for spec in maps:
        src, dst = parse_mapping(spec)
        mapping[src] = dst
    table = table_for(os.uname().machine)
    env = dict(os.environ)
    pathmap = PathMap(mapping)
    # The program is found as it will see the filesystem: through the map.
    try:
        path = resolve(program[0], env, lambda p: _real_in_view(pathmap, p))
    except SpawnError as exc:
        if "/" in program[0]:
            where = _in_view(pathmap, program[0])
        else:
            where = " in the --map view" if pathmap else ""
        raise SpawnError(exc.program, exc.reason + where, exc.exit_code) from exc
    observe = trace or summary or record_path is not None
    n = config.instances if instances is None else instances
    where = placement or config.placement
    every = config.checkpoint_every if checkpoint_every is None else _seconds(checkpoint_every)
    compose.check_checkpoints(every, n, oss_url or config.oss)
    compose.check_volumes(tuple(config.volumes) + volumes, n, oss_url or config.oss, mapping)
    dispositions = initial_dispositions()

    # Output files are opened before the program runs: a bad path is a usage
    # error, not a run whose record is lost at the end.
    if output and not (trace or summary):
        raise UsageError("-o/--output needs --trace or --summary")
    if output and record_path and os.path.realpath(output) == os.path.realpath(record_path):
        raise UsageError(f"-o and --record name the same file {output}")
    out_file = None
    if output:
        out_file = open_output(output, "trace" if trace else "summary", "--output")
    record_out = open_output(record_path, "record", "--record") if record_path else None

    state_dir = compose.state_dir(data_dir)

    def tracer_main(link: TracerLink) -> int:
        trace_out = (out_file or stderr_output("trace", sys.stderr)) if trace else None
        outputs = [o for o in (trace_out, out_file, record_out) if o is not None]
        local = None if no_state else compose.local_state(state_dir, program, os.getcwd())

        placed: list[Coordinator] = []  # the coordinator, once it exists

        def report(line: str) -> None:
            line = _fail_on_loss(line, placed)
            if line.startswith(("exit ", "signal ", "dumped ")) and placed:
                # A limit may have ended the program before the watcher saw the stop.
                final_stop = getattr(placed[0], "final_stop", None)
                reason = final_stop() if final_stop is not None else None
                if reason is not None:
                    link.send(f"limit {reason}")
            link.send(line)
            if local is None:
                return
            kind, _, value = line.partition(" ")
            if kind == "pid":
                local.start()  # the program runs: record it off the tracer's path
            elif kind in ("exit", "signal", "dumped"):
                n = int(value)
                local.finish(n if kind == "exit" else None, None if kind == "exit" else n)

        def complain(message: str) -> None:
            if placed and getattr(placed[0], "refused", None):
                return  # the coordinator refused to start the program and said why
            click.echo(f"dcptrace: {program[0]}: {message}{_in_view(pathmap, path)}", err=True)

        inner = compose.embedded(table, pathmap, local)
        running: list[Runner] = []

        def stop_at_limit(reason: str) -> None:
            """The OSS stopped the program at a limit: say so, then end every tracee here.

            Deputies of placed processes go last: the OSS's stop order freezes, then
            ends, their programs on the instances, and each deputy then ends with its
            program; the grace bounds the wait for an instance that does not answer.
            """
            link.send(f"limit {reason}")
            if not running:
                return
            placed_pids = getattr(placed[0], "placed_pids", None) if placed else None
            if placed_pids is not None:
                kill_tracees(running[0], spare=placed_pids)
                deadline = time.monotonic() + DEPUTY_GRACE
                while placed_pids() and time.monotonic() < deadline:
                    time.sleep(0.05)
            kill_tracees(running[0])

        try:
            with compose.coordinator(
                inner, n, where, oss_url or config.oss, mapping,
                volumes=tuple(config.volumes) + volumes, storage=_storage_table(config),
                note=local.note if local is not None else None,
                profiles=state_dir / "placement-profiles.json", keep_profiles=local is not None,
                share_cwd=config.share_cwd if share_cwd is None else share_cwd,
                checkpoint_every=every,
            ) as coordinator:  # fmt: skip
                placed.append(coordinator)
                runner = Runner(
                    program, env, path, table, coordinator, observe, trace_out,
                    report=report, dispositions=dispositions, complain=complain,
                )  # fmt: skip
                running.append(runner)
                watch = getattr(coordinator, "watch_limits", None)
                if watch is not None:
                    watch(stop_at_limit)
                outcome = runner.run()
                if summary:
                    summary_out = out_file or stderr_output("summary", sys.stderr)
                    outputs.append(summary_out)
                    write_summary(outcome.stats, summary_out)
                if record_out is not None:
                    record = build_record(
                        program, outcome.exit_status, outcome.signal, outcome.machine,
                        outcome.stats, outcome.wall_seconds, coordinator.instance_of, "all",
                        remote=compose.measured(coordinator),
                    )  # fmt: skip
                    record_out.write(render_record(record))
                status = _program_status(outcome.exit_status, outcome.signal)
                written = _finish(outputs, status)
                # The front may return now; local state and cluster teardown follow.
                link.send(f"done {0 if written else 125}")
        except TracerError as exc:
            click.echo(f"dcptrace: {exc}", err=True)
            return 125
        finally:
            for out in outputs:
                out.discard()  # a no-op for outputs already in place
            if local is not None:
                local.close(timeout=30)
        return 0

    # No temporary output file outlives a killed front, even one killed at once.
    made = [o.discard for o in (out_file, record_out) if o is not None]
    end = run_split(tracer_main, wait_for_tracer=observe, abandon=made)
    if end.limit is not None:
        click.echo(f"dcptrace: {end.limit}", err=True)
        return LIMIT_STATUS
    if end.outputs_lost:
        return 125  # the tracer said which output and how the program ended
    if end.signal:
        sys.stdout.flush()
        reraise(end.signal, end.core_dumped)
        return 128 + end.signal
    return end.exit_status if end.exit_status is not None else 125


def kill_tracees(
    runner: Runner, rounds: int = 100, spare: Callable[[], Collection[int]] = frozenset
) -> None:
    """SIGKILL every traced process but those `spare()` names, again for those forked
    meanwhile (from another thread)."""
    for _ in range(rounds):
        machine = runner.machine
        if machine is None or not machine.alive:
            return
        try:
            tgids = {t.tgid for t in list(machine.threads.values())} - set(spare())
        except RuntimeError:  # the tracer thread changed the table under us: look again
            continue
        if not tgids:
            return
        for tgid in tgids:
            try:
                os.kill(tgid, signal.SIGKILL)
            except OSError:
                pass
        time.sleep(0.02)


def main(argv: list[str] | None = None) -> None:
    """Console entry point: one clear line on stderr for every user error."""
    try:
        code = command.main(args=argv, prog_name="dcptrace", standalone_mode=False)
    except click.UsageError as exc:
        msg = exc.format_message()
        if isinstance(exc, click.MissingParameter):
            msg = "no program given: usage: dcptrace [OPTIONS] -- PROGRAM [ARGS]..."
        click.echo(f"dcptrace: {msg}", err=True)
        sys.exit(2)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except (KeyboardInterrupt, click.exceptions.Abort):
        sys.exit(128 + signal.SIGINT)
    except SpawnError as exc:
        click.echo(f"dcptrace: {exc}", err=True)
        sys.exit(exc.exit_code)
    except (UsageError, PathMapError) as exc:
        click.echo(f"dcptrace: {exc}", err=True)
        sys.exit(2)
    except TracerError as exc:
        click.echo(f"dcptrace: {exc}", err=True)
        sys.exit(125)
    status = code if isinstance(code, int) else 0
    if argv is None:
        # The console entry leaves without tearing the interpreter down: with every
        # module of the tracer loaded that costs more than the run of a short
        # program, and the front holds nothing that needs a finalizer (the tracer
        # child finishes the outputs and the run's record).
        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass  # a closed pipe: nothing more can be said there
        os._exit(status)
    sys.exit(status)


if __name__ == "__main__":
    main()
