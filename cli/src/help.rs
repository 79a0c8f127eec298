//! The help texts: `qdirty --help` and `qdirty COMMAND --help`.

pub const USAGE: &str = "\
usage: qdirty COMMAND [OPTIONS]

Commands (qdirty COMMAND --help for each):
  info   [-U] [--output=human|json] [--count] IMG
  bitmap (--add | --remove | --clear | --enable | --disable | --merge SOURCE)...
         [-b SOURCE_FILE [-F FMT]] [-g GRANULARITY] IMG BITMAP
  dump   [-U] [--union] [--skip-inconsistent] [--output=human|json] IMG [BITMAP...]
  check  [-U] [-r] [--remove-inconsistent] [--salvage [--remove-broken]] [--drop-bitmaps]
         [--output=human|json] IMG
  create [-o cluster_size=SIZE] [-q] IMG SIZE

IMG may be a json:{...} pseudo-filename, or with --image-opts a QEMU option string.
  --version  print the version and exit
";

pub const INFO_HELP: &str = "\
usage: qdirty info [-f FMT | --image-opts] [-U] [--output=human|json] [--count] FILENAME

Shows the virtual size, the cluster size and every bitmap of the qcow2 image FILENAME: name,
granularity, flags as QEMU names them (auto, in-use) and whether it is consistent. Only the
header and the bitmap directory are read, so this is fast whatever the bitmaps' sizes.

Locks: as qemu-img info, it takes QEMU's shared read locks, so it is refused while QEMU has the
image open read-write; then a bitmap found in use was left so by a QEMU that is gone
(inconsistent). -U reads a busy image without locks: its in-use bitmaps are shown as in use
(the running QEMU is updating them).

  -h, --help          print this help and exit
  --output=FMT        human (default) or json (qemu-img info's document, plus qdirty's
                      additions)
  -c, --count         also load the bitmaps and show how many bytes each has dirty
  -f, --format FMT    qcow2 (probed when not given)
  --image-opts        FILENAME is a QEMU option string (see qdirty bitmap --help); FILENAME
                      may also be json:{...}
  -U, --force-share   open without locks, to look at an image another process is using
";

pub const BITMAP_HELP: &str = "\
usage: qdirty bitmap (--merge SOURCE | --add | --remove | --clear | --enable | --disable)...
                     [-f FMT | --image-opts] [-b SOURCE_FILE [-F SOURCE_FMT]] [-g SIZE]
                     [--object OBJDEF] FILENAME BITMAP

Changes the persistent bitmap BITMAP of FILENAME, as `qemu-img bitmap` does, with its options,
messages and exit codes: the operations are applied in the order given; the first failure stops
(what succeeded before is kept). The image is opened read-write with QEMU's image locks (it is
refused while QEMU or another program uses it); the -b source is opened read-only, also locked.

  -h, --help               print this help and exit
  --add                    add BITMAP, enabled (with --disable after it: disabled)
  -g, --granularity SIZE   granularity for --add (512 .. 2G, power of two; 64k, 1M...;
                           default: the cluster size within [4k, 64k])
  --remove                 remove BITMAP (also allowed when it is inconsistent)
  --clear                  clear every bit of BITMAP
  --enable, --disable      make BITMAP record writes (stored with the auto flag), or stop
  --merge SOURCE           BITMAP |= SOURCE (any granularity); SOURCE is in FILENAME or in
                           SOURCE_FILE
  -b, --source-file SOURCE_FILE
                           the image that holds SOURCE (a file name or json:{...})
  -F, --source-format SOURCE_FMT
                           SOURCE_FILE's format: qcow2, or raw (which holds no bitmaps)
  -f, --format FMT         FILENAME's format: qcow2, or raw (no bitmaps can be stored there);
                           probed when not given
  --image-opts             FILENAME is a QEMU option string, e.g.
                           driver=qcow2,file.driver=file,file.filename=disk.qcow2
                           (FILENAME may also be a json:{...} pseudo-filename without it)
  --object OBJDEF          accepted for qemu-img compatibility (qdirty reads no encrypted data)
";

pub const DUMP_HELP: &str = "\
usage: qdirty dump [-f FMT | --image-opts] [-U] [--output=human|json] [--union]
                   [--skip-inconsistent] FILENAME [BITMAP...]

Lists the dirty extents of each BITMAP (default: every bitmap) of FILENAME, offline: the same
extents `qemu-nbd -B BITMAP` exports as qemu:dirty-bitmap:BITMAP. The extents are written as
they are found (a closed pipe ends the listing quietly).

An inconsistent (in-use) bitmap has no usable extents: a named one is refused (exit 1, no
output). When listing every bitmap, it is reported without extents (human: a '#' line; json:
\"consistent\": false), the other bitmaps are listed in full, stderr names it and the exit
status is 1, so that a script cannot take it for \"nothing changed\".
A bitmap whose data cannot be read is an error (exit 1, no output).

Locks: QEMU's shared read locks, as qemu-img map takes them (refused while QEMU has the image
open read-write); -U reads without locks (a running QEMU's bitmaps are in use: no extents).

  -h, --help           print this help and exit
  --union              one extent list: the union of the bitmaps (what is dirty in any of
                       them, e.g. everything changed since the oldest of several checkpoints)
  --skip-inconsistent  report inconsistent bitmaps (listed or named) without extents and exit
                       0 (stderr still names them), as qemu-img convert --skip-broken-bitmaps
                       leaves them out
  --output=FMT         human (default: one \"OFFSET LENGTH\" line per extent) or json
  -f, --format FMT     qcow2 (probed when not given)
  --image-opts         FILENAME is a QEMU option string; FILENAME may also be json:{...}
  -U, --force-share    open without locks
";

pub const CHECK_HELP: &str = "\
usage: qdirty check [-f FMT | --image-opts] [-U] [-r [leaks]] [--remove-inconsistent]
                    [--salvage [--remove-broken]] [--drop-bitmaps] [--output=human|json]
                    FILENAME

Checks the refcounts of FILENAME as `qemu-img check` does (same leak and corruption counts,
allocation figures and exit status: 0 clean, 2 corruptions, 3 leaks only, 1 could not check)
and says which problems involve bitmap structures (directory, tables, data clusters, a bitmaps
extension that a program without bitmap support invalidated).

Locks: as qemu-img check, QEMU's shared read locks (write locks with -r and the options that
change the image), so it is refused while QEMU uses the image; -U checks without locks (what
the other process writes meanwhile may show as errors) and excludes every option that writes.

  -h, --help             print this help and exit
  -r, --repair [leaks]   reclaim leaked clusters (refused when corruptions were found: use
                         'qemu-img check -r all'); drops an invalidated bitmaps extension
  --remove-inconsistent  remove the bitmaps that are inconsistent (in-use) first
  --salvage              for images QEMU refuses because of a broken bitmap directory entry or
                         table: list every broken bitmap (name, or entry index when the name is
                         empty or not printable) and why QEMU refuses it; the valid bitmaps are
                         kept. A broken bitmap found makes the exit status 2 (as a corruption)
  --remove-broken        with --salvage: remove the broken bitmaps (their clusters are leaked,
                         never freed: '-r' reclaims them); QEMU then opens the image again
  --drop-bitmaps         drop the whole bitmaps extension (every bitmap is lost; their clusters
                         are leaked), for a bitmap directory too broken to salvage entry by entry.
                         Guest data is never touched
  --output=FMT           human (default) or json (qemu-img check's document, plus qdirty's
                         additions)
  -f, --format FMT       qcow2 (probed when not given)
  --image-opts           FILENAME is a QEMU option string; FILENAME may also be json:{...}
  -U, --force-share      open without locks (not with the options that write)
";

pub const CREATE_HELP: &str = "\
usage: qdirty create IMG SIZE [-o cluster_size=SIZE] [-q]

Creates a blank qcow2 v3 image of SIZE bytes (suffixes k, M, G, T, P, E) laid out as
`qemu-img create -f qcow2` does. IMG must not exist.

  -o cluster_size=SIZE  512 .. 2M, power of two (default 64k)
  -q                    quiet
  -f qcow2              accepted for qemu-img compatibility
";
