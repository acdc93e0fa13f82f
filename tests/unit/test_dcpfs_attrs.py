"""dcpfs's attribute cache never keeps an answer that a change made here overtook.

A stat takes no lock, so it can be in flight while a close publishes the file
(or a truncate, rename, chmod... changes it): its answer may describe the old
file.  It goes to its caller, but the next stat must not be served from it (CI
once saw `os.path.getsize` of a file just written and closed return 0).  The
volume here is a fake (pure logic: the cache's bookkeeping), the races real
threads.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import asyncssh

from vmagent.storage.dcpfs import Dcpfs, FsConfig

T = TypeVar("T")


class Volume:
    """An SFTP client's few calls, over a dict of sizes; `lstat` can be held."""

    def __init__(self) -> None:
        self.sizes = {"/v0/f": 0}
        self.hold = threading.Event()
        self.held = threading.Event()
        self.hold.set()

    async def lstat(self, path: str) -> asyncssh.SFTPAttrs:
        attrs = asyncssh.SFTPAttrs(type=1, size=self.sizes[path], permissions=0o644)
        self.held.set()
        await asyncio.to_thread(self.hold.wait)  # answered, not yet returned
        return attrs

    async def truncate(self, path: str, size: int) -> None:
        self.sizes[path] = size


class Remote:
    def __init__(self, volume: Volume) -> None:
        self.sftp = volume

    def call(self, fn: Callable[[], Awaitable[T]]) -> T:
        return asyncio.run(fn())  # type: ignore[arg-type]


def _fs(tmp_path: Path) -> tuple[Dcpfs, Volume]:
    volume = Volume()
    config = FsConfig(
        name="t", instance="i", server="unix:/nowhere", key="", host_key="",
        mountpoint=str(tmp_path / "mnt"), volumes=1, memory_dir=str(tmp_path),
        disk_dir=str(tmp_path), memory_capacity=None, disk_capacity=None,
    )  # fmt: skip
    return Dcpfs(config, Remote(volume)), volume  # type: ignore[arg-type]


def test_a_stat_overtaken_by_a_change_here_is_answered_but_not_kept(tmp_path: Path) -> None:
    fs, volume = _fs(tmp_path)
    volume.hold.clear()
    answers: list[dict[str, Any]] = []
    stat = threading.Thread(target=lambda: answers.append(fs.getattr("/v0/f")))
    stat.start()
    assert volume.held.wait(10)  # the volume answered size 0; the answer is in flight
    fs.truncate("/v0/f", 5)  # ...and the file changed here before it arrived
    volume.hold.set()
    stat.join(10)
    assert answers == [fs.getattr("/v0/f") | {"st_size": 0}]  # its caller got it
    assert fs.getattr("/v0/f")["st_size"] == 5  # the next stat sees the change


def test_a_stat_started_during_a_change_is_not_kept(tmp_path: Path) -> None:
    fs, volume = _fs(tmp_path)
    with fs._changing("/v0/f"):
        assert fs.getattr("/v0/f")["st_size"] == 0  # asked while the change is made
        volume.sizes["/v0/f"] = 7  # the change lands
    assert fs.getattr("/v0/f")["st_size"] == 7


def test_stats_with_no_change_between_are_served_from_the_cache(tmp_path: Path) -> None:
    fs, volume = _fs(tmp_path)
    assert fs.getattr("/v0/f")["st_size"] == 0
    volume.sizes["/v0/f"] = 9  # changed elsewhere: seen within ATTR_TTL, not at once
    assert fs.getattr("/v0/f")["st_size"] == 0
