"""`dcptrace --config FILE`: the TOML file is validated at the edge, every error a UsageError."""

from __future__ import annotations

from pathlib import Path

import pydantic
import pytest

from tracer.cli import PLACEMENTS, main
from tracer.config import FileConfig, load_config
from tracer.errors import TracerError, UsageError


def write(tmp_path: Path, text: str | bytes, name: str = "dcp.toml") -> str:
    p = tmp_path / name
    if isinstance(text, bytes):
        p.write_bytes(text)
    else:
        p.write_text(text)
    return str(p)


def test_valid_file(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        'instances = 3\nplacement = "pack"\noss = "http://127.0.0.1:8470"\n'
        '[map]\n"/data" = "/srv/dcp/data"\n"/scratch" = "/tmp/scratch"\n',
    )
    cfg = load_config(path)
    assert cfg.map == {"/data": "/srv/dcp/data", "/scratch": "/tmp/scratch"}
    assert cfg.instances == 3
    assert cfg.placement == "pack"
    assert cfg.oss == "http://127.0.0.1:8470"


def test_empty_file_gives_defaults(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, "")) == FileConfig()
    assert FileConfig().placement in PLACEMENTS
    assert FileConfig().map == {} and FileConfig().oss is None


def test_placement_choices_are_the_cluster_policies() -> None:
    """The command spells the choices out (no vmagent import to parse options): same set."""
    from vmagent.cluster.placement import POLICIES

    assert PLACEMENTS == POLICIES


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_every_placement_accepted(tmp_path: Path, placement: str) -> None:
    assert load_config(write(tmp_path, f'placement = "{placement}"')).placement == placement


def test_config_is_frozen(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, "instances = 2"))
    with pytest.raises(pydantic.ValidationError):
        cfg.instances = 5  # type: ignore[misc]


@pytest.mark.parametrize("key", ["instance", "maps", "trace"])
def test_unknown_key_rejected_by_name(tmp_path: Path, key: str) -> None:
    path = write(tmp_path, f"{key} = 1\n")
    with pytest.raises(UsageError) as info:
        load_config(path)
    assert key in str(info.value)
    assert path in str(info.value)
    assert isinstance(info.value.__cause__, pydantic.ValidationError)


def test_unknown_table_rejected(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="storage"):
        load_config(write(tmp_path, '[storage]\nroot = "/x"\n'))


@pytest.mark.parametrize("entry", ['"data" = "/srv/data"', '"/data" = "srv/data"', '"/data" = ""'])
def test_relative_map_path_rejected(tmp_path: Path, entry: str) -> None:
    with pytest.raises(UsageError, match="map") as info:
        load_config(write(tmp_path, f"[map]\n{entry}\n"))
    assert "absolute" in str(info.value)


def test_map_value_must_be_a_string(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="map"):
        load_config(write(tmp_path, '[map]\n"/data" = 3\n'))


@pytest.mark.parametrize("placement", ["random", "", "SPREAD"])
def test_bad_placement_rejected(tmp_path: Path, placement: str) -> None:
    with pytest.raises(UsageError, match="placement") as info:
        load_config(write(tmp_path, f'placement = "{placement}"\n'))
    assert all(p in str(info.value) for p in PLACEMENTS)


def test_wrong_type_rejected(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="instances"):
        load_config(write(tmp_path, 'instances = "many"\n'))


def test_negative_instances_rejected(tmp_path: Path) -> None:
    # The command line rejects --instances -1 (IntRange(min=0)); the file must too.
    with pytest.raises(UsageError, match="instances"):
        load_config(write(tmp_path, "instances = -1\n"))


@pytest.mark.parametrize("text", ["instances = ", "[map\n", 'placement = "pack" x', "a = 1\na = 2"])
def test_invalid_toml(tmp_path: Path, text: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(UsageError, match="not valid TOML") as info:
        load_config(path)
    assert path in str(info.value)


def test_non_utf8_file(tmp_path: Path) -> None:
    with pytest.raises(UsageError):
        load_config(write(tmp_path, b'placement = "\xff"\n'))


def test_missing_file(tmp_path: Path) -> None:
    path = str(tmp_path / "absent.toml")
    with pytest.raises(UsageError, match="cannot read config") as info:
        load_config(path)
    assert path in str(info.value)
    assert isinstance(info.value.__cause__, OSError)
    assert issubclass(UsageError, TracerError)


def test_directory_is_not_a_config(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="cannot read config"):
        load_config(str(tmp_path))


# ---- the console entry point turns these into one line and exit status 2 --------
# (Each case fails before any program is spawned.)


def test_main_reports_config_error_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, "bogus_key = 1\n")
    with pytest.raises(SystemExit) as info:
        main(["--config", path, "--", "true"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("dcptrace: ") and "bogus_key" in err
    assert "Traceback" not in err


def test_main_reports_bad_map_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--map", "data=/srv", "--", "true"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "SRC=DST" in err
