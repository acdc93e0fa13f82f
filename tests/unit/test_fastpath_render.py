"""tracer._fastpath renders every syscall of the table as tracer.decode does, byte for byte.

A differential test of the two renderers: the same (number, arguments, result),
with pointers into this process's own memory (read through process_vm_readv,
as the tracer reads a tracee's), must give the same text.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tracer import ptraceio
from tracer.arch import table_for
from tracer.decode import POINTER_RESULTS, Formatter, result, signed
from tracer.runner import fast_loop

try:
    from tracer import _fastpath  # noqa: F401
except ImportError:
    pytest.skip(
        "tracer._fastpath is not built (pip install -e . or setup.py build_ext --inplace)",
        allow_module_level=True,
    )

TABLE = table_for("x86_64")
RENDERED = sorted(nr for nr, s in TABLE.items() if not {"argv", "envp"} & set(s.args))
PAGE = mmap.PAGESIZE

# Bytes the quoting rules treat apart: quotes, backslashes, \n, \t, NUL before a
# digit and not, bytes above 126, printable text.
_BYTES = b'a"b\\c\nd\te\x001\x00x\x019\xff\x7fz 0123456789' + bytes(range(256))
_memory = ctypes.create_string_buffer(_BYTES + b"\0" + b"p" * 5000 + b"\0", 8192)
_BASE = ctypes.addressof(_memory)
# A string running into a page that cannot be read: rendered as far as it goes.
_area = mmap.mmap(-1, 2 * PAGE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
_area.write(b"q" * (2 * PAGE))
_AREA = ctypes.addressof(ctypes.c_char.from_buffer(_area))
ctypes.CDLL(None).mprotect(ctypes.c_void_p(_AREA + PAGE), PAGE, 0)

POINTERS = st.one_of(
    st.integers(0, 8191).map(lambda off: _BASE + off),
    st.integers(1, 200).map(lambda back: _AREA + PAGE - back),
    st.sampled_from([0, 1, 0x1000, 0xFFFFFFFFFFFFF000]),
)
VALUES = st.one_of(
    st.integers(0, 70),
    st.integers(0, (1 << 64) - 1),
    st.sampled_from([0xFFFFFF9C, (1 << 64) - 100, 0o100 | 0o2, 0o20200000, 0xFFFF, 0x10000]),
    POINTERS,
)
RESULTS = st.one_of(
    st.integers(-4200, 100),
    st.sampled_from([-512, -513, -514, -516, -4095, -4096, 0x7FFFF7FC0000, -(1 << 63)]),
    st.integers(-(1 << 63), (1 << 63) - 1),
)


def python_render(nr: int, args: tuple[int, ...], rval: int) -> str:
    formatter = Formatter(
        TABLE, ptraceio.read_string, ptraceio.read_memory, ptraceio.read_string_array
    )
    spec = TABLE[nr]
    shown = formatter.arguments(os.getpid(), spec, args, rval)
    return f"{shown} = {result(rval, spec.name in POINTER_RESULTS)}"


@pytest.fixture(scope="module")
def loop() -> _fastpath.Loop:
    made = fast_loop(TABLE, frozenset(), None)
    assert made is not None
    return made


@settings(max_examples=800, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    nr=st.sampled_from(RENDERED),
    args=st.tuples(*[VALUES] * 6),
    rval=RESULTS,
)
def test_every_call_renders_as_in_python(
    loop: _fastpath.Loop, nr: int, args: tuple[int, ...], rval: int
) -> None:
    assert loop.render(os.getpid(), nr, args, rval) == python_render(nr, args, rval)


@pytest.mark.parametrize("nr", RENDERED)
def test_each_call_with_strings_and_buffers(loop: _fastpath.Loop, nr: int) -> None:
    # Every argument a pointer into text (then a partly unreadable string): each
    # format of the call reads it its own way.
    for args in ((_BASE,) * 6, (_BASE + 2, 3, _BASE + 40, 33, _BASE, 0),
                 (_AREA + PAGE - 10,) * 6):  # fmt: skip
        for rval in (0, 5, 40, -errno.ENOENT, -1):
            assert loop.render(os.getpid(), nr, args, rval) == python_render(nr, args, rval)


def test_results_are_signed_as_the_tracer_reads_them(loop: _fastpath.Loop) -> None:
    nr = next(nr for nr, s in TABLE.items() if s.name == "close")
    for raw in (0, 3, (1 << 64) - 2, (1 << 64) - 4095, (1 << 64) - 4096):
        rval = signed(raw)
        assert loop.render(os.getpid(), nr, (3, 0, 0, 0, 0, 0), rval) == python_render(
            nr, (3, 0, 0, 0, 0, 0), rval
        )
