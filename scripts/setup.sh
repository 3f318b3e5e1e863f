#!/usr/bin/env bash
# Installs everything sluice needs on a fresh Debian 12 machine, idempotently:
# the apt packages (FUSE 3 and the programs the tests run), a virtualenv in .venv,
# sluice's own FUSE binding (libfuse from Debian trixie's source into .build/libfuse
# and a patched pyfuse3 linked to it: binding/build.sh) and the package itself
# (editable, with its test extra). Safe to run again; a second run takes seconds.
set -euo pipefail
cd "$(dirname "$0")/.."

apt_pkgs=(fuse3 libfuse3-dev pkg-config attr sqlite3 git gcc make tar python3-venv python3-dev strace e2fsprogs
          meson ninja-build patch xz-utils dpkg-dev libxxhash-dev)
missing=()
for p in "${apt_pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "setup: installing apt packages: ${missing[*]}"
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    # Another apt or dpkg (unattended upgrades on a fresh machine) may hold the lock:
    # wait for it, up to ten minutes, rather than fail at once.
    if command -v fuser >/dev/null && $SUDO fuser /var/lib/dpkg/lock-frontend >/dev/null 2>&1; then
        echo "setup: waiting for another apt/dpkg to finish (up to 10 minutes)"
    fi
    apt_wait=(-o DPkg::Lock::Timeout=600)
    $SUDO apt-get "${apt_wait[@]}" update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get "${apt_wait[@]}" install -y -qq "${missing[@]}" >/dev/null
fi

PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
if [ ! -x .venv/bin/python ]; then
    echo "setup: creating virtualenv .venv"
    "$PY" -m venv .venv
fi
# The binding first, so that installing sluice finds pyfuse3 already satisfied.
bash binding/build.sh "$PWD/.venv/bin/python"

# The checksums of a device write in one call (blockdev/xxh3blocks.c: the extension
# module _xxh3blocks, which blockdev/checksums.py loads from .build/xxh3blocks; without
# it, python-xxhash computes the same values block by block, slower). x86-64 only (it
# picks SSE2, AVX2 or AVX-512 at run time). Rebuilt when its source, the compiler, the
# xxhash header or the Python changes; a failed build is a warning, not an error.
xxh_dir=.build/xxh3blocks
if [ "$(uname -m)" = x86_64 ]; then
    xxh_ext=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')
    xxh_inc=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
    xxh_hash=$( (cat blockdev/xxh3blocks.c /usr/include/xxhash.h 2>/dev/null; gcc --version | head -1
                 echo "$xxh_ext $xxh_inc") | sha256sum | cut -c1-16)
    if [ ! -f "$xxh_dir/stamp" ] || [ "$(cat "$xxh_dir/stamp")" != "$xxh_hash" ] ||
       [ ! -f "$xxh_dir/_xxh3blocks$xxh_ext" ]; then
        echo "setup: building the block checksum helper (blockdev/xxh3blocks.c)"
        rm -rf "$xxh_dir" && mkdir -p "$xxh_dir"
        if { gcc -O3 -fPIC -msse2 -DXXH3_BLOCKS_VARIANT=sse2 -c blockdev/xxh3blocks.c \
                 -o "$xxh_dir/sse2.o" &&
             gcc -O3 -fPIC -mavx2 -DXXH3_BLOCKS_VARIANT=avx2 -c blockdev/xxh3blocks.c \
                 -o "$xxh_dir/avx2.o" &&
             gcc -O3 -fPIC -mavx512f -DXXH3_BLOCKS_VARIANT=avx512 -c blockdev/xxh3blocks.c \
                 -o "$xxh_dir/avx512.o" &&
             gcc -O2 -fPIC -Wall -Wextra -I"$xxh_inc" -c blockdev/xxh3blocks.c \
                 -o "$xxh_dir/module.o" &&
             gcc -shared -o "$xxh_dir/_xxh3blocks$xxh_ext" "$xxh_dir"/module.o \
                 "$xxh_dir"/sse2.o "$xxh_dir"/avx2.o "$xxh_dir"/avx512.o; } \
               >"$xxh_dir/build.log" 2>&1; then
            echo "$xxh_hash" > "$xxh_dir/stamp"
        else
            rm -f "$xxh_dir/_xxh3blocks$xxh_ext"
            echo "setup: warning: building blockdev/xxh3blocks.c failed (see $xxh_dir/build.log):" \
                 "block checksums are computed by python-xxhash, slower" >&2
        fi
    fi
fi

stamp=.venv/.sluice-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    echo "setup: installing sluice and its test dependencies into .venv"
    .venv/bin/pip install -q --upgrade pip
    .venv/bin/pip install -q -e '.[test]'
    touch "$stamp"
fi

# Byte-compile sluice's packages (only what changed since the last run): every daemon
# start and every `sluice` command imports them, and with PYTHONDONTWRITEBYTECODE set
# Python would compile them again each time, ~0.2 s of CPU per process (the test suite
# starts over a thousand). A stale .pyc is never used: Python checks the source's mtime.
.venv/bin/python -m compileall -q blockdev pager kernelshim fs >/dev/null

# `mount -t fuse.sluice` and fstab look for /sbin/mount.fuse.sluice: point it at this
# clone (the one whose setup ran last), whichever clone it pointed at before — unless
# SLUICE_KEEP_HELPER_LINK=1 and the link works (another clone's tests, or a machine
# whose fstab mounts should keep running the clone they run).
helper="$PWD/.venv/bin/mount.fuse.sluice"
if [ "$(readlink /usr/sbin/mount.fuse.sluice 2>/dev/null)" != "$helper" ]; then
    if [ "${SLUICE_KEEP_HELPER_LINK:-0}" = 1 ] && [ -e /usr/sbin/mount.fuse.sluice ]; then
        echo "setup: note: kept /usr/sbin/mount.fuse.sluice -> $(readlink /usr/sbin/mount.fuse.sluice)" \
             "(SLUICE_KEEP_HELPER_LINK=1): mount -t fuse.sluice runs that clone's code"
    elif [ "$(id -u)" -eq 0 ]; then
        ln -sfn "$helper" /usr/sbin/mount.fuse.sluice
    elif sudo -n true 2>/dev/null; then
        sudo ln -sfn "$helper" /usr/sbin/mount.fuse.sluice
    else
        echo "setup: note: not root: /usr/sbin/mount.fuse.sluice not linked to $helper" \
             "(mount -t fuse.sluice needs it: run as root: ln -sfn $helper /usr/sbin/mount.fuse.sluice)"
    fi
fi
# Other users run this clone with the venv's interpreter (README: "Tenants who run sluice
# themselves"): say so when a directory on the way to it is closed to them.
real_py=$(readlink -f .venv/bin/python)
d=$(dirname "$real_py")
while [ "$d" != / ]; do
    if [ "$(( 0$(stat -c %a "$d") & 1 ))" -eq 0 ]; then
        echo "setup: note: other users cannot run .venv/bin/sluice: its Python ($real_py) is" \
             "under $d, closed to them; to let tenants run sluice, make the venv with a" \
             "system Python (README: \"Tenants who run sluice themselves\")"
        break
    fi
    d=$(dirname "$d")
done
# Let non-root users mount with allow_other (needed when the daemon is not root).
if [ -f /etc/fuse.conf ] && ! grep -q '^user_allow_other' /etc/fuse.conf; then
    if [ "$(id -u)" -eq 0 ]; then
        echo user_allow_other >> /etc/fuse.conf
    elif sudo -n true 2>/dev/null; then
        echo user_allow_other | sudo tee -a /etc/fuse.conf >/dev/null
    else
        echo "setup: note: not root: user_allow_other not added to /etc/fuse.conf" \
             "(a user's sluice mount needs it)"
    fi
fi
