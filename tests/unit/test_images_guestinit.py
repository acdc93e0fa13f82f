"""The guest init's decisions: settings from /proc/cmdline and the agent command line."""

from images.guestinit import DEFAULT_LISTEN, GuestSettings, agent_argv, parse_cmdline, redacted

CMDLINE = (
    "BOOT_IMAGE=/vmlinuz console=ttyS0 panic=-1 root=/dev/vda rw quiet "
    "dcp.oss=http://10.231.5.1:8080 dcp.instance=vm-1 dcp.token=s3cr=t "
    "dcp.ip=10.231.5.10/24 dcp.gw=10.231.5.1 dcp.listen=0.0.0.0:7070\n"
)


def test_parse_contract_words() -> None:
    s = parse_cmdline(CMDLINE)
    assert s == GuestSettings(
        instance="vm-1",
        oss="http://10.231.5.1:8080",
        token="s3cr=t",
        ip="10.231.5.10/24",
        gw="10.231.5.1",
        listen="0.0.0.0:7070",
        ssh=False,
    )


def test_defaults_without_dcp_words() -> None:
    s = parse_cmdline("console=ttyS0 root=/dev/vda")
    assert s.oss is None and s.token is None and s.ip is None
    assert s.listen == DEFAULT_LISTEN and s.instance == "dcp-guest"
    assert parse_cmdline("dcp.ssh=1").ssh is True


def test_agent_argv_matches_contract() -> None:
    argv = agent_argv(parse_cmdline(CMDLINE))
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
    line = redacted(agent_argv(parse_cmdline(CMDLINE)))
    assert "s3cr=t" not in line
    assert "--token-file /run/dcp/instance.token" in line and "--instance vm-1" in line


def test_roles() -> None:
    from images.guestinit import OSS_DATA, service_argv

    assert service_argv(parse_cmdline(CMDLINE)) == agent_argv(parse_cmdline(CMDLINE))
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
