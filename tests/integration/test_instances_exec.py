"""Agent exec API + deputy (programs under the instance tracer): real agents on loopback."""

from __future__ import annotations

import contextlib
import hashlib
import os
import select
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmagent.cluster.local import Instance, LocalCluster
from vmagent.exec.remote import TicketDrop, deputy_command, ticket_for_self

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


DROP = TicketDrop()


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    with LocalCluster(2, isolate=False, reconnect_window=3.0) as c:
        yield c
        c.remove_logs()
    DROP.close()


def deputy(
    inst: Instance,
    *argv: str,
    path: str | None = None,
    window: float | None = None,
    address: str | None = None,
    ticket: str | None = None,
) -> list[str]:
    """The deputy command line for running argv on `inst` (as the coordinator builds it)."""
    exec_path = os.fsencode(path or argv[0])
    exec_argv = tuple(os.fsencode(a) for a in argv)
    return deputy_command(
        DROP,
        address or inst.address,
        inst.name,
        ticket or ticket_for_self(inst.token, inst.name, exec_path, exec_argv),
        exec_path,
        exec_argv,
        window,
    )


def wait_gone(pid: int, seconds: float = 30.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        # A zombie still answers kill(0): check its state.
        try:
            if Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z":
                return True
        except OSError:
            return True
        time.sleep(0.05)
    return False


def read_pid(path: Path, seconds: float = 30.0) -> int:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        text = path.read_text() if path.exists() else ""
        if text.endswith("\n"):
            return int(text)
        time.sleep(0.02)
    raise AssertionError(f"{path} never written")


def test_exit_status_and_output(cluster: LocalCluster) -> None:
    inst = cluster.instances[0]
    res = subprocess.run(
        deputy(inst, "/bin/sh", "-c", "echo hi; echo oops >&2; exit 3"), capture_output=True
    )
    assert (res.returncode, res.stdout, res.stderr) == (3, b"hi\n", b"oops\n")


def test_process_context_is_the_deputys(cluster: LocalCluster, tmp_path: Path) -> None:
    inst = cluster.instances[1]
    script = 'pwd; umask; ulimit -n; printf "%s\\n" "$WEIRD"; echo "$0 $1"'
    env = {"PATH": "/usr/bin:/bin", "WEIRD": "a b\tc=d"}

    def preexec() -> None:
        os.umask(0o027)
        import resource

        resource.setrlimit(resource.RLIMIT_NOFILE, (321, 4096))

    cmd = deputy(inst, "sh", "-c", script, "zero", "one", path="/bin/sh")
    res = subprocess.run(cmd, capture_output=True, cwd=tmp_path, env=env, preexec_fn=preexec)
    assert res.stdout.decode().splitlines() == [
        str(tmp_path),
        "0027",
        "321",
        "a b\tc=d",
        "zero one",
    ]
    assert res.returncode == 0


def test_inherited_pipe_descriptor_is_forwarded(cluster: LocalCluster) -> None:
    inst = cluster.instances[0]
    r, w = os.pipe()
    try:
        cmd = " ".join(f"'{a}'" for a in deputy(inst, "/bin/sh", "-c", "echo side >&5; echo main"))
        res = subprocess.run(
            ["bash", "-c", f"exec 5>&{w} {w}>&-; exec {cmd}"], capture_output=True, pass_fds=(w,)
        )
        os.close(w)
        assert res.stdout == b"main\n"
        assert os.read(r, 100) == b"side\n"
        assert os.read(r, 100) == b""  # EOF: the remote writer closed
    finally:
        os.close(r)


def test_read_offset_of_a_regular_stdin_is_shared(cluster: LocalCluster, tmp_path: Path) -> None:
    # (read a; <remote head -1>; read b) < file must see line 3 in b, as natively.
    data = tmp_path / "lines"
    data.write_text("1\n2\n3\n")
    inst = cluster.instances[0]
    cmd = " ".join(f"'{a}'" for a in deputy(inst, "/usr/bin/head", "-1"))
    res = subprocess.run(
        ["bash", "-c", f'read a; echo "a=$a"; {cmd}; read b; echo "b=$b"'],
        stdin=data.open("rb"),
        capture_output=True,
    )
    assert res.stdout == b"a=1\n2\nb=3\n"


def test_hundred_megabytes_through_a_pipeline_across_two_instances(
    cluster: LocalCluster, tmp_path: Path
) -> None:
    blob = tmp_path / "blob"
    with blob.open("wb") as f:
        for _ in range(100):
            f.write(os.urandom(1 << 20))
    expected = hashlib.sha256(blob.read_bytes()).hexdigest()
    a, b = cluster.instances
    # producer (a) | relay (b) | consumer (a): the relay streams both ways at once
    # (this once dead-locked when input backpressure also stopped ACKs).
    producer = subprocess.Popen(deputy(a, "/bin/cat", str(blob)), stdout=subprocess.PIPE)
    relay = subprocess.Popen(deputy(b, "/bin/cat"), stdin=producer.stdout, stdout=subprocess.PIPE)
    consumer = subprocess.run(
        deputy(a, "/usr/bin/sha256sum"), stdin=relay.stdout, capture_output=True, timeout=120
    )
    assert producer.stdout is not None and relay.stdout is not None
    producer.stdout.close()
    relay.stdout.close()
    assert producer.wait(timeout=30) == 0 and relay.wait(timeout=30) == 0
    assert consumer.returncode == 0
    assert consumer.stdout.split()[0].decode() == expected


def test_remote_death_by_signal_becomes_the_deputys(cluster: LocalCluster) -> None:
    res = subprocess.run(deputy(cluster.instances[0], "/bin/sh", "-c", "kill -USR1 $$"))
    assert res.returncode == -signal.SIGUSR1


def test_sigpipe_reaches_the_remote_writer(cluster: LocalCluster) -> None:
    cmd = " ".join(f"'{a}'" for a in deputy(cluster.instances[0], "/usr/bin/yes"))
    res = subprocess.run(
        ["bash", "-c", f"{cmd} | head -2; echo ${{PIPESTATUS[0]}}"], capture_output=True
    )
    assert res.stdout == b"y\ny\n141\n"


def test_kill_term_of_the_deputy_terminates_the_remote(
    cluster: LocalCluster, tmp_path: Path
) -> None:
    pidfile = tmp_path / "pid"
    proc = subprocess.Popen(
        deputy(cluster.instances[1], "/bin/sh", "-c", f"echo $$ > {pidfile}; exec sleep 60")
    )
    remote = read_pid(pidfile)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == -signal.SIGTERM
    assert wait_gone(remote)


def test_signals_are_forwarded_not_just_term(cluster: LocalCluster, tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    script = f"trap 'echo got-usr1; exit 7' USR1; echo $$ > {pidfile}; while :; do sleep 0.05; done"
    proc = subprocess.Popen(
        deputy(cluster.instances[0], "/bin/sh", "-c", script), stdout=subprocess.PIPE
    )
    read_pid(pidfile)
    proc.send_signal(signal.SIGUSR1)
    out, _ = proc.communicate(timeout=20)
    assert (proc.returncode, out) == (7, b"got-usr1\n")


def test_exec_failure_is_reported_like_a_shell(cluster: LocalCluster) -> None:
    res = subprocess.run(deputy(cluster.instances[0], "/no/such/program"), capture_output=True)
    assert res.returncode == 127
    assert b"No such file or directory" in res.stderr and b"node0" in res.stderr


def test_bad_ticket_is_refused_with_a_message(cluster: LocalCluster) -> None:
    inst = cluster.instances[0]
    res = subprocess.run(deputy(inst, "/bin/true", ticket="v1.x.1.y"), capture_output=True)
    assert res.returncode == 255
    assert b"refused" in res.stderr and b"node0" in res.stderr
    used = ticket_for_self(inst.token, inst.name, b"/bin/true", (b"/bin/true",))
    assert subprocess.run(deputy(inst, "/bin/true", ticket=used)).returncode == 0
    replay = subprocess.run(deputy(inst, "/bin/true", ticket=used), capture_output=True)
    assert replay.returncode == 255 and b"already used" in replay.stderr


class Cutter:
    """A TCP proxy whose connections the test can cut (to force a reconnect)."""

    def __init__(self, target: str) -> None:
        host, _, port = target.rpartition(":")
        self.target = (host, int(port))
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.socks: list[socket.socket] = []
        self.lock = threading.Lock()
        self.moved = 0
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            with self.lock:
                self.socks += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(1 << 16):
                dst.sendall(data)
                self.moved += len(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def cut(self) -> None:
        with self.lock:
            socks, self.socks = self.socks, []
        for s in socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        self.cut()
        self.listener.close()


def test_a_cut_connection_resumes_without_losing_bytes(
    cluster: LocalCluster, tmp_path: Path
) -> None:
    blob = tmp_path / "blob"
    blob.write_bytes(os.urandom(24 << 20))
    expected = hashlib.sha256(blob.read_bytes()).hexdigest()
    inst = cluster.instances[0]
    proxy = Cutter(inst.address)
    try:
        # Slow the remote writer a little so the cuts land mid-stream.
        script = f"for i in 1 2 3 4 5 6; do head -c 4194304; sleep 0.2; done < {blob}"
        proc = subprocess.Popen(
            deputy(inst, "/bin/sh", "-c", script, address=proxy.address, window=10),
            stdout=subprocess.PIPE,
        )
        assert proc.stdout is not None
        digest = hashlib.sha256()
        cuts = 0
        while chunk := proc.stdout.read(1 << 16):
            digest.update(chunk)
            if cuts < 2 and proxy.moved > (cuts + 1) * (6 << 20):
                proxy.cut()
                cuts += 1
        assert proc.wait(timeout=30) == 0
        assert cuts == 2
        assert digest.hexdigest() == expected
    finally:
        proxy.close()


def test_killed_instance_fails_the_program_cleanly(tmp_path: Path) -> None:
    with LocalCluster(1, isolate=False, reconnect_window=3.0) as c:
        inst = c.instances[0]
        pidfile = tmp_path / "pid"
        proc = subprocess.Popen(
            # exec: without root there is no PID namespace, so only the agent's
            # direct child is covered by PDEATHSIG (grandchildren: docs/INSTANCES.md).
            deputy(inst, "/bin/sh", "-c", f"echo $$ > {pidfile}; exec sleep 60", window=2),
            stderr=subprocess.PIPE,
        )
        remote = read_pid(pidfile)
        c.kill(inst.name)
        assert proc.stderr is not None
        ready, _, _ = select.select([proc.stderr], [], [], 30)
        assert ready, "the deputy hung after its instance died"
        assert proc.wait(timeout=30) == 255
        err = proc.stderr.read().decode()
        assert f"instance {inst.name}" in err and "lost" in err
        assert wait_gone(remote), "the remote program outlived its agent"
        c.remove_logs()


def test_malformed_exec_connections_get_an_error_and_the_agent_lives_on(
    cluster: LocalCluster,
) -> None:
    from vmagent.exec import protocol as P

    inst = cluster.instances[0]
    host, _, port = inst.address.rpartition(":")
    cases = [
        P.MAGIC + P.HEADER.pack(42, 0, 0, 0),  # unknown frame kind
        P.MAGIC + P.frame(P.DATA, 1, b"x", 1),  # data before the handshake
        P.MAGIC + P.frame(P.AUTH, 0, b"\x00\x00\x00\x05ab"),  # truncated record
        P.MAGIC + P.frame(P.HELLO, 0, P.unpairs({b"path": b"/bin/true"})),  # no handshake
        P.MAGIC + P.frame(P.RESUME, 0, b"no-such-session"),  # no handshake
    ]
    for wire in cases:
        with socket.create_connection((host, int(port)), timeout=10) as s:
            s.sendall(wire)
            reply = b""
            while chunk := s.recv(4096):
                reply += chunk
        frames = P.FrameParser().feed(reply)
        assert [f[0] for f in frames] == [P.ERROR], wire
        assert frames[0][3]  # a message saying why
    res = subprocess.run(deputy(inst, "/bin/sh", "-c", "exit 5"))
    assert res.returncode == 5


def test_programs_run_under_the_tracer_of_their_instance(tmp_path: Path) -> None:
    with LocalCluster(1, isolate=False) as c:
        inst = c.instances[0]
        script = "grep TracerPid /proc/self/status | tr -d ' \\t'; echo $0; exit 4"
        res = subprocess.run(deputy(inst, "/bin/sh", "-c", script, "zero"), capture_output=True)
        lines = res.stdout.decode().splitlines()
        assert res.returncode == 4, res.stderr
        assert lines[0].startswith("TracerPid:") and lines[0] != "TracerPid:0"
        assert lines[1] == "zero"
        pidfile = tmp_path / "pid"
        proc = subprocess.Popen(
            deputy(inst, "/bin/sh", "-c", f"echo $$ > {pidfile}; exec sleep 60"),
        )
        read_pid(pidfile, 60)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == -signal.SIGTERM
        c.remove_logs()


def test_ignored_signals_carry_over_and_pythons_own_do_not(cluster: LocalCluster) -> None:
    cmd = " ".join(
        f"'{a}'" for a in deputy(cluster.instances[1], "/bin/grep", "SigIgn", "/proc/self/status")
    )
    res = subprocess.run(["bash", "-c", f"trap '' USR2; exec {cmd}"], capture_output=True)
    mask = int(res.stdout.split()[1], 16)
    assert mask & (1 << (signal.SIGUSR2 - 1))  # the shell's trap '' survives, as across exec
    assert not mask & (1 << (signal.SIGPIPE - 1))  # the deputy's Python ignores it; not passed on


def proc_state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def test_job_control_stop_and_continue_are_mirrored(cluster: LocalCluster, tmp_path: Path) -> None:
    pidfile, flag = tmp_path / "pid", tmp_path / "flag"
    script = f"echo $$ > {pidfile}; while [ ! -e {flag} ]; do sleep 0.05; done"
    proc = subprocess.Popen(deputy(cluster.instances[0], "/bin/sh", "-c", script))
    remote = read_pid(pidfile)
    proc.send_signal(signal.SIGTSTP)
    _, status = os.waitpid(proc.pid, os.WUNTRACED)
    assert os.WIFSTOPPED(status) and os.WSTOPSIG(status) == signal.SIGSTOP, status
    # Generous: a process in uninterruptible I/O wait ("D", e.g. paging in
    # /bin/sleep on a busy disk) only stops once that wait ends.
    # Under its instance tracer a group-stopped process shows "t" (held in
    # PTRACE_LISTEN), untraced "T".
    stopped = ("T", "t")
    deadline = time.monotonic() + 60
    while proc_state(remote) not in stopped and time.monotonic() < deadline:
        time.sleep(0.02)
    assert proc_state(remote) in stopped, f"remote not stopped: {proc_state(remote)}"
    proc.send_signal(signal.SIGCONT)
    deadline = time.monotonic() + 60
    while proc_state(remote) in stopped and time.monotonic() < deadline:
        time.sleep(0.02)
    assert proc_state(remote) not in stopped, "remote not resumed"
    flag.touch()
    assert proc.wait(timeout=60) == 0


def test_a_deputy_killed_with_sigkill_does_not_leave_its_remote_running(
    cluster: LocalCluster, tmp_path: Path
) -> None:
    # The agent cannot tell a dead deputy from a network cut: it waits the
    # reconnect window (3 s for this cluster), then kills the program.
    pidfile = tmp_path / "pid"
    proc = subprocess.Popen(
        deputy(cluster.instances[0], "/bin/sh", "-c", f"echo $$ > {pidfile}; exec sleep 60")
    )
    remote = read_pid(pidfile)
    proc.kill()
    proc.wait()
    assert wait_gone(remote, 30)


def test_a_remote_program_that_does_not_read_stdin_leaves_it_in_place(
    cluster: LocalCluster,
) -> None:
    inst = cluster.instances[1]

    def cmd(*argv: str) -> str:
        return " ".join(f"'{a}'" for a in deputy(inst, *argv))

    # A `while read l; do remote_cmd "$l"; done` loop, unrolled (one ticket per
    # exec): each remote program never reads stdin, so each `read` must still
    # see its line (an eager deputy would swallow the rest of the pipe).
    # (A ticket covers its exact argv: the line is echoed beside the remote program.)
    turns = "; ".join(f'read l; {cmd("/bin/echo", "got")}; echo "$l"' for _ in range(3))
    res = subprocess.run(["bash", "-c", turns], input=b"1\n2\n3\n", capture_output=True)
    assert res.stdout == b"got\n1\ngot\n2\ngot\n3\n", res.stderr
    # A remote reader gets the stream as soon as it reads.
    script = f'{cmd("/bin/true")}; read a; echo "a=$a"; {cmd("/bin/cat")}'
    res = subprocess.run(["bash", "-c", script], input=b"l1\nl2\nl3\n", capture_output=True)
    assert res.stdout == b"a=l1\nl2\nl3\n"


def test_a_terminal_stays_a_terminal_on_an_instance_that_sees_it(cluster: LocalCluster) -> None:
    import fcntl
    import struct
    import termios

    master, slave = os.openpty()
    try:
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 33, 99, 0, 0))
        script = "test -t 0 && test -t 1 && echo is-a-tty; stty size; read x; echo got-$x"
        proc = subprocess.Popen(
            deputy(cluster.instances[0], "/bin/sh", "-c", script),
            stdin=slave,
            stdout=slave,
            stderr=slave,
        )
        os.write(master, b"hello\n")
        out = b""
        deadline = time.monotonic() + 30
        while b"got-hello" not in out and time.monotonic() < deadline:
            if select.select([master], [], [], 1)[0]:
                out += os.read(master, 4096)
        assert proc.wait(timeout=30) == 0
        lines = out.replace(b"\r", b"").split(b"\n")
        assert b"is-a-tty" in lines and b"33 99" in lines and b"got-hello" in lines
    finally:
        os.close(master)
        os.close(slave)


def relay(src: socket.socket, dst: socket.socket) -> None:
    """Copy one direction of a proxied connection until either side ends."""
    try:
        while data := src.recv(1 << 16):
            dst.sendall(data)
    except OSError:
        pass
    for s in (src, dst):
        with contextlib.suppress(OSError):
            s.shutdown(socket.SHUT_RDWR)


class FirstConnectionSpoiler:
    """A TCP proxy that spoils only the first connection through it, then relays.

    `hold`: the first connection's bytes are never forwarded, so the agent sees
    a deputy that does not authenticate and hangs up at its handshake deadline
    (what a deputy or agent starved of CPU on a loaded machine looks like).
    `drop_welcome`: the first connection carries the handshake and the HELLO,
    but is cut as the agent's WELCOME comes back: the program was started and
    the deputy never learnt its session.
    """

    def __init__(self, target: str, mode: str) -> None:
        host, _, port = target.rpartition(":")
        self.target = (host, int(port))
        self.mode = mode
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.spoiled = threading.Event()  # the first connection is over
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        first = True
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            if first:
                first = False
                threading.Thread(target=self._spoil, args=(client, upstream), daemon=True).start()
                continue
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=relay, args=(a, b), daemon=True).start()

    def _spoil(self, client: socket.socket, upstream: socket.socket) -> None:
        try:
            if self.mode == "hold":
                while upstream.recv(1 << 16):  # until the agent gives up on it
                    pass
            else:
                threading.Thread(target=relay, args=(client, upstream), daemon=True).start()
                head = b""
                while len(head) < 17:  # the CHALLENGE frame goes through...
                    head += upstream.recv(17 - len(head))
                length = int.from_bytes(head[5:9], "big")
                body = b""
                while len(body) < length:
                    body += upstream.recv(length - len(body))
                client.sendall(head + body)
                upstream.recv(1)  # ...the WELCOME that follows the HELLO does not
        except OSError:
            pass
        for s in (client, upstream):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()
        self.spoiled.set()

    def close(self) -> None:
        self.listener.close()


@pytest.mark.parametrize("mode", ["hold", "drop_welcome"])
def test_a_spoiled_first_connection_loses_nothing(
    cluster: LocalCluster, tmp_path: Path, mode: str
) -> None:
    """The deputy dials again, and the program starts once and gets all its input.

    Before the fix a first connection cut by the agent's handshake deadline
    made the deputy exit 255 ("lost ... timed out") having sent nothing: in
    `cat big | cat | sha256sum` the last stage then hashed empty input, exit 0.
    """
    blob = os.urandom(8 << 20)
    count = tmp_path / "starts"
    inst = cluster.instances[0]
    proxy = FirstConnectionSpoiler(inst.address, mode)
    try:
        script = f"echo started >> {count}; cat"
        res = subprocess.run(
            deputy(inst, "/bin/sh", "-c", script, address=proxy.address, window=30),
            input=blob,
            capture_output=True,
            timeout=120,
        )
        assert res.returncode == 0, res.stderr
        assert proxy.spoiled.is_set()
        assert hashlib.sha256(res.stdout).hexdigest() == hashlib.sha256(blob).hexdigest()
        assert count.read_text() == "started\n"  # started once, never twice
    finally:
        proxy.close()


def test_a_non_blocking_stdin_is_waited_for_not_taken_for_its_end(
    cluster: LocalCluster,
) -> None:
    """A reader that finds a non-blocking pipe empty waits (EAGAIN is not EOF).

    Before, the deputy took EAGAIN for the end of its input: the remote `cat`
    saw EOF after the first chunk and exited 0, the rest silently lost.
    """
    inst = cluster.instances[1]
    r, w = os.pipe()
    os.set_blocking(r, False)  # the description the deputy inherits
    proc = subprocess.Popen(deputy(inst, "/bin/cat"), stdin=r, stdout=subprocess.PIPE)
    os.close(r)
    assert proc.stdout is not None
    sent = hashlib.sha256()
    got = hashlib.sha256()
    try:
        for _ in range(4):
            chunk = os.urandom(1 << 16)
            sent.update(chunk)
            os.write(w, chunk)
            # Wait for it to come back: the pipe is then empty and still open.
            back = b""
            while len(back) < len(chunk):
                more = proc.stdout.read1(len(chunk) - len(back))
                assert more, "the remote program ended before its input did"
                back += more
            got.update(back)
    finally:
        os.close(w)
    assert proc.stdout.read() == b""
    assert proc.wait(timeout=30) == 0
    assert got.hexdigest() == sent.hexdigest()


def test_a_lost_deputy_leaves_a_note_for_the_coordinator(cluster: LocalCluster) -> None:
    """Exit 255, one line, and `<ticket file>.lost` for the home side to fail the run."""
    inst = cluster.instances[0]
    with socket.create_server(("127.0.0.1", 0)) as closed:
        address = f"127.0.0.1:{closed.getsockname()[1]}"
    cmd = deputy(inst, "/bin/cat", address=address, window=0.5)
    note = Path(cmd[cmd.index("--ticket-file") + 1] + ".lost")
    res = subprocess.run(cmd, input=b"data", capture_output=True, timeout=60)
    assert res.returncode == 255
    assert res.stderr.count(b"\n") == 1 and b"lost while running /bin/cat" in res.stderr
    assert note.read_text().startswith(f"/bin/cat on instance {inst.name}: ")
    note.unlink()
