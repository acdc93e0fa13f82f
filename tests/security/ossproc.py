"""A real `dcp-oss serve` for the attacks: started as root, stopped and cleaned up after.

The data directory sits in a directory anyone may traverse (0755), as a
`/var/lib/dcp` would: only the data directory's own mode keeps others out.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent.parent


def oss_argv(*args: str) -> list[str]:
    """The dcp-oss command line from this checkout."""
    return [sys.executable, "-m", "oss", *args]


def oss_env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(REPO))


@dataclass
class Reply:
    status: int
    body: Any
    raw: bytes


class OssProcess:
    """`dcp-oss serve` on loopback over a fresh data directory."""

    def __init__(self, *serve_args: str, log_level: str = "INFO") -> None:
        self.root = Path(tempfile.mkdtemp(prefix="dcp-sec-"))
        self.root.chmod(0o755)  # traversable by anyone: the data dir must protect itself
        self.data = self.root / "data"
        self.log_path = self.root / "oss.log"
        self.admin = self.cli("account", "create", "--admin", "root")
        self.proc: subprocess.Popen[bytes] | None = None
        self._log = open(self.log_path, "wb")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(
            oss_argv("--log-level", log_level, "serve", "--listen", "127.0.0.1:0",
                     "--data", str(self.data), *serve_args),
            env=oss_env(), stdout=subprocess.PIPE, stderr=self._log,
        )  # fmt: skip
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().decode()
        if "listening on " not in line:
            self.stop()
            log = self.log_path.read_text(errors="replace")
            self.cleanup()
            raise AssertionError(f"dcp-oss serve did not start: {line}{log}")
        self.url = line.split("listening on ", 1)[1].strip()
        self.port = int(self.url.rsplit(":", 1)[1])

    def cli(self, *args: str) -> str:
        """Run `dcp-oss ARGS --data DATA`; its stdout (a token)."""
        sub, rest = args[0], list(args[1:])
        if sub == "account":
            argv = oss_argv("account", rest[0], "--data", str(self.data), *rest[1:])
        else:
            argv = oss_argv(sub, "--data", str(self.data), *rest)
        out = subprocess.run(argv, env=oss_env(), capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        return out.stdout.strip()

    def account(self, name: str) -> str:
        """A new tenant account's token."""
        return str(self.http("POST", "/v1/accounts", self.admin, {"name": name}).body["token"])

    def http(self, method: str, path: str, token: str | None = None, body: Any = None) -> Reply:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method)
        if token:
            req.add_header("Authorization", f"Bearer {token}")
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                raw = resp.read()
                status = resp.status
        except urllib.error.HTTPError as exc:
            raw, status = exc.read(), exc.code
        try:
            parsed = json.loads(raw)
        except ValueError:
            parsed = None
        return Reply(status, parsed, raw)

    def rss_bytes(self) -> int:
        """The server's resident set size."""
        assert self.proc is not None
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS")

    def metric(self, name: str) -> float:
        """One unlabelled sample of the admin Prometheus exposition."""
        text = self.http("GET", "/metrics", self.admin).raw.decode()
        for line in text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        raise AssertionError(f"{name} not exposed")

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()
        self._log.close()

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)
