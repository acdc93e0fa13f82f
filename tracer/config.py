"""The dcptrace configuration file (TOML), validated with pydantic."""

from __future__ import annotations

import tomllib
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from oss.storage.pathmap import parse_mapping
from tracer.compose import PLACEMENTS
from tracer.errors import UsageError


class StorageTable(BaseModel):
    """The [storage] table: tiers, policy and limit of the --volume paths (issue 14).

    memory_mb, disk_mb:   each instance's memory (tmpfs) and disk tier sizes
    limit_mb:             the program's storage limit (EDQUOT past it)
    promote_after_reads:  opens for reading before a file is promoted to memory
    stream_mb:            a sequential write past this streams to the networked volume
    largest_in_memory_mb: files above this are never put in memory
    prefer:               memory | disk | net (the program's resource selection)
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    memory_mb: int | None = Field(default=None, ge=1)
    disk_mb: int | None = Field(default=None, ge=1)
    limit_mb: int | None = Field(default=None, ge=0)
    promote_after_reads: int | None = Field(default=None, ge=1)
    stream_mb: int | None = Field(default=None, ge=1)
    largest_in_memory_mb: int | None = Field(default=None, ge=0)
    prefer: Literal["memory", "disk", "net"] | None = None


class FileConfig(BaseModel):
    """`--config FILE` (TOML). Every key is optional; unknown keys are rejected.

    map:        virtual path prefix -> real path prefix (like --map)
    instances:  number of local compute instances (like --instances)
    placement:  spread | pack | local (like --placement)
    oss:        URL of a running dcp-oss (like --oss)
    volumes:    paths that are one namespace on every instance (like --volume)
    share_cwd:  the working directory joins them (default: yes; --no-share-cwd)
    storage:    tiers, policy and limit of those paths (oss.storage.run.TABLE_KEYS)
    checkpoint_every: seconds between checkpoints of placed processes, which are
                restored on another instance when theirs is lost (like --checkpoint-every)
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    map: dict[str, str] = {}
    instances: int = Field(default=0, ge=0)
    placement: str = "auto"
    oss: str | None = None
    volumes: list[str] = []
    share_cwd: bool | None = None
    storage: StorageTable = StorageTable()
    checkpoint_every: float | None = Field(default=None, gt=0, le=86400)

    @field_validator("map")
    @classmethod
    def _absolute(cls, value: dict[str, str]) -> dict[str, str]:
        for src, dst in value.items():
            parse_mapping(f"{src}={dst}")
        return value

    @field_validator("placement")
    @classmethod
    def _placement(cls, value: str) -> str:
        if value not in PLACEMENTS:
            raise ValueError(f"placement must be one of {', '.join(PLACEMENTS)}")
        return value


def load_config(path: str) -> FileConfig:
    """Read and validate a TOML config file."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
        return FileConfig.model_validate(data)
    except OSError as exc:
        raise UsageError(f"cannot read config {path}: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise UsageError(f"config {path} is not UTF-8 text: {exc.reason}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"config {path} is not valid TOML: {exc}") from exc
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise UsageError(f"config {path}: {where}: {first['msg']}") from exc
