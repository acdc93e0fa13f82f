"""The embedded coordinator, fed SyscallCall values as the runner builds them."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from oss.embedded import LOCAL_INSTANCE, EmbeddedCoordinator, shebang
from oss.storage.pathmap import PathMap
from tracer.arch import table_for
from tracer.coordinator import (
    Allow,
    Complete,
    Coordinator,
    ProcessEvent,
    ProcessExited,
    ProcessSpawned,
    Rewrite,
    SyscallCall,
)
from tracer.syscalls import by_name

TABLE = table_for("x86_64")
NAMES = by_name(TABLE)
AT_FDCWD = 0xFFFFFFFFFFFFFF9C  # -100 as the register holds it
BUF = 0x7FFE0000
# Real prefixes that do not exist, so the real readlink used for '..' finds nothing.
MAP = {"/data": "/nonexistent-dcp-unit/data", "/data/hot": "/nonexistent-dcp-unit/hot"}
REAL = b"/nonexistent-dcp-unit/data"


def call(name: str, args: tuple[int, ...] = (0,) * 6, **kw: object) -> SyscallCall:
    return SyscallCall(
        pid=10,
        tid=11,
        nr=NAMES[name].nr,
        name=name,
        args=args + (0,) * (6 - len(args)),
        **kw,  # type: ignore[arg-type]
    )


@pytest.fixture
def coord() -> EmbeddedCoordinator:
    return EmbeddedCoordinator(TABLE, PathMap(MAP))


def test_is_a_coordinator() -> None:
    c: Coordinator = EmbeddedCoordinator(TABLE)
    assert c.instance_of(1) == LOCAL_INSTANCE


# ---- without a map ------------------------------------------------------------


@pytest.mark.parametrize("pathmap", [None, PathMap({})])
def test_no_map_intercepts_nothing_and_allows(pathmap: PathMap | None) -> None:
    c = EmbeddedCoordinator(TABLE, pathmap)
    assert c.interception() == frozenset()
    assert c.on_syscall(call("openat", (AT_FDCWD, BUF), paths={1: b"/data/f"})) == Allow()
    assert c.on_syscall(call("getcwd", (BUF, 4096), cwd=b"/srv")) == Allow()
    assert c.on_syscall(call("readlink", (BUF, BUF, 64), paths={0: b"/x"})) == Allow()


# ---- interception -------------------------------------------------------------


def test_interception_covers_every_path_and_target_call(coord: EmbeddedCoordinator) -> None:
    names = coord.interception()
    named = {"target", "sockaddr", "sockaddr_out"}
    expected = {s.name for s in TABLE.values() if s.path_args() or named & set(s.args)}
    expected |= {"getcwd"}
    # ...and the calls that would get around the map, which are refused.
    assert names == expected | {"io_uring_setup", "open_by_handle_at"}
    assert names <= NAMES.keys()  # the runner rejects unknown names


@pytest.mark.parametrize("name", ["io_uring_setup", "open_by_handle_at"])
def test_calls_around_the_map_get_enosys(coord: EmbeddedCoordinator, name: str) -> None:
    assert coord.on_syscall(call(name)) == Complete(-errno.ENOSYS)


def test_nothing_is_refused_without_a_map() -> None:
    plain = EmbeddedCoordinator(TABLE)
    assert plain.interception() == frozenset()
    assert plain.on_syscall(call("io_uring_setup")) == Allow()


@pytest.mark.parametrize(
    "name",
    ["open", "openat", "openat2", "execve", "execveat", "stat", "newfstatat", "statx",
     "rename", "renameat2", "link", "linkat", "symlink", "symlinkat", "readlink",
     "readlinkat", "chdir", "mkdir", "unlink", "unlinkat", "truncate", "getcwd"],
)  # fmt: skip
def test_interception_includes(coord: EmbeddedCoordinator, name: str) -> None:
    assert name in coord.interception()


@pytest.mark.parametrize("name", ["read", "write", "close", "fstat", "getpid", "mmap", "fchdir"])
def test_interception_excludes_fd_calls(coord: EmbeddedCoordinator, name: str) -> None:
    assert name not in coord.interception()


# ---- rewriting paths ----------------------------------------------------------


def test_openat_rewrites_arg_1(coord: EmbeddedCoordinator) -> None:
    d = coord.on_syscall(call("openat", (AT_FDCWD, BUF, 0), paths={1: b"/data/f"}))
    assert d == Rewrite({1: REAL + b"/f"}, observe_result=False)


def test_longest_prefix_applies(coord: EmbeddedCoordinator) -> None:
    d = coord.on_syscall(call("open", (BUF,), paths={0: b"/data/hot/x"}))
    assert d == Rewrite({0: b"/nonexistent-dcp-unit/hot/x"})


def test_unmapped_path_is_allowed(coord: EmbeddedCoordinator) -> None:
    assert coord.on_syscall(call("openat", (AT_FDCWD, BUF), paths={1: b"/etc/x"})) == Allow()
    assert coord.on_syscall(call("openat", (AT_FDCWD, BUF), paths={1: b"/database"})) == Allow()


def test_relative_path_uses_its_base(coord: EmbeddedCoordinator) -> None:
    d = coord.on_syscall(call("openat", (3, BUF), paths={1: b"sub/f"}, bases={1: REAL + b"/dir"}))
    assert d == Rewrite({1: REAL + b"/dir/sub/f"})
    # The same relative path against an unmapped directory is left alone.
    d = coord.on_syscall(call("openat", (3, BUF), paths={1: b"sub/f"}, bases={1: b"/home"}))
    assert d == Allow()


def test_relative_path_leaving_the_mapped_cwd(coord: EmbeddedCoordinator) -> None:
    d = coord.on_syscall(call("open", (BUF,), paths={0: b"../etc/hosts"}, bases={0: REAL}))
    assert d == Rewrite({0: b"/etc/hosts"})


def test_renameat2_rewrites_both_paths(coord: EmbeddedCoordinator) -> None:
    d = coord.on_syscall(
        call(
            "renameat2",
            (AT_FDCWD, BUF, AT_FDCWD, BUF + 64),
            paths={1: b"/data/a", 3: b"/data/hot/b"},
        )
    )
    assert d == Rewrite({1: REAL + b"/a", 3: b"/nonexistent-dcp-unit/hot/b"})


def test_rename_rewrites_only_the_mapped_path(coord: EmbeddedCoordinator) -> None:
    d = coord.on_syscall(call("rename", (BUF, BUF + 64), paths={0: b"/tmp/a", 1: b"/data/b"}))
    assert d == Rewrite({1: REAL + b"/b"})


def test_symlinkat_stores_the_target_as_given(coord: EmbeddedCoordinator) -> None:
    # As under a bind mount: the link holds /data/t, followed in the view later.
    d = coord.on_syscall(
        call("symlinkat", (BUF, AT_FDCWD, BUF + 64), paths={0: b"/data/t", 2: b"/data/l"})
    )
    assert d == Rewrite({2: REAL + b"/l"})


def test_symlink_relative_target_is_kept(coord: EmbeddedCoordinator) -> None:
    # A relative target resolves where the link lives, in the real tree too.
    d = coord.on_syscall(call("symlink", (BUF, BUF + 64), paths={0: b"t", 1: b"/data/l"}))
    assert d == Rewrite({1: REAL + b"/l"})
    d = coord.on_syscall(call("symlink", (BUF, BUF + 64), paths={0: b"/data/t", 1: b"/tmp/l"}))
    assert d == Allow()


def test_relative_target_is_never_resolved_against_a_directory(
    coord: EmbeddedCoordinator,
) -> None:
    # Even with a known (mapped) base, a target is stored content, not a lookup.
    d = coord.on_syscall(
        call("symlink", (BUF, BUF + 64), paths={0: b"sub/t", 1: b"/tmp/l"}, bases={0: REAL})
    )
    assert d == Allow()


def test_path_already_real_is_not_rewritten(coord: EmbeddedCoordinator) -> None:
    assert coord.on_syscall(call("open", (BUF,), paths={0: REAL + b"/f"})) == Allow()


@pytest.mark.parametrize("name", ["mq_open", "mq_unlink"])
def test_message_queue_names_are_not_paths(coord: EmbeddedCoordinator, name: str) -> None:
    # "/data" names a POSIX message queue, not a file: a rewritten name with more
    # slashes makes mq_open fail with EACCES.  The paths are those the runner
    # reads: the spec's path arguments only.
    paths = {i: b"/data" for i, _ in NAMES[name].path_args()}
    assert coord.on_syscall(call(name, (BUF,), paths=paths)) == Allow()


# ---- getcwd -------------------------------------------------------------------


def test_getcwd_in_mapped_dir_completes_with_virtual_path(coord: EmbeddedCoordinator) -> None:
    d = coord.on_syscall(call("getcwd", (BUF, 4096), cwd=REAL + b"/sub"))
    assert d == Complete(len(b"/data/sub") + 1, ((BUF, b"/data/sub\0"),))


def test_getcwd_buffer_exactly_large_enough(coord: EmbeddedCoordinator) -> None:
    size = len(b"/data/sub") + 1
    d = coord.on_syscall(call("getcwd", (BUF, size), cwd=REAL + b"/sub"))
    assert isinstance(d, Complete) and d.result == size


@pytest.mark.parametrize("size", [0, 1, len(b"/data/sub")])
def test_getcwd_buffer_too_small_is_erange(coord: EmbeddedCoordinator, size: int) -> None:
    d = coord.on_syscall(call("getcwd", (BUF, size), cwd=REAL + b"/sub"))
    assert d == Complete(-errno.ERANGE)


def test_getcwd_outside_mapping_runs_natively(coord: EmbeddedCoordinator) -> None:
    assert coord.on_syscall(call("getcwd", (BUF, 4096), cwd=b"/home/u")) == Allow()
    assert coord.on_syscall(call("getcwd", (BUF, 4096), cwd=None)) == Allow()


# ---- readlink and on_result ---------------------------------------------------


@pytest.mark.parametrize(("name", "path_index"), [("readlink", 0), ("readlinkat", 1)])
def test_readlink_observes_only_procs_magic_links(
    coord: EmbeddedCoordinator, name: str, path_index: int
) -> None:
    # A stored link reads back as stored (bind mount); /proc's show real paths.
    d = coord.on_syscall(call(name, paths={path_index: b"/etc/alternatives/x"}))
    assert d == Allow()
    d = coord.on_syscall(call(name, paths={path_index: b"/data/l"}))
    assert d == Rewrite({path_index: REAL + b"/l"})
    d = coord.on_syscall(call(name, paths={path_index: b"/proc/self/fd/3"}))
    assert d == Allow(observe_result=True)


def test_on_result_maps_real_target_back_to_virtual(coord: EmbeddedCoordinator) -> None:
    c = call("readlink", (BUF, BUF + 128, 4096), paths={0: b"/data/l"})
    out = REAL + b"/target"
    assert coord.on_result(c, len(out), out) == Complete(
        len(b"/data/target"), ((BUF + 128, b"/data/target"),)
    )


def test_readlinkat_result_uses_its_own_buffer_and_size(coord: EmbeddedCoordinator) -> None:
    out = REAL + b"/t"
    c = call("readlinkat", (AT_FDCWD, BUF, BUF + 256, 4096), paths={1: b"/data/l"})
    assert coord.on_result(c, len(out), out) == Complete(7, ((BUF + 256, b"/data/t"),))
    c = call("readlinkat", (AT_FDCWD, BUF, BUF + 256, 6), paths={1: b"/data/l"})
    assert coord.on_result(c, len(out), out) == Complete(6, ((BUF + 256, b"/data/"),))


def test_on_result_when_the_real_target_did_not_fit(tmp_path: Path) -> None:
    # The virtual target (12 bytes) fits the program's 12-byte buffer, but the
    # kernel filled it with the first 12 bytes of the longer real target.
    real = tmp_path / "data"
    real.mkdir()
    (real / "l").symlink_to(real / "target")
    coord = EmbeddedCoordinator(TABLE, PathMap({"/data": str(real)}))
    c = call("readlink", (BUF, BUF + 128, 12), paths={0: b"/data/l"})
    truncated = str(real / "target").encode()[:12]
    assert coord.on_result(c, 12, truncated) == Complete(12, ((BUF + 128, b"/data/target"),))


@pytest.mark.parametrize("size", [1, 5, 11, 12, 100])
def test_on_result_truncates_to_the_buffer(coord: EmbeddedCoordinator, size: int) -> None:
    c = call("readlink", (BUF, BUF + 128, size), paths={0: b"/data/l"})
    out = REAL + b"/target"
    done = coord.on_result(c, min(size, len(out)), out)
    assert done is not None
    virtual = b"/data/target"
    assert done.result == min(size, len(virtual))
    assert done.writes == ((BUF + 128, virtual[:size]),)
    assert len(done.writes[0][1]) <= size


@pytest.mark.parametrize("output", [None, b"relative/t", b"/etc/t", b"/nonexistent-dcp-unitx/t"])
def test_on_result_leaves_other_outputs(coord: EmbeddedCoordinator, output: bytes | None) -> None:
    c = call("readlink", (BUF, BUF + 128, 4096), paths={0: b"/tmp/l"})
    assert coord.on_result(c, -errno.EINVAL if output is None else len(output), output) is None


# ---- bookkeeping --------------------------------------------------------------


def test_instance_of_is_local(coord: EmbeddedCoordinator) -> None:
    assert {coord.instance_of(pid) for pid in (1, 10, 99999)} == {"local"}


def test_on_process_keeps_events_in_order(coord: EmbeddedCoordinator) -> None:
    events: list[ProcessEvent] = [ProcessSpawned(2, 1, False), ProcessExited(2, 0, None)]
    for e in events:
        coord.on_process(e)
    assert coord.events == events


# ---- issue 14: as under a bind mount ------------------------------------------


@pytest.mark.parametrize(
    ("head", "found"),
    [
        (b"#!/bin/sh\necho", (b"/bin/sh", None)),
        (b"#! /usr/bin/env  python3 -u \n", (b"/usr/bin/env", b"python3 -u")),
        (b"#!\t/bin/bash\t-e\n", (b"/bin/bash", b"-e")),
        (b"#!\n", None),
        (b"\x7fELF", None),
    ],
)
def test_shebang_splits_as_binfmt_script(head: bytes, found: tuple[bytes, bytes | None]) -> None:
    assert shebang(head) == found


def test_a_mapped_script_runs_as_its_interpreter_with_the_path_it_was_named_by(
    tmp_path: Path,
) -> None:
    (tmp_path / "s.sh").write_text("#!/bin/sh -e\necho\n")
    (tmp_path / "s.sh").chmod(0o755)
    (tmp_path / "plain").write_text("#!/bin/sh\n")  # not executable: the kernel refuses
    c = EmbeddedCoordinator(TABLE, PathMap({"/v": str(tmp_path)}))
    d = c.on_syscall(call("execve", paths={0: b"/v/s.sh"}, argv=(b"s", b"x")))
    assert d == Rewrite({0: b"/bin/sh", 1: (b"/bin/sh", b"-e", b"/v/s.sh", b"x")})
    d = c.on_syscall(call("execve", paths={0: b"/v/plain"}, argv=(b"p",)))
    assert d == Rewrite({0: str(tmp_path / "plain").encode()})


def unix(path: bytes) -> bytes:
    return b"\x01\x00" + path


def test_unix_socket_addresses_name_the_real_file(coord: EmbeddedCoordinator) -> None:
    d = coord.on_syscall(call("bind", (3, BUF, 12), paths={1: b"/data/sock"}))
    assert d == Rewrite({1: unix(REAL + b"/sock"), 2: len(REAL) + 8})
    assert coord.on_syscall(call("connect", (3, BUF, 12), paths={1: b"/tmp/s"})) == Allow()
    long = b"/data/" + b"x" * 90  # fits as named, not once mapped
    d = coord.on_syscall(call("connect", (3, BUF, 110), paths={1: long}))
    assert d == Complete(-errno.ENAMETOOLONG)


def test_getsockname_shows_the_path_as_named(coord: EmbeddedCoordinator) -> None:
    c = call("getsockname", (3, BUF, BUF + 512), sizes={1: 110})
    assert coord.on_syscall(c) == Allow(observe_result=True)
    out = unix(REAL + b"/sock\0")
    named = unix(b"/data/sock\0")
    assert coord.on_result(c, 0, out) == Complete(
        0, ((BUF, named), (BUF + 512, len(named).to_bytes(4, "little")))
    )
    small = call("getpeername", (3, BUF, BUF + 512), sizes={1: 4})
    got = coord.on_result(small, 0, out)
    assert got is not None and got.writes[0] == (BUF, named[:4])  # truncated, as the kernel
    assert coord.on_result(c, 0, unix(b"/tmp/other\0")) is None
