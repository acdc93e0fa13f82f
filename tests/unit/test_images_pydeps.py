"""Which Python deps come from Debian packages and which from wheels."""

from images.pydeps import debian_name, debian_upstream_version, parse_apt_policy, plan

POLICY = """\
python3-click:
  Installed: (none)
  Candidate: 8.1.3-2
  Version table:
     8.1.3-2 500
python3-pydantic:
  Installed: (none)
  Candidate: 1.10.4-1+deb12u1
python3-asyncssh:
  Installed: (none)
  Candidate: 2.10.1-2+deb12u2
python3-nothing:
  Installed: (none)
  Candidate: (none)
"""


def test_parse_apt_policy() -> None:
    got = parse_apt_policy(POLICY)
    assert got == {
        "python3-click": "8.1.3-2",
        "python3-pydantic": "1.10.4-1+deb12u1",
        "python3-asyncssh": "2.10.1-2+deb12u2",
    }


def test_debian_versions() -> None:
    assert str(debian_upstream_version("1:2.10.1-2+deb12u2")) == "2.10.1"
    assert str(debian_upstream_version("0.9.8-0.1+b2")) == "0.9.8"
    assert str(debian_upstream_version("8.1.3-2")) == "8.1.3"
    assert debian_upstream_version("not a version!") is None


def test_names() -> None:
    assert debian_name("prometheus-client>=0.20") == "python3-prometheus-client"
    assert debian_name("python-ptrace>=0.9.9") == "python3-ptrace"
    assert debian_name("PyRoute2>=0.7") == "python3-pyroute2"


def test_plan_uses_debian_only_when_it_satisfies() -> None:
    reqs = ["click>=8.1", "pydantic>=2.6", "asyncssh>=2.14", "zstandard>=0.22", "libvirt-python"]
    p = plan(reqs, parse_apt_policy(POLICY))
    assert p.debian == ("python3-click",)
    # pydantic 1.10 and asyncssh 2.10 are too old; zstandard has no candidate.
    assert p.wheels == ("pydantic>=2.6", "asyncssh>=2.14", "zstandard>=0.22")


def test_plan_of_nothing() -> None:
    p = plan([], {})
    assert p.debian == () and p.wheels == ()
