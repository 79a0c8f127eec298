#!/usr/bin/env bash
# Installs libqdirty, include/qdirty.h, a pkg-config file and the qdirty command under a prefix.
#
#   scripts/install.sh [--prefix DIR] [--libdir DIR] [--includedir DIR] [--bindir DIR]
#                      [--mandir DIR] [--destdir DIR] [--lib PATH_TO_BUILT_SO]
#                      [--bin PATH_TO_BUILT_QDIRTY] [--no-strip]
#
# What --lib and --bin do not name it builds with `cargo build --release` (-p qdirty, -p
# qdirty-cli) and takes from target/release/. It installs, for version X.Y.Z and ABI major N
# (QDIRTY_ABI_MAJOR in include/qdirty.h, the soname's number):
#   LIBDIR/libqdirty.so.X.Y.Z           the library (its soname is libqdirty.so.N)
#   LIBDIR/libqdirty.so.N     -> libqdirty.so.X.Y.Z   (what programs load)
#   LIBDIR/libqdirty.so       -> libqdirty.so.N       (what `-lqdirty` links)
#   INCLUDEDIR/qdirty.h
#   LIBDIR/pkgconfig/qdirty.pc          (from scripts/qdirty.pc.in)
#   BINDIR/qdirty                       the command
# The library and the command are stripped (strip --strip-unneeded, or $STRIP): the release
# profile keeps line tables for profiling and backtraces, which the installed copies do not
# need. --no-strip installs them as built.
# Defaults: --prefix /usr/local, --libdir PREFIX/lib, --includedir PREFIX/include, --bindir
# PREFIX/bin; a relative --libdir, --includedir or --bindir is relative to the prefix (as in
# cargo-c: --libdir lib64). --destdir stages the files under DIR (as make's DESTDIR) while the
# .pc file names the final paths.
# Then: cc prog.c $(pkg-config --cflags --libs qdirty), with PKG_CONFIG_PATH=LIBDIR/pkgconfig
# unless LIBDIR/pkgconfig is already on pkg-config's search path.
# The command's manual page and bash completion go to:
#   MANDIR/man1/qdirty.1                            (--mandir, default PREFIX/share/man)
#   PREFIX/share/bash-completion/completions/qdirty
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)

usage() {
    sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
}

die() {
    printf 'install.sh: %s\n' "$*" >&2
    exit 1
}

prefix=/usr/local
libdir=
includedir=
bindir=
destdir=
lib=
mandir=
bin=
strip=yes
while [ $# -gt 0 ]; do
    case "$1" in
        --no-strip)
            strip=no
            shift
            continue
            ;;
        --prefix | --libdir | --includedir | --bindir | --mandir | --destdir | --lib | --bin)
            [ $# -ge 2 ] || die "$1 needs a value"
            opt=${1#--}
            val=$2
            shift 2
            ;;
        --prefix=* | --libdir=* | --includedir=* | --bindir=* | --mandir=* | --destdir=* | --lib=* | --bin=*)
            opt=${1%%=*}
            opt=${opt#--}
            val=${1#*=}
            shift
            ;;
        -h | --help)
            usage
            exit 0
            ;;
        *)
            usage >&2
            die "unknown argument: $1"
            ;;
    esac
    [ -n "$val" ] || die "--$opt needs a non-empty value"
    case "$opt" in
        prefix) prefix=$val ;;
        libdir) libdir=$val ;;
        includedir) includedir=$val ;;
        bindir) bindir=$val ;;
        destdir) destdir=$val ;;
        lib) lib=$val ;;
        mandir) mandir=$val ;;
        bin) bin=$val ;;
    esac
done

# Paths written into the .pc file must be absolute (pkg-config does not resolve them).
under() { # base path: path made absolute relative to base
    case "$2" in
        /*) printf '%s\n' "$2" ;;
        *) printf '%s/%s\n' "$1" "$2" ;;
    esac
}
prefix=$(under "$(pwd)" "$prefix")
prefix=${prefix%/}
libdir=$(under "$prefix" "${libdir:-lib}")
includedir=$(under "$prefix" "${includedir:-include}")
bindir=$(under "$prefix" "${bindir:-bin}")
libdir=${libdir%/}
includedir=${includedir%/}
bindir=${bindir%/}

header=$root/include/qdirty.h
template=$root/scripts/qdirty.pc.in
[ -f "$header" ] || die "$header is missing"
[ -f "$template" ] || die "$template is missing"

# The crate version: the first `version = "..."` of Cargo.toml's [package] table.
version=$(awk '
    /^\[/ { in_package = ($0 == "[package]") ; next }
    in_package && /^version[ \t]*=/ {
        sub(/^version[ \t]*=[ \t]*"/, ""); sub(/".*$/, ""); print; exit
    }' "$root/Cargo.toml")
case "$version" in
    [0-9]*.[0-9]*.[0-9]*) ;;
    *) die "cannot read the version from $root/Cargo.toml (got '$version')" ;;
esac

# The ABI major, the soname's number.
abi=$(sed -n 's/^#define QDIRTY_ABI_MAJOR \([0-9][0-9]*\)u\{0,1\}$/\1/p' "$header")
[ -n "$abi" ] || die "no '#define QDIRTY_ABI_MAJOR N' in $header"
soname=libqdirty.so.$abi
real=libqdirty.so.$version

release=${CARGO_TARGET_DIR:-$root/target}/release
case "$release" in
    /*) ;;
    *) release=$root/$release ;;
esac
packages=()
[ -n "$lib" ] || packages+=(-p qdirty)
[ -n "$bin" ] || packages+=(-p qdirty-cli)
if [ ${#packages[@]} -gt 0 ]; then
    echo "install.sh: cargo build --release ${packages[*]}"
    (cd "$root" && cargo build --release "${packages[@]}")
fi
lib=${lib:-$release/libqdirty.so}
bin=${bin:-$release/qdirty}
[ -f "$lib" ] || die "$lib does not exist (build it with cargo build --release, or pass --lib)"
[ -f "$bin" ] || die "$bin does not exist (build it with cargo build --release, or pass --bin)"

# A library without the soname (an old build, another platform) would make every consumer depend
# on the unversioned name: refuse it. readelf comes with binutils, like the linker.
if command -v readelf >/dev/null 2>&1; then
    got=$(LC_ALL=C readelf -d "$lib" | sed -n 's/.*(SONAME).*\[\(.*\)\].*/\1/p')
    [ "$got" = "$soname" ] || die "$lib has soname '${got:-none}', expected '$soname' (rebuild it)"
else
    echo "install.sh: readelf not found; not checking the soname of $lib" >&2
fi

strip_tool=${STRIP:-strip}
if [ "$strip" = yes ] && ! command -v "$strip_tool" >/dev/null 2>&1; then
    die "$strip_tool not found (install binutils, set STRIP, or pass --no-strip)"
fi

dest_lib=$destdir$libdir
dest_inc=$destdir$includedir
dest_bin=$destdir$bindir
dest_pc=$dest_lib/pkgconfig
mkdir -p "$dest_lib" "$dest_inc" "$dest_pc" "$dest_bin"

# Copy (stripped if asked), then rename over the old file: a running program that maps the old
# library keeps it.
install_file() { # mode source destination [strip]
    tmp="$3.tmp.$$"
    cp "$2" "$tmp"
    if [ "${4:-}" = strip ] && [ "$strip" = yes ]; then
        "$strip_tool" --strip-unneeded "$tmp" || {
            rm -f "$tmp"
            die "$strip_tool --strip-unneeded $2 failed"
        }
    fi
    chmod "$1" "$tmp"
    mv -f "$tmp" "$3"
}

install_file 0755 "$lib" "$dest_lib/$real" strip
ln -sfn "$real" "$dest_lib/$soname"
ln -sfn "$soname" "$dest_lib/libqdirty.so"
install_file 0644 "$header" "$dest_inc/qdirty.h"
install_file 0755 "$bin" "$dest_bin/qdirty" strip

# ${prefix}-relative paths in the .pc file when they are under the prefix (pkg-config's
# --define-prefix and relocations then work), absolute ones otherwise.
# shellcheck disable=SC2016 # '${prefix}' is literal text for pkg-config
pc_path() {
    case "$1" in
        "$prefix") printf '%s\n' '${prefix}' ;;
        "$prefix"/*) printf '%s\n' "\${prefix}${1#"$prefix"}" ;;
        *) printf '%s\n' "$1" ;;
    esac
}
pc_libdir=$(pc_path "$libdir")
pc_includedir=$(pc_path "$includedir")
# sed replacement text: escape \, & and the | delimiter.
esc() { printf '%s\n' "$1" | sed 's/[\\&|]/\\&/g'; }
sed -e "s|@PREFIX@|$(esc "$prefix")|g" \
    -e "s|@LIBDIR@|$(esc "$pc_libdir")|g" \
    -e "s|@INCLUDEDIR@|$(esc "$pc_includedir")|g" \
    -e "s|@VERSION@|$(esc "$version")|g" \
    "$template" >"$dest_pc/qdirty.pc.tmp.$$"
mv -f "$dest_pc/qdirty.pc.tmp.$$" "$dest_pc/qdirty.pc"

# The command's manual page and its bash completion.
mandir=$(under "$prefix" "${mandir:-share/man}")
compdir=$prefix/share/bash-completion/completions
mkdir -p "$destdir$mandir/man1" "$destdir$compdir"
install_file 0644 "$root/cli/man/qdirty.1" "$destdir$mandir/man1/qdirty.1"
install_file 0644 "$root/cli/completion/qdirty.bash" "$destdir$compdir/qdirty"

echo "install.sh: installed qdirty $version (soname $soname) under $destdir$prefix:"
echo "  $dest_lib/$real"
echo "  $dest_lib/$soname -> $real"
echo "  $dest_lib/libqdirty.so -> $soname"
echo "  $dest_inc/qdirty.h"
echo "  $dest_pc/qdirty.pc"
echo "  $dest_bin/qdirty"
echo "  $destdir$mandir/man1/qdirty.1"
echo "  $destdir$compdir/qdirty"
[ "$strip" = yes ] || echo "  (not stripped: --no-strip)"
if [ -z "$destdir" ]; then
    echo "Use it with: PKG_CONFIG_PATH=$libdir/pkgconfig pkg-config --cflags --libs qdirty"
fi
