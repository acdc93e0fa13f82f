"""Issue 11 items 7-8: one hostname and one PID space per program, wherever it runs.

Each case is differential: the same script natively, under plain `dcptrace`
and under `dcptrace --instances 3 --placement spread`, asserting the native
behaviour.  Namespaced instances (root) are where the difference would show:
each has its own UTS and PID namespace, so a placed process would otherwise
see `node1` and pid 2.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import WHERE_SH, dcptrace_argv, traced_env

pytestmark = [
    pytest.mark.root,
    pytest.mark.netns,
    pytest.mark.skipif(os.geteuid() != 0, reason="namespaced instances (own UTS/PID) need root"),
]

MODES = {
    "native": [],
    "plain": dcptrace_argv("--no-state"),
    "spread": dcptrace_argv("--no-state", "--instances", "3", "--placement", "spread"),
}
# A view without maps (what a placed process on a VM under --oss has by default):
# the instance tracers trap path calls for /proc alone, the C loop letting the others go.
NO_MAPS = {
    "spread, no maps": dcptrace_argv(
        "--no-state", "--instances", "3", "--placement", "spread", "--no-share-cwd"
    )
}


def run_all(script: str, cwd: Path | None = None) -> dict[str, subprocess.CompletedProcess]:
    """`sh -c script` natively, under dcptrace and on three instances."""
    out = {}
    for mode, prefix in MODES.items():
        argv = [*prefix, "--", "sh", "-c", script] if prefix else ["sh", "-c", script]
        out[mode] = subprocess.run(
            argv, capture_output=True, env=traced_env(), cwd=cwd, timeout=120
        )
        assert out[mode].returncode == 0, (mode, out[mode].stderr)
    return out


HOSTNAMES = (
    # Each line is a placed exec (or a placed shell's builtin read).
    "hostname; uname -n; hostname; "
    "sh -c 'read h < /proc/sys/kernel/hostname; echo $h'; "
    "python3 -c 'import socket, os; print(socket.gethostname(), os.uname().nodename)'; "
    'sh -c "' + WHERE_SH.replace('"', '\\"').replace("$", "\\$") + '"'
)


def test_the_program_sees_its_home_hostname_on_every_instance() -> None:
    home = socket.gethostname()
    runs = run_all(HOSTNAMES)
    want = f"{home}\n{home}\n{home}\n{home}\n{home} {home}\n"
    for mode, res in runs.items():
        lines = res.stdout.decode()
        assert lines.startswith(want), (mode, lines)
    # ...and the execs did run on the instances: the last line is where.
    assert runs["spread"].stdout.decode().splitlines()[-1].startswith("node"), runs["spread"]


# Each line the same natively, under dcptrace and with every exec placed: a placed
# shell's $$ and $PPID, a pidfile, a child's pid against its own getpid, kill and
# wait of a background child by the pid `$!` gave, getpid across an exec.
PIDS = r"""
echo $$ > outer.pid
sh -c 'echo $$ $PPID > inner.pid; kill -0 $$ && echo "kill -0 self: ok"'
read pid ppid < inner.pid
[ "$ppid" = "$$" ] && echo "placed \$PPID is its parent: ok"
[ "$pid" != "$$" ] && echo "placed \$\$ is its own: ok"
sh -c 'echo $$ > child.pid; exec python3 exec.py'
sh -c 'sh -c "echo \$\$ > bg.pid" & p=$!; wait $p; echo "wait \$!: $?"; echo $p > bg.want'
cat bg.pid > bg.got
cmp -s bg.got bg.want && echo "\$! is the child's \$\$: ok"
sh -c 'sleep 30 & p=$!; kill $p; wait $p; echo "killed by \$!: $?"'
sh -c '(exit 3) & wait $!; echo "forked child status: $?"'
python3 tid.py
"""
EXEC_PY = """import os
pid, ppid = (int(open(f).read()) for f in ("child.pid", "outer.pid"))
print("getpid across exec:", os.getpid() == pid, os.getppid() == ppid)
"""
TID_PY = """import os, threading
print("main tid is pid:", threading.get_native_id() == os.getpid())
"""

PIDS_WANT = """\
kill -0 self: ok
placed $PPID is its parent: ok
placed $$ is its own: ok
getpid across exec: True True
wait $!: 0
$! is the child's $$: ok
killed by $!: 143
forked child status: 3
main tid is pid: True
"""


def test_a_placed_process_sees_the_program_s_pids(tmp_path: Path) -> None:
    outs = {}
    for mode in MODES:
        where = tmp_path / mode
        where.mkdir()
        (where / "exec.py").write_text(EXEC_PY)
        (where / "tid.py").write_text(TID_PY)
        outs[mode] = run_all_one(mode, PIDS, where)
    for mode, out in outs.items():
        assert out == PIDS_WANT, (mode, out)


def run_all_one(mode: str, script: str, cwd: Path) -> str:
    prefix = MODES[mode] if mode in MODES else NO_MAPS[mode]
    argv = [*prefix, "--", "sh", "-c", script] if prefix else ["sh", "-c", script]
    res = subprocess.run(argv, capture_output=True, env=traced_env(), cwd=cwd, timeout=120)
    assert res.returncode == 0, (mode, res.stderr)
    return res.stdout.decode()


# Signals between processes on different instances (or home): each goes home, where
# every pid of the program is.  A placed `sleep` is killed by a placed shell (its
# own instance holds neither that pid nor the sleep), a placed shell checks that
# its parent at home lives, and a pid that is no process's fails as natively.
KILLS = r"""
sleep 30 & p=$!
sh -c 'kill $1 && echo "kill of a sibling: sent"' _ $p
wait $p; echo "the sibling died by it: $?"
sh -c 'kill -0 $PPID && echo "kill -0 of its parent at home: ok"'
sh -c 'kill -USR1 $$ 2>/dev/null; echo "never"' & wait $!; echo "its own signal: $?"
sh -c 'kill -0 $1 2>/dev/null; echo "kill of a pid that is gone: $?"' _ $GONE
"""
KILLS_WANT = """\
kill of a sibling: sent
the sibling died by it: 143
kill -0 of its parent at home: ok
its own signal: 138
kill of a pid that is gone: 1
"""


def test_a_signal_reaches_a_pid_of_the_program_wherever_it_runs(tmp_path: Path) -> None:
    gone = subprocess.Popen(["true"])
    gone.wait()  # reaped: its pid names no process (until reused, far off)
    for mode, prefix in MODES.items():
        argv = [*prefix, "--", "sh", "-c", KILLS] if prefix else ["sh", "-c", KILLS]
        env = {**traced_env(), "GONE": str(gone.pid)}
        res = subprocess.run(argv, capture_output=True, env=env, cwd=tmp_path, timeout=120)
        assert (res.stdout.decode(), res.returncode) == (KILLS_WANT, 0), (mode, res.stderr)


# A pid forked on an instance (a placed Python's child: no home pid) signalled by a
# process placed from home, then by the home shell itself: home holds no such pid, so
# the OSS orders the instances of the program to send it (asked by the placed process's
# agent, or by the home's coordinator), and the one whose session forked it does.
# (A process placed from that Python would reach it through its deputy, which runs
# where the Python runs.)
FORKED_PY = """import os, sys, time
child = os.fork()
if child == 0:
    time.sleep(60)
    os._exit(0)
with open(sys.argv[1] + ".tmp", "w") as f:
    f.write(str(child))
os.rename(sys.argv[1] + ".tmp", sys.argv[1])
_, status = os.waitpid(child, 0)
print("the forked child died by signal", os.WTERMSIG(status) if os.WIFSIGNALED(status) else 0)
"""
FORKED = r"""
python3 forked.py one.pid & p=$!
until [ -s one.pid ]; do sleep 0.05; done
sh -c 'kill $(cat one.pid) && echo "kill of a forked pid: sent"'
wait $p
python3 forked.py two.pid & p=$!
until [ -s two.pid ]; do sleep 0.05; done
kill -USR1 $(cat two.pid) && echo "kill from home: sent"
wait $p
"""


def test_a_signal_reaches_a_pid_forked_on_another_instance(tmp_path: Path) -> None:
    for mode in MODES:
        where = tmp_path / mode
        where.mkdir()
        (where / "forked.py").write_text(FORKED_PY)
        out = run_all_one(mode, FORKED, where)
        want = (
            "kill of a forked pid: sent\nthe forked child died by signal 15\n"
            "kill from home: sent\nthe forked child died by signal 10\n"
        )
        # The killer's line and the child's end race natively too: compare as sets.
        assert sorted(out.splitlines()) == sorted(want.splitlines()), (mode, out)


# /proc/PID of a sibling placed elsewhere, read at home: the program's process there
# is its deputy, which takes the name and argv of the exec it stands for, so what a
# native reader finds (pid, parent, name, argv, state) is what this one finds.
PROC_PY = r"""import os, subprocess, sys, time
child = "import time; print('ready', flush=True); time.sleep(60)"
argv = [sys.executable, "-c", child, "one arg", ""]
p = subprocess.Popen(argv, stdout=subprocess.PIPE)
assert p.stdout.readline() == b"ready\n"
def stat():
    with open(f"/proc/{p.pid}/stat", "rb") as f:
        text = f.read()
    comm = text[text.index(b"(") + 1 : text.rindex(b")")]
    return [int(text.split()[0]), comm, *text.rpartition(b")")[2].split()[:2]]
deadline = time.monotonic() + 60
while stat()[2] != b"S" and time.monotonic() < deadline:
    time.sleep(0.01)  # natively: until it sleeps (it printed, then went to sleep)
pid, comm, state, ppid = stat()
print("exists:", os.path.isdir(f"/proc/{p.pid}"))
print("stat pid, comm, state, ppid:", pid == p.pid, comm.decode(), state.decode(),
      int(ppid) == os.getpid())
with open(f"/proc/{p.pid}/cmdline", "rb") as f:
    print("cmdline is its argv:", f.read() == b"".join(os.fsencode(a) + b"\0" for a in argv))
with open(f"/proc/{p.pid}/comm") as f:
    print("comm:", f.read().strip())
with open(f"/proc/{p.pid}/status") as f:
    status = dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)
print("status:", status["Name"], status["State"][0], int(status["Pid"]) == p.pid,
      int(status["PPid"]) == os.getpid())
p.kill()
p.wait()
"""


def test_proc_of_a_sibling_elsewhere_read_at_home(tmp_path: Path) -> None:
    (tmp_path / "proc.py").write_text(PROC_PY)
    name = os.path.basename(sys.executable)[:15]
    want = (
        f"exists: True\nstat pid, comm, state, ppid: True {name} S True\n"
        f"cmdline is its argv: True\ncomm: {name}\nstatus: {name} S True True\n"
    )
    for mode in MODES:
        assert run_at_home(mode, "proc.py", tmp_path) == want, mode


def run_at_home(mode: str, script: str, cwd: Path) -> str:
    """stdout of Python `script` as the program's own process (it stays home; what it
    starts is placed under spread)."""
    argv = [*MODES[mode], "--", sys.executable, script] if MODES[mode] else [sys.executable, script]
    res = subprocess.run(argv, capture_output=True, env=traced_env(), cwd=cwd, timeout=120)
    assert res.returncode == 0, (mode, res.stderr)
    return res.stdout.decode()


# si_pid/si_uid of a signal that crossed instances: a placed receiver learns its
# sender in the program's pids (the home shell, then a shell placed elsewhere), as
# natively.  The receiver's deputy sees the sender at home; the receiving instance's
# tracer gives the delivered signal that sender.
RECV_PY = r"""import os, signal, sys
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1, signal.SIGUSR2})
open("ready.tmp", "w").close()
os.rename("ready.tmp", "ready")
for _ in range(2):
    info = signal.sigwaitinfo({signal.SIGUSR1, signal.SIGUSR2})
    name = signal.Signals(info.si_signo).name[3:]
    print(name, info.si_pid, info.si_uid == os.getuid(), flush=True)
"""
SENDERS = r"""
python3 recv.py > got & p=$!
until [ -e ready ]; do sleep 0.05; done
kill -USR1 $p
echo "USR1 $$ True" > want
sh -c 'echo "USR2 $$ True" >> want; kill -USR2 $1' _ $p
wait $p
cmp want got && echo "each signal names its sender"
"""


def test_a_signal_across_instances_names_its_sender(tmp_path: Path) -> None:
    for mode in MODES:
        where = tmp_path / mode
        where.mkdir()
        (where / "recv.py").write_text(RECV_PY)
        out = run_all_one(mode, SENDERS, where)
        assert out == "each signal names its sender\n", (mode, out, (where / "got").read_text())


# tgkill of a thread that is not its process's main one, from another instance: the
# thread id is a pid of the program, and that thread alone gets the signal (the main
# thread, which does not block it, would take it if it went to the process).
THREADED_PY = r"""import os, signal, threading
got = []
signal.signal(signal.SIGUSR1, lambda *_: got.append("the main thread"))
def worker():
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
    with open("tid.tmp", "w") as f:
        f.write(str(threading.get_native_id()))
    os.rename("tid.tmp", "tid")
    signal.sigwait({signal.SIGUSR1})
    got.append("the worker")
t = threading.Thread(target=worker)
t.start()
t.join()
print("taken by", *got)
"""
TGKILL_PY = r"""import ctypes, sys
libc = ctypes.CDLL(None, use_errno=True)
tgid, tid = int(sys.argv[1]), int(sys.argv[2])
print("tgkill of the worker:", libc.syscall(234, tgid, tid, 10), ctypes.get_errno(), flush=True)
"""
TGKILL = r"""
python3 threaded.py & p=$!
until [ -s tid ]; do sleep 0.05; done
[ "$(cat tid)" != "$p" ] && echo "the worker is not the main thread"
python3 tgkill.py $p $(cat tid) > sent
wait $p
cat sent
"""


def test_tgkill_reaches_a_thread_on_another_instance(tmp_path: Path) -> None:
    want = "the worker is not the main thread\ntaken by the worker\ntgkill of the worker: 0 0\n"
    for mode in MODES:
        where = tmp_path / mode
        where.mkdir()
        (where / "threaded.py").write_text(THREADED_PY)
        (where / "tgkill.py").write_text(TGKILL_PY)
        out = run_all_one(mode, TGKILL, where)
        assert out == want, (mode, out)


# pidfd_open and pidfd_send_signal of a sibling placed elsewhere, at home: its pid is
# its deputy's, a process of this kernel, which forwards the signal and ends with it.
PIDFD_PY = r"""import os, select, signal, subprocess, sys
p = subprocess.Popen(["sleep", "60"])
fd = os.pidfd_open(p.pid)
print("readable before:", bool(select.select([fd], [], [], 0)[0]))
signal.pidfd_send_signal(fd, signal.SIGTERM)
print("readable once it ended:", bool(select.select([fd], [], [], 60)[0]))
print("its status:", p.wait())
"""


def test_pidfd_of_a_sibling_elsewhere_at_home(tmp_path: Path) -> None:
    (tmp_path / "pidfd.py").write_text(PIDFD_PY)
    want = "readable before: False\nreadable once it ended: True\nits status: -15\n"
    for mode in MODES:
        assert run_at_home(mode, "pidfd.py", tmp_path) == want, mode


# The same for an SA_SIGINFO handler (the signal is delivered, not waited for: the
# receiving tracer rewrites it at its delivery stop).
HANDLER_C = r"""
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <unistd.h>
static volatile sig_atomic_t got, sender;
static void on_usr1(int sig, siginfo_t *info, void *ctx) { sender = info->si_pid; got = sig; }
int main(void) {
    struct sigaction sa = {0};
    sa.sa_sigaction = on_usr1;
    sa.sa_flags = SA_SIGINFO;
    sigaction(SIGUSR1, &sa, 0);
    close(open("ready", O_CREAT | O_WRONLY, 0644));
    while (!got) pause();
    printf("USR1 %d\n", (int)sender);
    return 0;
}
"""
HANDLER = r"""
./handler > got & p=$!
until [ -e ready ]; do sleep 0.05; done
sh -c 'echo "USR1 $$" > want; kill -USR1 $1' _ $p
wait $p
cmp want got && echo "the handler names its sender"
"""


def test_a_signal_handler_across_instances_sees_its_sender(tmp_path: Path) -> None:
    cc = shutil.which("cc")
    if cc is None:
        pytest.skip("no C compiler (cc) to build the SA_SIGINFO receiver")
    (tmp_path / "handler.c").write_text(HANDLER_C)
    subprocess.run([cc, "-O", "-o", tmp_path / "handler", tmp_path / "handler.c"], check=True)
    for mode in MODES:
        where = tmp_path / mode
        where.mkdir()
        shutil.copy(tmp_path / "handler", where / "handler")
        out = run_all_one(mode, HANDLER, where)
        assert out == "the handler names its sender\n", (mode, out, (where / "got").read_text())


# A pid forked on an instance (no home pid: reached through the OSS) gets its signals
# with their senders too: a shell placed elsewhere, then the home shell.
FORKED_RECV_PY = r"""import os, signal
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1, signal.SIGUSR2})
child = os.fork()
if child == 0:
    for _ in range(2):
        info = signal.sigwaitinfo({signal.SIGUSR1, signal.SIGUSR2})
        print(signal.Signals(info.si_signo).name[3:], info.si_pid, flush=True)
    os._exit(0)
with open("child.tmp", "w") as f:
    f.write(str(child))
os.rename("child.tmp", "child.pid")
os.waitpid(child, 0)
"""
FORKED_SENDERS = r"""
python3 recv.py > got & p=$!
until [ -s child.pid ]; do sleep 0.05; done
sh -c 'echo "USR1 $$" > want; kill -USR1 $(cat child.pid)'
until [ -s got ]; do sleep 0.05; done
echo "USR2 $$" >> want; kill -USR2 $(cat child.pid)
wait $p
cmp want got && echo "each signal names its sender"
"""


def test_a_signal_to_a_forked_pid_elsewhere_names_its_sender(tmp_path: Path) -> None:
    for mode in MODES:
        where = tmp_path / mode
        where.mkdir()
        (where / "recv.py").write_text(FORKED_RECV_PY)
        out = run_all_one(mode, FORKED_SENDERS, where)
        assert out == "each signal names its sender\n", (mode, out, (where / "got").read_text())


# A sender forked on an instance (no home pid: the signal goes home through its
# session root's deputy) is named as itself, not as that root: the placed receiver
# and a home one (the shell's own child, a subshell that stays home) both see it.
FORKED_SENDER_PY = r"""import os, signal, sys
child = os.fork()
if child == 0:
    with open(sys.argv[2], "w") as f:
        f.write(f"{sys.argv[3]} {os.getpid()}\n")
    os.kill(int(sys.argv[1]), getattr(signal, "SIG" + sys.argv[3]))
    os._exit(0)
os.waitpid(child, 0)
print("the sender is not its parent:", child != os.getpid(), flush=True)
"""
FORKED_SENDER = r"""
python3 recv.py > got & p=$!
until [ -e ready ]; do sleep 0.05; done
python3 sender.py $p want USR1
python3 sender.py $p want.2 USR2
cat want.2 >> want
wait $p
cut -d' ' -f1,2 got | cmp - want && echo "each signal names its forked sender"
"""


def test_a_signal_from_a_process_forked_elsewhere_names_it(tmp_path: Path) -> None:
    want = "the sender is not its parent: True\n" * 2 + "each signal names its forked sender\n"
    for mode in MODES:
        where = tmp_path / mode
        where.mkdir()
        (where / "recv.py").write_text(RECV_PY)
        (where / "sender.py").write_text(FORKED_SENDER_PY)
        out = run_all_one(mode, FORKED_SENDER, where)
        assert out == want, (mode, out, (where / "got").read_text())


# /proc/PID and `ps -p PID` of a sibling held elsewhere, read on an instance: the
# `sleep` is placed on one instance, the shell that inspects it on another (and its
# cat, grep, cut, ps and python3 on others still: they read through that shell's
# instance).  What they find is what the home shell finds with its builtins (once
# the sleep sleeps), and ps pads the pid as home's pid_max says; once the sleep is
# gone, nothing.
PROC_ELSEWHERE = r"""
sleep 60 & p=$!
pid_max=$(cat /proc/sys/kernel/pid_max)
stat=
until [ "${stat#* (sleep) S }" != "$stat" ]; do sleep 0.05; read stat < /proc/$p/stat; done
echo "$stat" | cut -d' ' -f1-4 > home.stat
sh -c '
test -d /proc/$1 && echo "test -d: a directory"
line=$(ps -o pid=,comm= -p $1); echo "ps: $?"
[ "$line" = "$(printf "%${#2}s sleep" $1)" ] && echo "ps -o pid=,comm=: the sleep"
cat /proc/$1/comm
tr "\0" "," < /proc/$1/cmdline; echo
grep -E "^(Name|Pid|PPid):" /proc/$1/status | cut -f2 | tr "\n" " " > status
[ "$(cat status)" = "sleep $1 $3 " ] && echo "status: Name, Pid, PPid"
cut -d" " -f1-4 /proc/$1/stat | cmp -s - home.stat && echo "stat: as at home"
python3 -c "import os, sys; print(\"python isdir:\", os.path.isdir(\"/proc/\" + sys.argv[1]))" $1
' _ $p $pid_max $$
kill $p; wait $p
sh -c 'test -d /proc/$1 || echo "gone: no directory"; ps -o pid=,comm= -p $1; echo "ps: $?"' _ $p
"""
PROC_ELSEWHERE_WANT = """\
test -d: a directory
ps: 0
ps -o pid=,comm=: the sleep
sleep
sleep,60,
status: Name, Pid, PPid
stat: as at home
python isdir: True
gone: no directory
ps: 1
"""


def test_proc_and_ps_of_a_sibling_elsewhere_on_an_instance(tmp_path: Path) -> None:
    for mode in [*MODES, *NO_MAPS]:
        where = tmp_path / mode
        where.mkdir()
        assert run_all_one(mode, PROC_ELSEWHERE, where) == PROC_ELSEWHERE_WANT, mode


# A background job killed by the shell, then waited for: dash says `Terminated` on
# stderr and `wait` gives 143, as natively, whether the job ran home or on an instance
# (its deputy dies by the signal its process died by).
KILL_WAIT = 'sleep 10 & p=$!; sleep 0.3; kill $p; wait $p; echo "st=$?"; sleep 10 & kill $!; wait'


def test_a_killed_background_job_is_reported_as_natively() -> None:
    said = {}
    for mode, prefix in MODES.items():
        argv = [*prefix, "--", "dash", "-c", KILL_WAIT] if prefix else ["dash", "-c", KILL_WAIT]
        res = subprocess.run(argv, capture_output=True, env=traced_env(), timeout=120)
        err = [ln for ln in res.stderr.decode().splitlines() if not ln.startswith("dcptrace:")]
        said[mode] = (res.stdout.decode(), err, res.returncode)
    assert said["native"][0] == "st=143\n", said["native"]
    assert said["plain"] == said["native"], said
    assert said["spread"] == said["native"], said
