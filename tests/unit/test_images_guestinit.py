"""The guest init's decisions: settings from /proc/cmdline and the config disk, the agent
command line."""

from pathlib import Path

import pytest

from images.guestinit import (
    CONFIG_BYTES,
    CONFIG_MAGIC,
    CONFIG_SERIAL,
    DEFAULT_LISTEN,
    ConfigError,
    GuestSettings,
    agent_argv,
    encode_config,
    load_config,
    parse_cmdline,
    parse_config,
    read_config_disk,
    redacted,
    with_config,
)

CMDLINE = (
    "BOOT_IMAGE=/vmlinuz console=ttyS0 panic=-1 root=/dev/vda rw quiet "
    "dcp.oss=http://10.231.5.1:8080 dcp.instance=vm-1 dcp.config=disk "
    "dcp.ip=10.231.5.10/24 dcp.gw=10.231.5.1 dcp.listen=0.0.0.0:7070\n"
)
TOKEN = "s3cr=t"


def settings() -> GuestSettings:
    """The command line's settings plus the config disk's token."""
    return with_config(parse_cmdline(CMDLINE), parse_config(encode_config({"token": TOKEN})) or {})


def test_parse_contract_words() -> None:
    s = parse_cmdline(CMDLINE)
    assert s == GuestSettings(
        instance="vm-1",
        oss="http://10.231.5.1:8080",
        token=None,
        ip="10.231.5.10/24",
        gw="10.231.5.1",
        listen="0.0.0.0:7070",
        ssh=False,
        config_disk=True,
    )
    assert settings().token == TOKEN


def test_defaults_without_dcp_words() -> None:
    s = parse_cmdline("console=ttyS0 root=/dev/vda")
    assert s.oss is None and s.token is None and s.ip is None
    assert s.listen == DEFAULT_LISTEN and s.instance == "dcp-guest"
    assert parse_cmdline("dcp.ssh=1").ssh is True


def test_agent_argv_matches_contract() -> None:
    argv = agent_argv(settings())
    assert argv == [
        "/usr/bin/python3",
        "-m",
        "vmagent",
        "--oss",
        "http://10.231.5.1:8080",
        "--instance",
        "vm-1",
        "--token-file",
        "/run/dcp/instance.token",
        "--listen",
        "0.0.0.0:7070",
    ]


def test_standalone_agent_has_no_oss_flag() -> None:
    argv = agent_argv(parse_cmdline("dcp.instance=a"))
    assert "--oss" not in argv and "--token-file" not in argv
    assert argv[-4:] == ["--instance", "a", "--listen", DEFAULT_LISTEN]


def test_token_never_logged() -> None:
    line = redacted(agent_argv(settings()))
    assert TOKEN not in line
    assert "--token-file /run/dcp/instance.token" in line and "--instance vm-1" in line


def test_roles() -> None:
    from images.guestinit import OSS_DATA, service_argv

    assert service_argv(settings()) == agent_argv(settings())
    oss = service_argv(parse_cmdline("dcp.role=oss dcp.listen=0.0.0.0:8470 dcp.oss=http://c:8470"))
    assert oss == [
        "/usr/bin/python3",
        "-m",
        "oss",
        "serve",
        "--listen",
        "0.0.0.0:8470",
        "--data",
        OSS_DATA,
        "--public-url",
        "http://c:8470",
    ]
    assert service_argv(parse_cmdline("dcp.role=none")) is None
    assert parse_cmdline("dcp.role=bogus").role == "agent"
    assert parse_cmdline("dcp.ip=dhcp").ip == "dhcp"
    assert parse_cmdline("dcp.alias=10.231.9.2/24").alias == "10.231.9.2/24"


def test_token_on_the_kernel_command_line_is_ignored() -> None:
    s = parse_cmdline("dcp.instance=a dcp.token=leaked")
    assert s.token is None and s.token_on_cmdline is True
    assert "--token-file" not in agent_argv(s)


def test_config_roundtrip_and_layout() -> None:
    data = encode_config({"token": "dcpi_x/+=:~"})
    assert len(data) == CONFIG_BYTES and data.startswith(CONFIG_MAGIC)
    assert data.rstrip(b"\0") == CONFIG_MAGIC + b"token=dcpi_x/+=:~\n"
    assert parse_config(data) == {"token": "dcpi_x/+=:~"}
    assert parse_config(encode_config({})) == {}


def test_config_refuses_bad_values() -> None:
    for bad in ({"token": "a b"}, {"token": "a\nb"}, {"token": ""}, {"other": "x"}):
        with pytest.raises(ConfigError):
            encode_config(bad)
    with pytest.raises(ConfigError, match="more than"):
        encode_config({"token": "x" * CONFIG_BYTES})


def test_parse_config_other_disks_and_garbage() -> None:
    assert parse_config(b"\0" * 4096) is None  # not a config disk: an empty one
    assert parse_config(b"\x53\xef" + b"\0" * 4094) is None  # e.g. a file system
    assert parse_config(CONFIG_MAGIC + b"future=1\ntoken=t\n\0") == {"token": "t"}
    with pytest.raises(ConfigError, match="ASCII"):
        parse_config(CONFIG_MAGIC + b"token=\xff\n")
    with pytest.raises(ConfigError, match="without '='"):
        parse_config(CONFIG_MAGIC + b"token\n")


def _disk(root: Path, name: str, data: bytes, serial: str | None = None) -> None:
    sysd = root / "sys" / name
    sysd.mkdir(parents=True)
    (sysd / "size").write_text(f"{max(1, len(data) // 512)}\n")
    if serial is not None:
        (sysd / "serial").write_text(serial + "\n")
    (root / "dev").mkdir(exist_ok=True)
    (root / "dev" / name).write_bytes(data)


def test_read_config_disk_prefers_the_serial_and_skips_big_disks(tmp_path: Path) -> None:
    big = encode_config({"token": "big"}) + b"\0" * 2**20  # a root disk is never read
    _disk(tmp_path, "vda", big)
    _disk(tmp_path, "vdb", encode_config({"token": "plain"}))
    _disk(tmp_path, "vdc", encode_config({"token": "serial"}), CONFIG_SERIAL)
    got = read_config_disk(str(tmp_path / "sys"), str(tmp_path / "dev"))
    assert got == {"token": "serial"}
    (tmp_path / "sys" / "vdc" / "serial").write_text("other\n")
    assert read_config_disk(str(tmp_path / "sys"), str(tmp_path / "dev")) == {"token": "plain"}
    assert read_config_disk(str(tmp_path / "none"), str(tmp_path / "dev")) is None


def test_load_config(capsys: pytest.CaptureFixture[str]) -> None:
    s = parse_cmdline("dcp.instance=a dcp.token=leaked dcp.config=disk")
    assert load_config(s, wait=0.0, reader=lambda: None).token is None
    out = capsys.readouterr().out
    assert "dcp.token= on the kernel command line is ignored" in out
    assert "no config disk appeared" in out and "leaked" not in out
    got = load_config(s, wait=0.0, reader=lambda: {"token": "t0k"})
    assert got.token == "t0k"
    assert "t0k" not in capsys.readouterr().out  # only the names of the keys are shown

    def broken() -> dict[str, str] | None:
        raise ConfigError("config disk is not ASCII")

    assert load_config(parse_cmdline(""), wait=0.0, reader=broken).token is None
    assert "config disk: config disk is not ASCII" in capsys.readouterr().out


def test_power_button_is_found_by_its_input_device_name(tmp_path: Path) -> None:
    from images.guestinit import find_power_button

    for name, label in (("event0", "AT Translated Set 2 keyboard"), ("event1", "Power Button")):
        (tmp_path / name / "device").mkdir(parents=True)
        (tmp_path / name / "device" / "name").write_text(label + "\n")
    (tmp_path / "input0").mkdir()
    assert find_power_button(str(tmp_path)) == "event1"
    assert find_power_button(str(tmp_path / "missing")) is None


def test_only_the_power_key_going_down_is_a_press() -> None:
    from images.guestinit import EV_KEY, INPUT_EVENT, KEY_POWER, is_power_press

    assert is_power_press(INPUT_EVENT.pack(1, 2, EV_KEY, KEY_POWER, 1))
    assert not is_power_press(INPUT_EVENT.pack(1, 2, EV_KEY, KEY_POWER, 0))  # release
    assert not is_power_press(INPUT_EVENT.pack(1, 2, 0, 0, 0))  # EV_SYN
    assert not is_power_press(INPUT_EVENT.pack(1, 2, EV_KEY, 30, 1))  # another key
    assert INPUT_EVENT.size == 24


@pytest.mark.parametrize(
    ("name", "args", "signal"),
    [
        ("shutdown", ["-h", "now"], "USR2"),
        ("shutdown", ["-r", "now"], "INT"),
        ("poweroff", [], "USR2"),
        ("halt", [], "USR2"),
        ("reboot", [], "INT"),
    ],
)
def test_power_commands_signal_pid_1(
    tmp_path: Path, name: str, args: list[str], signal: str
) -> None:
    import subprocess

    from images.spec import POWER_COMMANDS, POWER_SCRIPT

    assert name in POWER_COMMANDS
    # The script's `kill` is replaced by one that prints what it was asked to send.
    script = tmp_path / name
    script.write_text(POWER_SCRIPT.replace("exec kill", "echo"))
    script.chmod(0o755)
    out = subprocess.run([str(script), *args], capture_output=True, text=True, timeout=10)
    assert out.stdout.split() == ["-s", signal, "1"]
