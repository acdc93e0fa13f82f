#!/usr/bin/env bash
# Build CRIU for this host into a fixed prefix (docs/CHECKPOINT.md says why not Debian 12's 3.17).
#
# The source is the upstream tarball as Debian's unstable suite ships it, fetched with apt
# from the mirror this machine's own apt sources name (a private sources list and lists
# directory: the system's apt state is not touched). Its sha256 is checked against the
# .dsc that apt verified against the signed index. Cached: when PREFIX/sbin/criu already
# reports VERSION, nothing is done. Build dependencies: .ci/apt-criu.txt.
set -euo pipefail

VERSION="${DCP_CRIU_VERSION:-4.2.1}"
PREFIX="${DCP_CRIU_PREFIX:-/opt/dcp/criu}"
WORK="${DCP_CRIU_WORK:-/var/cache/dcp/criu-build}"
KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg

if [ -x "$PREFIX/sbin/criu" ] && "$PREFIX/sbin/criu" --version 2>/dev/null | grep -q "Version: $VERSION\$"; then
    echo "criu $VERSION already in $PREFIX"
    exit 0
fi

mirror() {
    # The first Debian archive URI of the machine's apt sources (deb822 or one-line form).
    {
        cat /etc/apt/sources.list.d/*.sources 2>/dev/null | sed -n 's/^URIs:[[:space:]]*//p' | tr ' ' '\n'
        cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null \
            | sed -n 's/^deb[[:space:]]\+\(\[[^]]*\][[:space:]]\+\)\?\([^[:space:]]\+\).*/\2/p'
    } | grep -E '/debian/?$' | head -n1 | sed 's:/$::'
}

MIRROR="$(mirror || true)"
if [ -z "$MIRROR" ]; then
    echo "build-criu: no Debian archive in this machine's apt sources" >&2
    exit 1
fi

mkdir -p "$WORK/lists/partial" "$WORK/src"
echo "deb-src [signed-by=$KEYRING] $MIRROR sid main" > "$WORK/sources.list"
APT=(apt-get -qq -o "Dir::Etc::sourcelist=$WORK/sources.list" -o Dir::Etc::sourceparts=/nonexistent
     -o "Dir::State::Lists=$WORK/lists" -o "Dir::Cache::archives=$WORK/archives")
"${APT[@]}" update

TARBALL="criu_$VERSION.orig.tar.xz"
DSC=""
cd "$WORK/src"
# The Debian packaging tarball may be gone from the mirror; the .dsc and the upstream
# tarball are all this build needs, so a failure here is judged by what arrived.
"${APT[@]}" source --download-only criu || true
DSC="$(ls criu_"$VERSION"-*.dsc 2>/dev/null | head -n1 || true)"
if [ ! -f "$TARBALL" ] || [ -z "$DSC" ]; then
    echo "build-criu: the mirror's unstable suite did not give $TARBALL and its .dsc" >&2
    exit 1
fi
want="$(awk -v f="$TARBALL" '/^Checksums-Sha256:/ {s=1; next} /^[^ ]/ {s=0} s && $3 == f {print $1}' "$DSC")"
have="$(sha256sum "$TARBALL" | cut -d' ' -f1)"
if [ -z "$want" ] || [ "$want" != "$have" ]; then
    echo "build-criu: sha256 of $TARBALL is $have, $DSC says '${want}'" >&2
    exit 1
fi

rm -rf "criu-$VERSION"
tar -xf "$TARBALL"
cd "criu-$VERSION"
make -j2 >"$WORK/make.log" 2>&1 || { tail -n 30 "$WORK/make.log" >&2; exit 1; }
make install-criu PREFIX="$PREFIX" >>"$WORK/make.log" 2>&1
"$PREFIX/sbin/criu" --version
