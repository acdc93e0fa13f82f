"""Virtual <-> real path prefixes and the kernel-like resolution of program paths."""

from __future__ import annotations

import posixpath

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from oss.storage.pathmap import MAX_LINKS, PathMap, PathMapError, ReadLink, parse_mapping

PROPS = settings(max_examples=100, deadline=None, database=None, derandomize=True)


def no_links(path: bytes) -> bytes | None:
    return None


def links(table: dict[bytes, bytes]) -> ReadLink:
    """A fake readlink over real paths; records every lookup."""
    seen: list[bytes] = []

    def readlink(path: bytes) -> bytes | None:
        seen.append(path)
        return table.get(path)

    readlink.seen = seen  # type: ignore[attr-defined]
    return readlink


@pytest.fixture
def pm() -> PathMap:
    return PathMap({"/data": "/srv/dcp/data", "/data/hot": "/fast/hot", "/scratch": "/tmp/s"})


# ---- construction -------------------------------------------------------------


def test_empty_map_is_false(pm: PathMap) -> None:
    assert not PathMap({})
    assert pm


@pytest.mark.parametrize(
    "mapping", [{"data": "/srv"}, {"/data": "srv"}, {"": "/srv"}, {"./data": "/srv"}]
)
def test_relative_prefix_rejected(mapping: dict[str, str]) -> None:
    with pytest.raises(PathMapError, match="not an absolute path"):
        PathMap(mapping)
    assert issubclass(PathMapError, ValueError)


def test_prefixes_are_normalized() -> None:
    m = PathMap({"//data/./x/": "/srv//real/"})
    assert m.to_real(b"/data/x/f") == b"/srv/real/f"
    assert m.to_virtual(b"/srv/real/f") == b"/data/x/f"


# ---- to_real / to_virtual -----------------------------------------------------


def test_to_real_longest_prefix_wins(pm: PathMap) -> None:
    assert pm.to_real(b"/data/hot/f") == b"/fast/hot/f"
    assert pm.to_real(b"/data/hot") == b"/fast/hot"
    assert pm.to_real(b"/data/cold/f") == b"/srv/dcp/data/cold/f"
    assert pm.to_real(b"/data") == b"/srv/dcp/data"


def test_to_real_respects_component_boundaries(pm: PathMap) -> None:
    assert pm.to_real(b"/database") is None
    assert pm.to_real(b"/database/x") is None
    assert pm.to_real(b"/data/hotter") == b"/srv/dcp/data/hotter"
    assert pm.to_real(b"/scratchpad") is None
    assert pm.to_real(b"/") is None
    assert pm.to_real(b"/etc/passwd") is None


def test_to_virtual(pm: PathMap) -> None:
    assert pm.to_virtual(b"/srv/dcp/data/a") == b"/data/a"
    assert pm.to_virtual(b"/fast/hot/b") == b"/data/hot/b"
    assert pm.to_virtual(b"/srv/dcp/database") == b"/srv/dcp/database"
    assert pm.to_virtual(b"/etc") == b"/etc"


def test_root_virtual_prefix_maps_everything() -> None:
    m = PathMap({"/": "/srv/root", "/data": "/big"})
    assert m.to_real(b"/etc/passwd") == b"/srv/root/etc/passwd"
    assert m.to_real(b"/data/x") == b"/big/x"  # a longer prefix still wins over "/"
    assert m.resolve(b"/etc", None, no_links) == b"/srv/root/etc"


def test_root_virtual_prefix_round_trip() -> None:
    m = PathMap({"/": "/srv/root"})
    assert m.to_virtual(b"/srv/root/etc") == b"/etc"
    assert m.to_real(b"/") == b"/srv/root"


def test_root_real_prefix_round_trip() -> None:
    m = PathMap({"/data": "/"})
    assert m.to_real(b"/data/x") == b"/x"
    assert m.to_virtual(b"/") == b"/data"


def test_resolve_root_under_root_mapping() -> None:
    m = PathMap({"/": "/srv/root"})
    assert m.resolve(b"/", None, no_links) in (b"/srv/root", b"/srv/root/")


# ---- resolve ------------------------------------------------------------------


def test_resolve_absolute(pm: PathMap) -> None:
    assert pm.resolve(b"/data/a/b", None, no_links) == b"/srv/dcp/data/a/b"
    assert pm.resolve(b"/data/hot/x", None, no_links) == b"/fast/hot/x"
    assert pm.resolve(b"/database/x", None, no_links) is None
    assert pm.resolve(b"/etc/passwd", None, no_links) is None


def test_resolve_empty_path_is_kept(pm: PathMap) -> None:
    assert pm.resolve(b"", b"/srv/dcp/data", no_links) is None


def test_resolve_dot_and_repeated_slashes(pm: PathMap) -> None:
    assert pm.resolve(b"//data///a/./b", None, no_links) == b"/srv/dcp/data/a/b"
    assert pm.resolve(b"/./data/.", None, no_links) == b"/srv/dcp/data"


def test_resolve_keeps_trailing_slash(pm: PathMap) -> None:
    assert pm.resolve(b"/data/dir/", None, no_links) == b"/srv/dcp/data/dir/"
    assert pm.resolve(b"/data/", None, no_links) == b"/srv/dcp/data/"
    assert pm.resolve(b"/data/dir", None, no_links) == b"/srv/dcp/data/dir"


def test_resolve_relative_against_mapped_base(pm: PathMap) -> None:
    # The base is the real cwd the kernel would use.
    assert pm.resolve(b"f", b"/srv/dcp/data/sub", no_links) == b"/srv/dcp/data/sub/f"
    assert pm.resolve(b"./a/b", b"/srv/dcp/data", no_links) == b"/srv/dcp/data/a/b"
    assert pm.resolve(b"hot/x", b"/srv/dcp/data", no_links) == b"/fast/hot/x"


def test_resolve_relative_against_unmapped_base(pm: PathMap) -> None:
    assert pm.resolve(b"f", b"/home/u", no_links) is None
    assert pm.resolve(b"../../data/x", b"/home/u", no_links) == b"/srv/dcp/data/x"


def test_resolve_relative_with_unknown_base_is_kept(pm: PathMap) -> None:
    assert pm.resolve(b"f", None, no_links) is None
    assert pm.resolve(b"../data/f", None, no_links) is None


def test_dotdot_leaves_a_mapped_area(pm: PathMap) -> None:
    # Virtual /data/.. is /, not the real parent /srv/dcp.
    assert pm.resolve(b"../etc/passwd", b"/srv/dcp/data", no_links) == b"/etc/passwd"
    assert pm.resolve(b"/data/../etc", None, no_links) == b"/etc"
    assert pm.resolve(b"/data/hot/../cold", None, no_links) == b"/srv/dcp/data/cold"
    assert pm.resolve(b"..", b"/fast/hot", no_links) == b"/srv/dcp/data"


def test_dotdot_enters_a_mapped_area(pm: PathMap) -> None:
    assert pm.resolve(b"/etc/../data/f", None, no_links) == b"/srv/dcp/data/f"
    assert pm.resolve(b"../data", b"/scratchy", no_links) == b"/srv/dcp/data"


def test_dotdot_at_root_stays_at_root(pm: PathMap) -> None:
    assert pm.resolve(b"/../../data/f", None, no_links) == b"/srv/dcp/data/f"


def test_symlink_before_dotdot_absolute_target(pm: PathMap) -> None:
    # /data/l -> /srv/dcp/data/deep/dir (links store real paths): l/.. is .../deep.
    rl = links({b"/srv/dcp/data/l": b"/srv/dcp/data/deep/dir"})
    assert pm.resolve(b"/data/l/../f", None, rl) == b"/srv/dcp/data/deep/f"
    assert b"/srv/dcp/data/l" in rl.seen  # type: ignore[attr-defined]


def test_symlink_before_dotdot_absolute_target_outside(pm: PathMap) -> None:
    rl = links({b"/srv/dcp/data/l": b"/opt/pkg/bin"})
    assert pm.resolve(b"/data/l/../lib", None, rl) == b"/opt/pkg/lib"


def test_symlink_before_dotdot_relative_target(pm: PathMap) -> None:
    rl = links({b"/srv/dcp/data/a/l": b"x/y"})
    assert pm.resolve(b"/data/a/l/../f", None, rl) == b"/srv/dcp/data/a/x/f"


def test_symlink_before_dotdot_relative_target_going_up(pm: PathMap) -> None:
    # /data/a/l -> ../b/c ; /data/a/l/.. is /data/b.
    rl = links({b"/srv/dcp/data/a/l": b"../b/c"})
    assert pm.resolve(b"/data/a/l/../f", None, rl) == b"/srv/dcp/data/b/f"


def test_symlink_loop_is_bounded(pm: PathMap) -> None:
    calls = 0

    def loop(path: bytes) -> bytes | None:
        nonlocal calls
        calls += 1
        return b"/srv/dcp/data/l"  # points at itself

    path = b"/data/l" + b"/.." * (MAX_LINKS + 5)
    assert pm.resolve(path, None, loop) is not None
    assert calls <= MAX_LINKS + 5


def test_symlinks_on_the_way_are_followed_in_the_view(pm: PathMap) -> None:
    # As under a bind mount: /data/l -> /elsewhere is /elsewhere for the program.
    rl = links({b"/srv/dcp/data/l": b"/elsewhere"})
    assert pm.resolve(b"/data/l/f", None, rl) == b"/elsewhere/f"


def test_an_absolute_target_is_read_as_a_virtual_path(pm: PathMap) -> None:
    # `ln -s /data/a /data/abs` stores /data/a: following it reaches the mapped file.
    rl = links({b"/srv/dcp/data/abs": b"/data/a"})
    assert pm.resolve(b"/data/abs", None, rl) == b"/srv/dcp/data/a"
    assert pm.resolve(b"/data/abs", None, rl, follow=False) == b"/srv/dcp/data/abs"
    assert pm.resolve(b"/data/abs/", None, rl, follow=False) == b"/srv/dcp/data/a/"


def test_dotdot_from_a_mapped_root_climbs_to_its_virtual_parent(pm: PathMap) -> None:
    # Under a bind mount /data/.. is /, whatever /srv/dcp/data's real parent is.
    rl = links({b"/srv/dcp/data/up": b"../etc/f"})
    assert pm.resolve(b"/data/up", None, rl) == b"/etc/f"
    assert pm.resolve(b"../etc", b"/srv/dcp/data", no_links) == b"/etc"


def test_proc_is_left_to_the_kernel(pm: PathMap) -> None:
    # /proc/self is the caller's, not the tracer's: never read here.
    rl = links({b"/proc/self": b"4242"})
    assert pm.resolve(b"/data/../proc/self/fd/3", None, rl) == b"/proc/self/fd/3"
    assert not [p for p in rl.seen if p.startswith(b"/proc")]  # type: ignore[attr-defined]


# ---- parse_mapping ------------------------------------------------------------


def test_parse_mapping() -> None:
    assert parse_mapping("/data=/srv/data") == ("/data", "/srv/data")
    assert parse_mapping("/a=/b=c") == ("/a", "/b=c")


@pytest.mark.parametrize("spec", ["/data", "data=/srv", "/data=srv", "=/srv", "/data=", ""])
def test_parse_mapping_errors(spec: str) -> None:
    with pytest.raises(PathMapError, match="SRC=DST"):
        parse_mapping(spec)


# ---- properties ---------------------------------------------------------------

component = st.text(alphabet="abcdefgh-_.0", min_size=1, max_size=6).filter(
    lambda c: c not in (".", "..")
)
components = st.lists(component, min_size=1, max_size=4)


def _join(parts: list[str]) -> str:
    return "/" + "/".join(parts)


@PROPS
@given(vparts=components, rparts=components, suffix=st.lists(component, max_size=4))
def test_round_trip_under_the_virtual_prefix(
    vparts: list[str], rparts: list[str], suffix: list[str]
) -> None:
    v, r = _join(vparts), _join(rparts)
    m = PathMap({v: r})
    p = (v + ("/" + "/".join(suffix) if suffix else "")).encode()
    real = m.to_real(p)
    assert real is not None
    assert real == r.encode() or real.startswith(r.encode() + b"/")
    assert m.to_virtual(real) == p
    # resolve agrees with to_real for a clean absolute path.
    assert m.resolve(p, None, no_links) == real


@settings(PROPS, max_examples=60)
@given(
    vparts=components, rparts=components, extra=component, suffix=st.lists(component, max_size=3)
)
def test_siblings_sharing_a_name_prefix_are_not_mapped(
    vparts: list[str], rparts: list[str], extra: str, suffix: list[str]
) -> None:
    v = _join(vparts)
    m = PathMap({v: _join(rparts)})
    sibling = (v + extra + ("/" + "/".join(suffix) if suffix else "")).encode()
    assert m.to_real(sibling) is None


@PROPS
@given(
    rparts=components,
    sub=st.lists(component, max_size=3),
    rel=st.lists(st.one_of(component, st.just("."), st.just("..")), min_size=1, max_size=6),
)
def test_relative_paths_match_lexical_resolution(
    rparts: list[str], sub: list[str], rel: list[str]
) -> None:
    # Without symlinks, resolving against the virtual cwd is lexical normalization.
    m = PathMap({"/v": _join(rparts)})
    base_real = (_join(rparts) + ("/" + "/".join(sub) if sub else "")).encode()
    base_virtual = ("/v" + ("/" + "/".join(sub) if sub else "")).encode()
    path = "/".join(rel).encode()
    virtual = posixpath.normpath(base_virtual + b"/" + path)
    if virtual.startswith(b"//"):
        virtual = virtual[1:]
    expected = m.to_real(virtual) or virtual
    assert m.resolve(path, base_real, no_links) == expected
