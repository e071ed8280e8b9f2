#!/bin/sh
# Makes a private copy of the Check unit-test framework without installing
# anything system-wide: downloads Debian's packages with `apt-get download`
# and unpacks them with `dpkg -x`.
#
#   scripts/fetch-check.sh [DIR]      (DIR defaults to .deps)
#
# Result: DIR/root/usr/include/check.h and the static libraries
# DIR/root/usr/lib/<multiarch>/libcheck.a and libsubunit.a, which the
# Makefile links (so the test binary does not need these packages at run
# time); DIR/root/.complete marks a finished unpack. The .deb files stay in
# DIR/debs, so a second run works offline.
#
# Needs apt-get and dpkg (Debian, Ubuntu). When the package lists are missing
# (a fresh container), it runs `apt-get update` if it is root.
set -eu

dir=${1:-.deps}
pkgs="check libsubunit-dev libsubunit0"

say() { printf 'fetch-check: %s\n' "$*" >&2; }
die() {
    say "$*"
    say "alternatives: install Check (apt-get install check pkg-config), or"
    say "point the build at a copy: make check CHECK_PREFIX=/path/to/usr"
    exit 1
}

command -v apt-get >/dev/null 2>&1 || die "apt-get not found (not a Debian-like system)"
command -v dpkg >/dev/null 2>&1 || die "dpkg not found"

mkdir -p "$dir/debs"
debs=$(cd "$dir/debs" && pwd)

have_debs() {
    for p in $pkgs; do
        set -- "$debs/${p}"_*.deb
        [ -f "$1" ] || return 1
    done
    return 0
}

# $pkgs is split into words on purpose.
# shellcheck disable=SC2086
download() {
    # As root, apt drops to the _apt user to download, which cannot write
    # into a directory it does not own; download as root instead.
    if [ "$(id -u)" = 0 ]; then
        (cd "$debs" && apt-get -q download -o APT::Sandbox::User=root $pkgs)
    else
        (cd "$debs" && apt-get -q download $pkgs)
    fi
}

if ! have_debs; then
    rm -f "$debs"/*.deb
    say "downloading $pkgs into $debs"
    if ! download; then
        if [ "$(id -u)" = 0 ]; then
            say "download failed; running apt-get update and retrying"
            apt-get -q update >/dev/null || die "apt-get update failed"
            download || die "apt-get download $pkgs failed"
        else
            die "apt-get download $pkgs failed (package lists missing? run 'sudo apt-get update')"
        fi
    fi
fi

# Unpack into a scratch directory and move it into place only when complete,
# so an interrupted run is never mistaken for a finished one.
root="$dir/root"
tmp="$dir/root.tmp"
rm -rf "$tmp"
mkdir -p "$tmp"
for deb in "$debs"/*.deb; do
    dpkg -x "$deb" "$tmp" || die "dpkg -x $deb failed"
done

[ -f "$tmp/usr/include/check.h" ] || die "check.h missing from the check package"
found=
for lib in "$tmp"/usr/lib/*/libcheck.a "$tmp"/usr/lib/libcheck.a; do
    if [ -f "$lib" ]; then found=$lib; break; fi
done
[ -n "$found" ] || die "libcheck.a missing from the check package"
[ -f "$(dirname "$found")/libsubunit.a" ] || die "libsubunit.a missing from libsubunit-dev"

rm -rf "$root"
mv "$tmp" "$root"
touch "$root/.complete"
say "Check unpacked into $root/usr (static: ${found#"$tmp"/})"
