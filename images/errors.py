"""Errors raised while building a DCP guest image."""

from __future__ import annotations

from pathlib import Path


class ImageError(Exception):
    """The guest image could not be built."""

    def __str__(self) -> str:
        return self.args[0] if self.args else (self.__doc__ or "image error").strip()


class KernelNotFound(ImageError):
    """No usable kernel: install linux-image-amd64 or pass --kernel PATH."""

    def __init__(self, message: str, path: Path | None = None) -> None:
        super().__init__(message)
        self.path = path


class ModulesNotFound(ImageError):
    """The kernel's modules directory is missing."""

    def __init__(self, message: str, version: str) -> None:
        super().__init__(message)
        self.version = version


class OutputDirError(ImageError):
    """The output directory cannot be used."""

    def __init__(self, message: str, path: Path) -> None:
        super().__init__(message)
        self.path = path


class MirrorNotFound(ImageError):
    """No Debian mirror for the suite is configured in the apt sources."""


class ToolMissing(ImageError):
    """A program the build needs is not installed."""

    def __init__(self, message: str, tool: str) -> None:
        super().__init__(message)
        self.tool = tool


class StepFailed(ImageError):
    """A build step failed."""

    def __init__(self, message: str, step: str, output: str = "") -> None:
        super().__init__(message)
        self.step = step
        self.output = output
