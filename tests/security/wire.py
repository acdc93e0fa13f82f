"""What the attacker scripts share: an exec-protocol client re-implemented from the
wire format (stdlib only, pasted in front of each script), and a real agent to attack.

The client speaks both the current handshake (AUTH/CHALLENGE/PROOF, tickets
`v2.…`) and the old one (HELLO carrying a `v1.…` ticket right after MAGIC), so
each attack also shows what it would have got from the old agent.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from oss.compute import exectickets  # noqa: E402
from tests.conftest import secret_file  # noqa: E402

CLIENT = r'''
import hashlib, hmac, json, os, re, socket, struct, sys, time

MAGIC = b"DCPX"
HDR = struct.Struct("!BIIQ")
HELLO, RESUME, WELCOME, DATA, EOF, STARTED, EXIT, ERROR = 1, 2, 3, 4, 5, 7, 8, 10
AUTH, CHALLENGE, PROOF = 13, 14, 15


def frame(kind, payload=b"", fd=0, seq=0):
    return HDR.pack(kind, fd, len(payload), seq) + payload


def record(items):
    return b"".join(struct.pack("!I", len(i)) + i for i in items)


def unrecord(data):
    out, pos = [], 0
    while pos + 4 <= len(data):
        (n,) = struct.unpack_from("!I", data, pos)
        out.append(data[pos + 4 : pos + 4 + n])
        pos += 4 + n
    return out


def pairs(d):
    flat = []
    for k, v in d.items():
        flat += [k, v]
    return record(flat)


def connect(addr, timeout=10.0):
    host, _, port = addr.rpartition(":")
    s = socket.create_connection((host.strip("[]"), int(port)), timeout=timeout)
    return s


def read_frames(s, until=(EXIT, ERROR), limit=1 << 20):
    """Frames until one of `until` or EOF: [(kind, fd, payload)]."""
    buf, out = b"", []
    while True:
        try:
            chunk = s.recv(65536)
        except OSError:
            chunk = b""
        if not chunk:
            return out
        buf += chunk
        while len(buf) >= HDR.size:
            kind, fd, n, seq = HDR.unpack_from(buf)
            if len(buf) < HDR.size + n:
                break
            out.append((kind, fd, buf[HDR.size : HDR.size + n]))
            buf = buf[HDR.size + n :]
            if kind in until:
                return out
        if len(buf) > limit:
            return out


def digest(path, argv):
    h = hashlib.sha256()
    for item in [path, *argv]:
        h.update(len(item).to_bytes(4, "big"))
        h.update(item)
    return h.hexdigest()


EMPTY_VIEW = "@EMPTY_VIEW@"


def mint_v2(key, instance, path, argv, uid=0, gid=0, ttl=20, kind="i", program="-",
            view=EMPTY_VIEW):
    """A current-format ticket (v3 since issue 10: + program and view digest)."""
    now = int(time.time() * 1000)
    public = ".".join(["v3", kind, os.urandom(12).hex(), str(now), str(now + ttl * 1000),
                       str(uid), str(gid), "-", digest(path, argv), program, view])
    t = hmac.new(key.encode(), (public + "." + instance).encode(), hashlib.sha256).hexdigest()
    return public + "." + t


def mint_v1(key, instance, ttl=300):
    body = "v1.%s.%d" % (os.urandom(12).hex(), int(time.time() + ttl))
    return body + "." + hmac.new(key.encode(), (body + "." + instance).encode(),
                                 hashlib.sha256).hexdigest()


def hello(path, argv, uid=None, gid=None, extra=None, ticket=None):
    fields = {b"path": path, b"argv": record(argv), b"env": record([b"PATH=/usr/bin:/bin"]),
              b"cwd": b"/", b"fds": record([record([b"1", b"out", b"", b"1", b"0"])])}
    if uid is not None:
        fields[b"uid"] = str(uid).encode()
    if gid is not None:
        fields[b"gid"] = str(gid).encode()
    if ticket is not None:
        fields[b"ticket"] = ticket.encode()
    fields.update(extra or {})
    return pairs(fields)


def handshake(s, ticket):
    """v2: prove we hold T; None if the agent's proof checks out, else why not."""
    public, _, secret = ticket.rpartition(".")
    c1 = os.urandom(16)
    s.sendall(MAGIC + frame(AUTH, record([public.encode(), c1])))
    got = read_frames(s, until=(CHALLENGE, ERROR))
    if not got or got[-1][0] != CHALLENGE:
        return "refused: " + (got[-1][2].decode(errors="replace") if got else "closed")
    mine, c2 = unrecord(got[-1][2])
    want = hmac.new(secret.encode(), b"agent" + c1, hashlib.sha256).digest()
    if not hmac.compare_digest(mine, want):
        return "agent proof wrong"
    s.sendall(frame(PROOF, record([hmac.new(secret.encode(), b"deputy" + c2,
                                            hashlib.sha256).digest()])))
    return None


def outcome(frames):
    """(stdout bytes, error message or None, exit record or None)."""
    out, err, ex = b"", None, None
    for kind, fd, payload in frames:
        if kind == DATA and fd == 1:
            out += payload
        elif kind == ERROR:
            err = payload.decode(errors="replace")
        elif kind == EXIT:
            ex = payload
    return out, err, ex


def run_v2(addr, ticket, path, argv, uid=None, gid=None, extra=None):
    """Run `path argv` with a v2 ticket: (stdout, error)."""
    try:
        s = connect(addr)
    except OSError as exc:
        return b"", "connect: %s" % exc
    with s:
        try:
            why = handshake(s, ticket)
            if why is not None:
                return b"", why
            s.sendall(frame(HELLO, hello(path, argv, uid, gid, extra)))
            out, err, _ = outcome(read_frames(s))
            return out, err
        except OSError as exc:
            return b"", "io: %s" % exc


def run_v1(addr, ticket, path, argv, uid=0, gid=0):
    """The old protocol: HELLO with the ticket right after MAGIC."""
    try:
        with connect(addr) as s:
            s.sendall(MAGIC + frame(HELLO, hello(path, argv, uid, gid, ticket=ticket)))
            out, err, _ = outcome(read_frames(s))
            return out, err
    except OSError as exc:
        return b"", "io: %s" % exc
'''


# The scripts cannot import the repo: the digest of the empty view is pasted in.
CLIENT = CLIENT.replace("@EMPTY_VIEW@", exectickets.EMPTY_VIEW, 1)
ENV = dict(os.environ, PYTHONPATH=str(ROOT))


class RealAgent:
    """A stand-alone `dcp-agent` run as root on loopback (the component under attack)."""

    def __init__(self, token: str, name: str = "sec0") -> None:
        self.token = token
        self.name = name
        self.proc: subprocess.Popen[bytes] | None = None
        self.address = ""
        self.log = ""

    def start(self) -> None:
        token_file = secret_file(self.token)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "vmagent", "--instance", self.name,
             "--token-file", token_file, "--listen", "127.0.0.1:0", "-v"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV,
        )  # fmt: skip
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().decode()
        os.unlink(token_file)  # read before the agent listens
        assert line.startswith("listening "), line
        self.address = line.split()[1]

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stderr is not None:
            self.log += self.proc.stderr.read().decode(errors="replace")
        self.proc = None

    def rss_kb(self) -> int:
        assert self.proc is not None
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        raise AssertionError("no VmRSS")

    def get(self, path: str, token: str | None = None) -> bytes:
        req = urllib.request.Request(f"http://{self.address}{path}")
        if token:
            req.add_header("Authorization", f"Bearer {token}")
        with urllib.request.urlopen(req, timeout=10) as resp:
            return bytes(resp.read())


@contextmanager
def real_agent(token: str, name: str = "sec0") -> Iterator[RealAgent]:
    agent = RealAgent(token, name)
    agent.start()
    try:
        yield agent
    finally:
        agent.stop()


HARVEST = (
    CLIENT
    + r"""
# The attacker: poll every process's cmdline and environ while a victim runs,
# then try everything found against every agent seen, as soon as it is seen.
stop, done, seconds, root = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4]
# Only the victim's processes (descendants of `root`): other runs on this machine
# are not this test's business.
parents = {}


def ppid(pid):
    if pid not in parents:
        try:
            with open("/proc/%s/stat" % pid, "rb") as f:
                parents[pid] = f.read().rsplit(b")", 1)[1].split()[1].decode()
        except (OSError, IndexError):
            parents[pid] = "0"
    return parents[pid]


def mine(pid):
    for _ in range(64):
        if pid == root:
            return True
        if pid in ("0", "1", ""):
            return False
        pid = ppid(pid)
    return False

TOKENISH = re.compile(rb"[A-Za-z0-9_\-\.]{20,}")
agents, candidates, tried = set(), set(), set()
ticket_files, ticket_files_read, environ_read = set(), 0, 0
cmdlines = set()
wins = []


def harvest():
    global ticket_files_read, environ_read
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid() or not mine(pid):
            continue
        try:
            with open("/proc/%s/cmdline" % pid, "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        cmdlines.add(b" ".join(argv)[:300])
        for i, a in enumerate(argv):
            if a == b"--agent" and i + 1 < len(argv):
                agents.add(argv[i + 1].decode())
            if a == b"--ticket-file" and i + 1 < len(argv):
                ticket_files.add(argv[i + 1])
                try:
                    with open(argv[i + 1], "rb") as f:
                        candidates.add(f.read().strip())
                    ticket_files_read += 1
                except OSError:
                    pass
            candidates.update(TOKENISH.findall(a))
        try:
            with open("/proc/%s/environ" % pid, "rb") as f:
                env = f.read()
            environ_read += 1
            candidates.update(TOKENISH.findall(env))
        except OSError:
            pass


def try_all():
    for addr in list(agents):
        for cand in list(candidates):
            if (addr, cand) in tried:
                continue
            tried.add((addr, cand))
            c = cand.decode(errors="replace")
            # 1. as the agent's bearer token
            try:
                req = urllib.request.Request("http://%s/v1/sessions" % addr,
                                             headers={"Authorization": "Bearer " + c})
                if urllib.request.urlopen(req, timeout=5).status == 200:
                    wins.append(("bearer", addr, c))
            except Exception:
                pass
            # 2. as a ticket, as it is (new and old protocol)
            if c.startswith(("v2.", "v3.")) and c.count(".") in (9, 11):
                try:
                    with connect(addr) as s:
                        if handshake(s, c) is None:  # we hold a working T
                            wins.append(("v2 ticket", addr, c))
                except OSError:
                    pass
            if c.startswith("v1.") and c.count(".") == 3:
                out, err = run_v1(addr, c, b"/usr/bin/id", [b"/usr/bin/id", b"-u"])
                if out.strip() == b"0":
                    wins.append(("v1 ticket", addr, c))
            # 3. as the instance token: mint our own root ticket
            for inst in instances:
                argv = [b"/usr/bin/id", b"-u"]
                t = mint_v2(c, inst, argv[0], argv)
                out, err = run_v2(addr, t, argv[0], argv)
                if out.strip() == b"0" or err is None:
                    wins.append(("minted v2", addr, inst, out.decode(errors="replace"), err))
                out, err = run_v1(addr, mint_v1(c, inst), argv[0], argv)
                if out.strip() == b"0":
                    wins.append(("minted v1", addr, inst))


import urllib.request
instances = set()
deadline = time.monotonic() + seconds
while time.monotonic() < deadline:
    harvest()
    for line in cmdlines:
        parts = line.split(b" ")
        for i, a in enumerate(parts):
            if a == b"--instance" and i + 1 < len(parts):
                instances.add(parts[i + 1].decode())
    try_all()
    if os.path.exists(stop):
        harvest()
        try_all()
        break
open(done, "w").close()
print(json.dumps({
    "agents": sorted(agents), "instances": sorted(instances), "candidates": len(candidates),
    "tried": len(tried), "ticket_files": len(ticket_files),
    "ticket_files_read": ticket_files_read, "environ_read": environ_read,
    "agent_cmdlines": sorted(l.decode(errors="replace") for l in cmdlines if b"vmagent" in l),
    "wins": wins,
}))
"""
)


def victim_script(shared: Path, execs: int) -> str:
    """`execs` placed /bin/echo runs, then tell the attacker and wait (bounded) for it."""
    stop, done = shared / "stop", shared / "done"
    wait = (
        f'import os, time\nfor _ in range(1200):\n    if os.path.exists("{done}"): break\n'
        "    time.sleep(0.1)\n"
    )
    return (
        f"for i in $(seq {execs}); do /bin/echo ok-$i; done; : > {stop}; "
        f"/usr/bin/python3 -I -c '{wait}'"
    )
