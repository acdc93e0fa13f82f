"""The dcptrace configuration file (TOML), validated with pydantic."""

from __future__ import annotations

import tomllib

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from oss.storage.pathmap import parse_mapping
from tracer.compose import PLACEMENTS
from tracer.errors import UsageError


class FileConfig(BaseModel):
    """`--config FILE` (TOML). Every key is optional; unknown keys are rejected.

    map:        virtual path prefix -> real path prefix (like --map)
    instances:  number of local compute instances (like --instances)
    placement:  spread | pack | local (like --placement)
    oss:        URL of a running dcp-oss (like --oss)
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    map: dict[str, str] = {}
    instances: int = Field(default=0, ge=0)
    placement: str = "auto"
    oss: str | None = None

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
