"""Fixtures shared by the attacks on a real `dcp-oss serve`."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from attack import require_attacker
from ossproc import OssProcess


@pytest.fixture
def oss() -> Iterator[OssProcess]:
    """A real `dcp-oss serve` with default listener limits, removed afterwards."""
    require_attacker()
    srv = OssProcess()
    try:
        yield srv
    finally:
        srv.cleanup()
