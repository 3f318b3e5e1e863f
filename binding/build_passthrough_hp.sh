#!/usr/bin/env bash
# Builds libfuse's C example passthrough_hp, the reference of scripts/bench_fs.py's
# untar (sluice/passthrough_hp beside sluice/plain), from the same libfuse source that
# binding/build.sh fetched and with the same patches: a benchmark tool, not part of the
# set-up. The build tree stays in .build/passthrough_hp (the binary's rpath points at
# its own libfuse there); a second run with unchanged inputs only prints the path.
#
# Usage: binding/build_passthrough_hp.sh   (from the repository root; prints the binary)
set -euo pipefail
cd "$(dirname "$0")/.."

B=$PWD/.build
OUT=$B/passthrough_hp
die() { echo "build_passthrough_hp: $*" >&2; exit 1; }
command -v g++ >/dev/null || die "passthrough_hp is C++: apt-get install g++"
orig=$(ls "$B"/src/fuse3/fuse3_*.orig.tar.?z 2>/dev/null | head -1)
deb=$(ls "$B"/src/fuse3/fuse3_*.debian.tar.?z 2>/dev/null | head -1)
[ -n "$orig" ] && [ -n "$deb" ] || die "no libfuse source in .build/src/fuse3: run scripts/setup.sh first"

HASH=$( (cat binding/build_passthrough_hp.sh binding/libfuse-*.patch; basename "$orig") |
        sha256sum | cut -c1-16)
bin=$OUT/build/example/passthrough_hp
if [ ! -x "$bin" ] || [ "$(cat "$OUT/.stamp" 2>/dev/null)" != "$HASH" ]; then
    echo "build_passthrough_hp: building libfuse's example passthrough_hp in .build/passthrough_hp" >&2
    rm -rf "$OUT" && mkdir -p "$OUT"
    for t in "$orig" "$deb"; do tar --no-same-owner -xf "$t" -C "$OUT" || die "could not unpack $t"; done
    src=$(ls -d "$OUT"/fuse-*/ | head -1)
    if [ -f "$OUT/debian/patches/series" ]; then
        while read -r p; do
            case "$p" in ''|'#'*) continue ;; esac
            patch -d "$src" -p1 -s < "$OUT/debian/patches/$p" || die "Debian patch $p did not apply"
        done < "$OUT/debian/patches/series"
    fi
    for p in binding/libfuse-*.patch; do
        patch -d "$src" -p1 -s < "$p" || die "$p did not apply"
    done
    (meson setup "$OUT/build" "$src" --buildtype=release -Dutils=false -Dexamples=true \
         -Dtests=false -Ddisable-mtab=true &&
     ninja -C "$OUT/build" example/passthrough_hp) >"$OUT/build.log" 2>&1 \
        || die "building passthrough_hp failed (see .build/passthrough_hp/build.log)"
    echo "$HASH" > "$OUT/.stamp"
fi
echo "$bin"
