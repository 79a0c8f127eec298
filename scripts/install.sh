#!/usr/bin/env bash
# Installs libqdirty, include/qdirty.h and a pkg-config file under a prefix, without cargo-c
# (distributions can use `cargo cinstall`, configured in Cargo.toml's [package.metadata.capi],
# which produces the same layout).
#
#   scripts/install.sh [--prefix DIR] [--libdir DIR] [--includedir DIR] [--destdir DIR]
#                      [--lib PATH_TO_BUILT_SO] [--bindir DIR] [--mandir DIR] [--bin PATH]
#
# Without --lib it runs `cargo build --release` first and installs target/release/libqdirty.so.
# It installs, for version X.Y.Z and ABI major N (QDIRTY_ABI_MAJOR in include/qdirty.h, the
# soname's number):
#   LIBDIR/libqdirty.so.X.Y.Z           the library (its soname is libqdirty.so.N)
#   LIBDIR/libqdirty.so.N     -> libqdirty.so.X.Y.Z   (what programs load)
#   LIBDIR/libqdirty.so       -> libqdirty.so.N       (what `-lqdirty` links)
#   INCLUDEDIR/qdirty.h
#   LIBDIR/pkgconfig/qdirty.pc          (from scripts/qdirty.pc.in)
# Defaults: --prefix /usr/local, --libdir PREFIX/lib, --includedir PREFIX/include; a relative
# --libdir or --includedir is relative to the prefix (as in cargo-c: --libdir lib64). --destdir
# stages the files under DIR (as make's DESTDIR) while the .pc file names the final paths.
# Then: cc prog.c $(pkg-config --cflags --libs qdirty), with PKG_CONFIG_PATH=LIBDIR/pkgconfig
# unless LIBDIR/pkgconfig is already on pkg-config's search path.
# The qdirty command (--bin PATH, default: the qdirty built next to the library; skipped with a
# note when there is none), its manual page and its bash completion go to:
#   BINDIR/qdirty                                   (--bindir, default PREFIX/bin)
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
destdir=
lib=
bindir=
mandir=
bin=
while [ $# -gt 0 ]; do
    case "$1" in
        --prefix | --libdir | --includedir | --destdir | --lib | --bindir | --mandir | --bin)
            [ $# -ge 2 ] || die "$1 needs a value"
            opt=${1#--}
            val=$2
            shift 2
            ;;
        --prefix=* | --libdir=* | --includedir=* | --destdir=* | --lib=* | --bindir=* | --mandir=* | --bin=*)
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
        destdir) destdir=$val ;;
        lib) lib=$val ;;
        bindir) bindir=$val ;;
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
libdir=${libdir%/}
includedir=${includedir%/}

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

if [ -z "$lib" ]; then
    echo "install.sh: cargo build --release"
    (cd "$root" && cargo build --release)
    lib=${CARGO_TARGET_DIR:-$root/target}/release/libqdirty.so
    case "$lib" in
        /*) ;;
        *) lib=$root/$lib ;;
    esac
fi
[ -f "$lib" ] || die "$lib does not exist (build it with cargo build --release, or pass --lib)"

# A library without the soname (an old build, another platform) would make every consumer depend
# on the unversioned name: refuse it. readelf comes with binutils, like the linker.
if command -v readelf >/dev/null 2>&1; then
    got=$(LC_ALL=C readelf -d "$lib" | sed -n 's/.*(SONAME).*\[\(.*\)\].*/\1/p')
    [ "$got" = "$soname" ] || die "$lib has soname '${got:-none}', expected '$soname' (rebuild it)"
else
    echo "install.sh: readelf not found; not checking the soname of $lib" >&2
fi

dest_lib=$destdir$libdir
dest_inc=$destdir$includedir
dest_pc=$dest_lib/pkgconfig
mkdir -p "$dest_lib" "$dest_inc" "$dest_pc"

# Copy, then rename over the old file: a running program that maps the old library keeps it.
install_file() { # mode source destination
    tmp="$3.tmp.$$"
    cp "$2" "$tmp"
    chmod "$1" "$tmp"
    mv -f "$tmp" "$3"
}

install_file 0755 "$lib" "$dest_lib/$real"
ln -sfn "$real" "$dest_lib/$soname"
ln -sfn "$soname" "$dest_lib/libqdirty.so"
install_file 0644 "$header" "$dest_inc/qdirty.h"

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

# The command, its manual page and its bash completion.
bindir=$(under "$prefix" "${bindir:-bin}")
mandir=$(under "$prefix" "${mandir:-share/man}")
compdir=$prefix/share/bash-completion/completions
[ -n "$bin" ] || bin=$(dirname "$lib")/qdirty
if [ -f "$bin" ]; then
    mkdir -p "$destdir$bindir"
    install_file 0755 "$bin" "$destdir$bindir/qdirty"
else
    echo "install.sh: no qdirty command at $bin (build it with cargo build --release, or pass --bin): not installed" >&2
fi
mkdir -p "$destdir$mandir/man1" "$destdir$compdir"
install_file 0644 "$root/cli/man/qdirty.1" "$destdir$mandir/man1/qdirty.1"
install_file 0644 "$root/cli/completion/qdirty.bash" "$destdir$compdir/qdirty"

echo "install.sh: installed qdirty $version (soname $soname) under $destdir$prefix:"
echo "  $dest_lib/$real"
echo "  $dest_lib/$soname -> $real"
echo "  $dest_lib/libqdirty.so -> $soname"
echo "  $dest_inc/qdirty.h"
echo "  $dest_pc/qdirty.pc"
if [ -z "$destdir" ]; then
    echo "Use it with: PKG_CONFIG_PATH=$libdir/pkgconfig pkg-config --cflags --libs qdirty"
fi
