#!/usr/bin/env bash
# Builds sluice's FUSE binding into the project's own prefix and installs it into .venv:
#
#   1. libfuse >= 3.16 from Debian trixie's fuse3 source package (Debian 12 has 3.14,
#      which cannot ask the kernel for FUSE_DIRECT_IO_ALLOW_MMAP), fetched with
#      `apt-get source --download-only` through a private apt state and source list
#      (the system's sources, apt state and its fuse3 package are never touched),
#      Debian's patches applied, the library alone (no utils) installed into
#      .build/libfuse. It keeps using the system's setuid /usr/bin/fusermount3 for
#      non-root mounts (libfuse-fusermount-path.patch). Its soname is libfuse3.so.4,
#      so nothing else on the machine can pick it up by accident.
#   2. pyfuse3 3.5.0 from its PyPI sdist with binding/pyfuse3-3.5.0-sluice.patch
#      (fallocate and lseek handlers, init flags for direct-I/O mmap and killpriv v2,
#      FOPEN_NOFLUSH and parallel direct writes in FileInfo, release_worker() for
#      handlers that wait without holding a worker, a worker that keeps reading
#      requests while its handlers complete without blocking, and a large write's
#      payload handed over as a read-only view of the buffer the request was read
#      into, never reused, instead of a copy, starting on a page boundary so that it
#      can be written with O_DIRECT as it is, and a write whose flags hold O_SYNC or
#      O_DSYNC — its file's, or pwritev2's RWF_SYNC/RWF_DSYNC — handed to
#      Operations.write_synced, a write then an fsync, which the kernel sends only
#      after writes through the page cache), linked against that
#      libfuse with an rpath, built as a wheel versioned 3.5.0+sluice.N and installed
#      into .venv.
#
# Each step is skipped when its inputs (its part of this script, its patches, and for
# pyfuse3 the libfuse build) are unchanged: a second run takes about a second.
#
# Usage: binding/build.sh PYTHON   (the venv's python; run from the repository root)
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${1:?usage: binding/build.sh PATH-TO-VENV-PYTHON}
ROOT=$PWD
B=$ROOT/.build
PREFIX=$B/libfuse
PYFUSE3_VERSION=3.5.0
LOCAL_VERSION=sluice.14         # bump with every change of the pyfuse3 patch
SUITE=trixie

die() { echo "setup: $*" >&2; exit 1; }
for tool in apt-get meson ninja patch pkg-config gcc tar; do
    command -v "$tool" >/dev/null || die "building the FUSE binding needs '$tool' (apt-get install meson ninja-build patch pkg-config gcc tar)"
done

# What each step is built from: a change rebuilds that step and the ones after it.
LIB_HASH=$(sed -n '/^# -- 1/,/^# -- 2/p' binding/build.sh | cat - binding/libfuse-*.patch |
           sha256sum | cut -c1-16)
PY_HASH=$( (echo "$LIB_HASH"; sed -n '/^# -- 2/,$p' binding/build.sh;
            cat binding/pyfuse3-*.patch) | sha256sum | cut -c1-16)
mkdir -p "$B"

# -- 1. libfuse ------------------------------------------------------------------------
lib_stamp=$PREFIX/.sluice-stamp
if [ ! -f "$lib_stamp" ] || [ "$(cat "$lib_stamp")" != "$LIB_HASH" ]; then
    apt_dir=$B/apt
    mkdir -p "$apt_dir/state/lists/partial" "$apt_dir/cache/archives/partial" "$B/src"
    echo "deb-src http://deb.debian.org/debian $SUITE main" > "$apt_dir/sources.list"
    apt_opts=(-o "Dir::State=$apt_dir/state" -o "Dir::Cache=$apt_dir/cache"
              -o "Dir::Etc::sourcelist=$apt_dir/sources.list"
              -o "Dir::Etc::sourceparts=$apt_dir/sources.list.d"
              -o "Dir::Etc::preferencesparts=$apt_dir/preferences.d"
              -o "Debug::NoLocking=1")
    mkdir -p "$apt_dir/sources.list.d" "$apt_dir/preferences.d"
    echo "setup: fetching the fuse3 source package from Debian $SUITE (private apt state in .build/apt)"
    apt-get "${apt_opts[@]}" -qq update >"$B/apt-update.log" 2>&1 \
        || die "apt-get update of Debian $SUITE's sources failed (network? see .build/apt-update.log)"
    rm -rf "$B/src/fuse3" && mkdir -p "$B/src/fuse3"
    (cd "$B/src/fuse3" && apt-get "${apt_opts[@]}" -qq source --download-only fuse3) \
        >"$B/apt-source.log" 2>&1 \
        || die "apt-get source --download-only fuse3 from Debian $SUITE failed (see .build/apt-source.log)"
    dsc=$(ls "$B"/src/fuse3/fuse3_*.dsc 2>/dev/null | head -1)
    [ -n "$dsc" ] || die "no fuse3 .dsc was downloaded (see .build/apt-source.log)"
    upstream=$(basename "$dsc" .dsc | sed -E 's/^fuse3_//; s/-[^-]*$//')
    case "$upstream" in
        3.1[6-9]*|3.[2-9][0-9]*) ;;
        *) die "Debian $SUITE's fuse3 is $upstream; the binding needs libfuse 3.16 or later" ;;
    esac
    echo "setup: building libfuse $upstream into .build/libfuse"
    work=$B/src/fuse3/build-tree
    rm -rf "$work" && mkdir -p "$work"
    for t in "$B"/src/fuse3/fuse3_"$upstream".orig.tar.?z "$B"/src/fuse3/fuse3_*.debian.tar.?z; do
        # (--no-same-owner: as root, tar keeps the archive's owners, and the trees root
        # compiles would belong to whatever uid the archive names: a local user could
        # edit them mid-build; probe 19, F11)
        tar --no-same-owner -xf "$t" -C "$work" || die "could not unpack $t"
    done
    src=$(ls -d "$work"/fuse-*/ | head -1)
    if [ -f "$work/debian/patches/series" ]; then
        while read -r p; do
            case "$p" in ''|'#'*) continue ;; esac
            patch -d "$src" -p1 -s < "$work/debian/patches/$p" || die "Debian patch $p did not apply"
        done < "$work/debian/patches/series"
    fi
    for p in binding/libfuse-*.patch; do
        patch -d "$src" -p1 -s < "$p" || die "$p did not apply to libfuse $upstream"
    done
    rm -rf "$PREFIX"
    (meson setup "$work/build" "$src" --prefix="$PREFIX" --libdir=lib --buildtype=release \
         -Dutils=false -Dexamples=false -Dtests=false -Ddisable-mtab=true &&
     ninja -C "$work/build" install) >"$B/libfuse-build.log" 2>&1 \
        || die "building libfuse failed (see .build/libfuse-build.log)"
    echo "$upstream" > "$PREFIX/.sluice-version"
    echo "$LIB_HASH" > "$lib_stamp"
    rm -rf "$work"
fi
LIBFUSE_VERSION=$(cat "$PREFIX/.sluice-version")

# -- 2. pyfuse3 ------------------------------------------------------------------------
want="$PYFUSE3_VERSION+$LOCAL_VERSION"
py_stamp=$B/pyfuse3.stamp
have=$("$PY" -c 'import importlib.metadata as m; print(m.version("pyfuse3"))' 2>/dev/null || true)
if [ "$have" != "$want" ] || [ ! -f "$py_stamp" ] || [ "$(cat "$py_stamp")" != "$PY_HASH" ]; then
    echo "setup: building pyfuse3 $want against libfuse $LIBFUSE_VERSION"
    sdir=$B/src/pyfuse3
    rm -rf "$sdir" && mkdir -p "$sdir"
    "$PY" -m pip download -q --no-deps --no-binary :all: "pyfuse3==$PYFUSE3_VERSION" -d "$sdir" \
        >"$B/pyfuse3-build.log" 2>&1 \
        || die "pip download of the pyfuse3 $PYFUSE3_VERSION sdist failed (network? see .build/pyfuse3-build.log)"
    tar --no-same-owner -xzf "$sdir/pyfuse3-$PYFUSE3_VERSION.tar.gz" -C "$sdir"
    tree=$sdir/pyfuse3-$PYFUSE3_VERSION
    patch -d "$tree" -p1 -s < "binding/pyfuse3-$PYFUSE3_VERSION-sluice.patch" \
        || die "binding/pyfuse3-$PYFUSE3_VERSION-sluice.patch did not apply"
    rm -f "$tree/src/pyfuse3/__init__.c"   # generated from the unpatched .pyx: Cython redoes it
    rm -rf "$B/wheels" && mkdir -p "$B/wheels"
    # -L first: a system Python's own link flags name /usr/lib/<triplet> before
    # pkg-config's -L, and -lfuse3 then found the system's libfuse 3.14.
    PKG_CONFIG_PATH=$PREFIX/lib/pkgconfig LDFLAGS="-L$PREFIX/lib -Wl,-rpath,$PREFIX/lib" \
    SETUPTOOLS_SCM_PRETEND_VERSION="$want" \
        "$PY" -m pip wheel -q --no-deps -w "$B/wheels" "$tree" >>"$B/pyfuse3-build.log" 2>&1 \
        || die "building pyfuse3 failed (see .build/pyfuse3-build.log)"
    { "$PY" -m pip install -q --no-deps --force-reinstall "$B"/wheels/pyfuse3-*.whl &&
      "$PY" -m pip install -q "$B"/wheels/pyfuse3-*.whl; } \
        >>"$B/pyfuse3-build.log" 2>&1 || die "installing the pyfuse3 wheel failed (see .build/pyfuse3-build.log)"
    echo "$PY_HASH" > "$py_stamp"
fi

# The binding must load the private libfuse, not the system's 3.14.
"$PY" - "$PREFIX" <<'EOF' || die "the installed pyfuse3 does not load libfuse from .build/libfuse (rerun after rm -rf .build)"
import sys, pyfuse3
assert hasattr(pyfuse3, "negotiated"), "pyfuse3 lacks the sluice patch"
maps = open("/proc/self/maps").read()
assert sys.argv[1] + "/lib/libfuse3.so" in maps, "wrong libfuse loaded"
EOF
