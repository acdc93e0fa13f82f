"""strace-like rendering: quoting, results, flags and whole lines through fake tracee readers."""

from __future__ import annotations

import errno
import os
import re
import signal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tracer.arch import table_for
from tracer.decode import (
    ARRAY_LIMIT,
    AT_FDCWD,
    STRING_LIMIT,
    Formatter,
    flags,
    open_flags,
    quote,
    result,
    signed,
)
from tracer.syscalls import by_name

PROPS = settings(max_examples=200, deadline=None, database=None, derandomize=True)
TABLE = table_for("x86_64")
NR = {name: s.nr for name, s in by_name(TABLE).items()}
PID = 42


def c_unquote(text: str) -> tuple[bytes, bool]:
    """Parse a C string literal as strace prints it: (bytes, truncated)."""
    truncated = text.endswith("...")
    if truncated:
        text = text[:-3]
    assert text[0] == '"' and text[-1] == '"', text
    body, out, i = text[1:-1], bytearray(), 0
    simple = {"n": 10, "t": 9, '"': 34, "\\": 92, "r": 13, "v": 11, "f": 12}
    while i < len(body):
        ch = body[i]
        if ch != "\\":
            assert ch != '"', "unescaped quote"
            out.append(ord(ch))
            i += 1
            continue
        nxt = body[i + 1]
        if nxt in simple:
            out.append(simple[nxt])
            i += 2
            continue
        m = re.match(r"[0-7]{1,3}", body[i + 1 :])
        assert m, f"bad escape in {text!r}"
        out.append(int(m.group(0), 8))
        i += 1 + len(m.group(0))
    return bytes(out), truncated


# ---- quote --------------------------------------------------------------------


def test_quote_plain_and_escapes() -> None:
    assert quote(b"hello world") == '"hello world"'
    assert quote(b'say "hi"\\') == '"say \\"hi\\"\\\\"'
    assert quote(b"a\nb\tc") == '"a\\nb\\tc"'
    assert quote(b"\x00\xff") == '"\\0\\377"'
    assert quote(b"") == '""'


def test_quote_truncates_with_ellipsis() -> None:
    data = b"abcdefghij" * 4
    text = quote(data)
    assert text.endswith('"...')
    assert c_unquote(text) == (data[:STRING_LIMIT], True)
    assert quote(data[:STRING_LIMIT]) == '"' + data[:STRING_LIMIT].decode() + '"'
    assert quote(b"abcdef", limit=3) == '"abc"...'


@PROPS
@given(st.binary(max_size=48))
def test_quote_round_trips(data: bytes) -> None:
    text = quote(data)
    assert all(32 <= ord(c) < 127 for c in text)  # one terminal line, always
    assert c_unquote(text) == (data[:STRING_LIMIT], len(data) > STRING_LIMIT)


def test_quote_octal_escape_before_a_digit() -> None:
    assert c_unquote(quote(b"\x012"))[0] == b"\x012"


# ---- numbers and results --------------------------------------------------------


@PROPS
@given(st.integers(0, 2**64 - 1), st.sampled_from([8, 16, 32, 64]))
def test_signed(value: int, bits: int) -> None:
    s = signed(value, bits)
    assert -(2 ** (bits - 1)) <= s < 2 ** (bits - 1)
    assert (s - value) % (2**bits) == 0


def test_signed_examples() -> None:
    assert signed(0xFFFFFFFF, 32) == -1
    assert signed((-100) & 0xFFFFFFFFFFFFFFFF) == AT_FDCWD
    assert signed(5) == 5


@pytest.mark.parametrize("rval", [0, 1, 3, 4096, 0xFFFF])
def test_result_small_success_is_decimal(rval: int) -> None:
    assert result(rval) == str(rval)


@PROPS
@given(st.integers(0x10000, 2**63 - 1))
def test_result_large_success_keeps_the_value(rval: int) -> None:
    assert int(result(rval), 0) == rval


@pytest.mark.parametrize("err", sorted(errno.errorcode))
def test_result_errno_name_and_message(err: int) -> None:
    text = result(-err)
    assert text == f"-1 {errno.errorcode[err]} ({os.strerror(err)})"


def test_result_restart_codes() -> None:
    assert result(-512).startswith("? ERESTARTSYS")
    for code in (513, 514, 516):
        assert result(-code).startswith("? ERESTART"), code
        assert str(code) in result(-code)


def test_result_unknown_errno() -> None:
    assert result(-4000).startswith("-1 E4000 (")


def test_result_error_range_bounds() -> None:
    assert result(-4095).startswith("-1 ")
    assert not result(-4096).startswith(("-1 ", "?"))


# ---- flags --------------------------------------------------------------------

# Linux x86_64 <asm-generic/fcntl.h> values, independent of the module under test.
O_BITS = {
    "O_CREAT": 0o100, "O_EXCL": 0o200, "O_NOCTTY": 0o400, "O_TRUNC": 0o1000,
    "O_APPEND": 0o2000, "O_NONBLOCK": 0o4000, "O_DSYNC": 0o10000, "O_DIRECT": 0o40000,
    "O_LARGEFILE": 0o100000, "O_DIRECTORY": 0o200000, "O_NOFOLLOW": 0o400000,
    "O_NOATIME": 0o1000000, "O_CLOEXEC": 0o2000000, "O_SYNC": 0o4010000,
    "O_PATH": 0o10000000, "O_TMPFILE": 0o20000000,
}  # fmt: skip
ACCMODE = {"O_RDONLY": 0, "O_WRONLY": 1, "O_RDWR": 2}


def parse_open_flags(text: str) -> int:
    first, *rest = text.split("|")
    value = ACCMODE[first] if first in ACCMODE else int(first, 0)
    assert value <= 3
    for tok in rest:
        value |= O_BITS[tok] if tok in O_BITS else int(tok, 16)
    assert len(rest) == len(set(rest)), text
    return value


@pytest.mark.parametrize(
    ("value", "names"),
    [
        (os.O_RDONLY, {"O_RDONLY"}),
        (os.O_WRONLY | os.O_CREAT | os.O_TRUNC, {"O_WRONLY", "O_CREAT", "O_TRUNC"}),
        (os.O_RDWR | os.O_APPEND | os.O_CLOEXEC, {"O_RDWR", "O_APPEND", "O_CLOEXEC"}),
        (os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, {"O_RDONLY", "O_DIRECTORY", "O_NOFOLLOW"}),
    ],
)
def test_open_flags_names(value: int, names: set[str]) -> None:
    text = open_flags(value)
    assert set(text.split("|")) == names
    assert text.split("|")[0] in ACCMODE


@PROPS
@given(st.integers(0, 2**32 - 1))
def test_open_flags_round_trip(value: int) -> None:
    assert parse_open_flags(open_flags(value)) == value


def test_open_flags_ignore_upper_register_bits() -> None:
    assert open_flags((1 << 40) | os.O_WRONLY) == open_flags(os.O_WRONLY)


def test_flags_helper() -> None:
    table = [(1, "A"), (2, "B")]
    assert flags(0, table) == "0"
    assert flags(3, table) == "A|B"
    assert flags(8 | 1, table) == "A|0x8"
    assert flags(0, table, base="BASE") == "BASE"


# ---- Formatter with fake readers ----------------------------------------------


class FakeTracee:
    """Tracee memory as dictionaries; every read is logged."""

    def __init__(self) -> None:
        self.strings: dict[int, bytes] = {}
        self.arrays: dict[int, tuple[bytes, ...]] = {}
        self.memory: dict[int, bytes] = {}
        self.reads: list[tuple[str, int, int]] = []

    def read_string(self, pid: int, addr: int) -> bytes | None:
        assert pid == PID
        self.reads.append(("str", addr, 0))
        return self.strings.get(addr)

    def read_memory(self, pid: int, addr: int, size: int) -> bytes:
        assert pid == PID
        self.reads.append(("mem", addr, size))
        return self.memory.get(addr, b"")[:size]

    def read_array(self, pid: int, addr: int) -> tuple[bytes, ...] | None:
        assert pid == PID
        self.reads.append(("arr", addr, 0))
        return self.arrays.get(addr)

    def formatter(self) -> Formatter:
        return Formatter(TABLE, self.read_string, self.read_memory, self.read_array)


def args(*values: int) -> tuple[int, ...]:
    return tuple(v & 0xFFFFFFFFFFFFFFFF for v in values) + (0,) * (6 - len(values))


def split_line(line: str) -> tuple[int, str, str, str]:
    m = re.fullmatch(r"(\d+) (\w+)\((.*)\) = (.*)", line)
    assert m, line
    return int(m.group(1)), m.group(2), m.group(3), m.group(4)


@pytest.fixture
def tracee() -> FakeTracee:
    return FakeTracee()


def test_openat_line(tracee: FakeTracee) -> None:
    tracee.strings[0x1000] = b"/etc/passwd"
    line = tracee.formatter().line(PID, NR["openat"], args(AT_FDCWD, 0x1000, os.O_CLOEXEC), 3)
    pid, name, arglist, res = split_line(line)
    assert (pid, name, res) == (PID, "openat", "3")
    shown = arglist.split(", ")
    assert shown[0] == "AT_FDCWD"
    assert c_unquote(shown[1]) == (b"/etc/passwd", False)
    assert parse_open_flags(shown[2]) == os.O_CLOEXEC


def test_dirfd_other_than_at_fdcwd_is_a_number(tracee: FakeTracee) -> None:
    tracee.strings[0x1000] = b"f"
    line = tracee.formatter().line(PID, NR["openat"], args(5, 0x1000), -2)
    _, _, arglist, res = split_line(line)
    assert arglist.startswith("5, ")
    assert res.startswith("-1 ENOENT")


def test_null_path_is_not_read(tracee: FakeTracee) -> None:
    line = tracee.formatter().line(PID, NR["open"], args(0, 0, 0), -14)
    assert split_line(line)[2].startswith("NULL, ")
    assert tracee.reads == []


def test_unreadable_path_shows_the_address(tracee: FakeTracee) -> None:
    line = tracee.formatter().line(PID, NR["open"], args(0xDEAD0000, 0, 0), -14)
    assert split_line(line)[2].startswith("0xdead0000, ")


def test_long_path_is_not_truncated_at_the_string_limit(tracee: FakeTracee) -> None:
    path = b"/" + b"d" * 200
    tracee.strings[0x1000] = path
    line = tracee.formatter().line(PID, NR["open"], args(0x1000, 0, 0), 3)
    assert c_unquote(split_line(line)[2].split(", ")[0]) == (path, False)


@pytest.mark.parametrize("rval", [0, 5, STRING_LIMIT, STRING_LIMIT + 1, 100])
def test_read_buffer_uses_rval(tracee: FakeTracee, rval: int) -> None:
    data = bytes(range(97, 97 + 26)) * 4
    tracee.memory[0x2000] = data
    line = tracee.formatter().line(PID, NR["read"], args(3, 0x2000, 100), rval)
    _, _, arglist, res = split_line(line)
    assert res == str(rval)
    assert ("mem", 0x2000, min(rval, STRING_LIMIT + 1)) in tracee.reads
    fd, buf, size = arglist.split(", ")
    assert (fd, size) == ("3", "100")
    shown, truncated = c_unquote(buf)
    assert shown == data[: min(rval, STRING_LIMIT)]
    assert truncated == (rval > STRING_LIMIT)


def test_failed_read_shows_buffer_address(tracee: FakeTracee) -> None:
    line = tracee.formatter().line(PID, NR["read"], args(3, 0x2000, 100), -errno.EBADF)
    assert split_line(line)[2] == "3, 0x2000, 100"
    assert [r for r in tracee.reads if r[0] == "mem"] == []


def test_write_buffer_uses_size_argument(tracee: FakeTracee) -> None:
    tracee.memory[0x3000] = b"hello\nworld"
    line = tracee.formatter().line(PID, NR["write"], args(1, 0x3000, 6), 6)
    assert ("mem", 0x3000, 6) in tracee.reads
    _, _, arglist, _ = split_line(line)
    assert c_unquote(arglist.split(", ")[1]) == (b"hello\n", False)


def test_execve_argv_truncated_and_envp_counted(tracee: FakeTracee) -> None:
    tracee.strings[0x1000] = b"/bin/echo"
    argv = tuple(f"a{i}".encode() for i in range(ARRAY_LIMIT + 3))
    tracee.arrays[0x4000] = argv
    tracee.arrays[0x5000] = (b"A=1", b"B=2", b"C=3")
    line = tracee.formatter().line(PID, NR["execve"], args(0x1000, 0x4000, 0x5000), 0)
    _, name, arglist, _ = split_line(line)
    assert name == "execve"
    m = re.fullmatch(r'(".*?"), \[(.*)\], (0x[0-9a-f]+) /\* (\d+) vars \*/', arglist)
    assert m, arglist
    shown = m.group(2).split(", ")
    assert shown[-1] == "..."
    assert [c_unquote(s)[0] for s in shown[:-1]] == list(argv[:ARRAY_LIMIT])
    assert int(m.group(3), 16) == 0x5000
    assert int(m.group(4)) == 3


def test_short_argv_has_no_ellipsis(tracee: FakeTracee) -> None:
    tracee.arrays[0x4000] = (b"ls", b"-l")
    line = tracee.formatter().line(PID, NR["execve"], args(0, 0x4000, 0), 0)
    assert split_line(line)[2] == 'NULL, ["ls", "-l"], NULL'


def test_argv_of_exactly_the_limit_has_no_ellipsis(tracee: FakeTracee) -> None:
    tracee.arrays[0x4000] = tuple(b"x" for _ in range(ARRAY_LIMIT))
    line = tracee.formatter().line(PID, NR["execve"], args(0, 0x4000, 0), 0)
    shown = split_line(line)[2]
    assert "..." not in shown
    assert shown.count('"x"') == ARRAY_LIMIT


def test_unreadable_argv_shows_address(tracee: FakeTracee) -> None:
    line = tracee.formatter().line(PID, NR["execve"], args(0, 0x4000, 0x5000), -14)
    assert split_line(line)[2] == "NULL, 0x4000, 0x5000"


def test_fd_and_signal_and_prot(tracee: FakeTracee) -> None:
    f = tracee.formatter()
    assert split_line(f.line(PID, NR["close"], args(-1), -9))[2] == "-1"
    assert split_line(f.line(PID, NR["kill"], args(7, signal.SIGKILL), 0))[2] == "7, SIGKILL"
    assert split_line(f.line(PID, NR["kill"], args(7, 0), 0))[2] == "7, 0"
    mmap = f.line(PID, NR["mmap"], args(0, 4096, 3, 0x22, -1, 0), 0x7F0000000000)
    _, _, arglist, res = split_line(mmap)
    assert arglist.split(", ")[2] == "PROT_READ|PROT_WRITE"
    assert arglist.split(", ")[4] == "-1"
    assert int(res, 0) == 0x7F0000000000
    assert split_line(f.line(PID, NR["mprotect"], args(0x1000, 4096, 0), 0))[2].endswith(
        "PROT_NONE"
    )


def test_unknown_syscall_shows_raw_registers(tracee: FakeTracee) -> None:
    line = tracee.formatter().line(PID, 999, args(1, 0x20, 3), -38)
    pid, name, arglist, res = split_line(line)
    assert name == "syscall_999"
    assert [int(a, 16) for a in arglist.split(", ")] == [1, 0x20, 3, 0, 0, 0]
    assert res.startswith("-1 ENOSYS")
    assert tracee.reads == []


def test_every_table_entry_renders(tracee: FakeTracee) -> None:
    # No format in the table may crash the renderer, even with unreadable memory.
    f = tracee.formatter()
    for spec in TABLE.values():
        line = f.line(PID, spec.nr, args(1, 2, 3, 4, 5, 6), 0)
        assert split_line(line)[1] == spec.name
        shown = len(spec.args)
        if "oflags" in spec.args:  # these flag values carry no O_CREAT: the mode is not shown
            shown = spec.args.index("oflags") + 1
        assert line.count(", ") >= max(shown - 1, 0)
