"""Reading the host's apt sources for the guest's mirror."""

from images.sources import AptSource, mirrors_for, parse_deb822, parse_one_line

DEB822 = """\
Types: deb
URIs: http://mirror.example/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

# a comment
Types: deb
URIs: http://mirror.example/debian-security
Suites: bookworm-security
Components: main contrib

Types: deb-src
URIs: http://mirror.example/debian
Suites: bookworm
Components: main

Types: deb
URIs: http://third.example/node
Suites: nodistro
Components: main
Enabled: yes

Types: deb
URIs: http://off.example/debian
Suites: bookworm
Components: main
Enabled: no
"""


def test_deb822_stanzas() -> None:
    got = parse_deb822(DEB822)
    assert AptSource("http://mirror.example/debian", "bookworm", ("main",)) in got
    assert (
        AptSource("http://mirror.example/debian-security", "bookworm-security", ("main", "contrib"))
        in got
    )
    assert all(s.uri != "http://off.example/debian" for s in got)
    assert len(got) == 4  # deb-src and the disabled stanza are skipped


def test_one_line_with_options_and_comments() -> None:
    text = (
        "# comment\n"
        "deb [arch=amd64 signed-by=/k.gpg] http://m.example/debian bookworm main contrib\n"
        "deb-src http://m.example/debian bookworm main\n"
        "deb http://m.example/debian bookworm-updates main # trailing\n"
        "deb http://other.example/apt cloud-sdk-bookworm main\n"
    )
    got = parse_one_line(text)
    assert got[0] == AptSource("http://m.example/debian", "bookworm", ("main", "contrib"))
    assert got[1].suite == "bookworm-updates"
    assert len(got) == 3


def test_mirrors_keep_only_the_suite_and_its_pockets_main_first() -> None:
    srcs = [
        AptSource("http://s.example", "bookworm-security", ("main",)),
        AptSource("http://x.example", "cloud-sdk-bookworm", ("main",)),
        AptSource("http://m.example", "bookworm", ("main",)),
        AptSource("http://m.example", "bookworm", ("main",)),
        AptSource("http://n.example", "nodistro", ("main",)),
    ]
    got = mirrors_for(srcs, "bookworm")
    assert [s.suite for s in got] == ["bookworm", "bookworm-security"]
    assert got[0].line() == "deb http://m.example bookworm main"


def test_no_matching_suite_gives_nothing() -> None:
    assert mirrors_for([AptSource("http://m.example", "trixie", ("main",))], "bookworm") == []
