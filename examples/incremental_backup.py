#!/usr/bin/env python3
"""An incremental backup with qdirty, as a backup tool does it.

1. Creates disk.qcow2 with an external raw data file (disk.raw, data_file_raw=on), so the
   guest data can be read directly from disk.raw.
2. In one qdirty Transaction: adds a persistent bitmap and clears it, at the moment of the full
   backup (QEMU's recommended pattern: bitmap and full backup start from the same point).
   The full backup copies disk.raw to backup.raw.
3. The guest writes (qemu-io) are recorded in the bitmap.
4. Incremental backup (QEMU's backup-job pattern): create_successor() freezes the bitmap and
   records new writes in a successor; the dirty extents of the frozen bitmap are copied from
   disk.raw into backup.raw; on success abdicate() (the successor, holding only the writes
   made during the backup, becomes the bitmap), on failure reclaim() (nothing is lost).
5. Verifies with `qemu-img compare` (identical) and `qemu-img check`.

Usage: incremental_backup.py [DIR]   (default: a temporary directory)
Needs qemu-img, qemu-io and the qdirty package (`pip install ./python`).
"""

import os
import shutil
import subprocess
import sys
import tempfile
from typing import Iterable, Tuple

import qdirty

SIZE = 64 << 20
BITMAP = "backup-inc"


def run(cwd: str, *args: str) -> str:
    r = subprocess.run(args, cwd=cwd, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed ({r.returncode}):\n{r.stdout}{r.stderr}")
    return r.stdout


def guest_write(cwd: str, offset: int, length: int, pattern: str) -> None:
    """The guest writes through QEMU's qcow2 driver (qdirty does not have the image open, so
    QEMU marks the persistent bitmap itself)."""
    run(cwd, "qemu-io", "-f", "qcow2", "-c", f"write -P {pattern} {offset} {length}", "disk.qcow2")


def copy_extents(src: str, dst: str, extents: Iterable[Tuple[int, int]]) -> int:
    copied = 0
    with open(src, "rb") as fi, open(dst, "r+b") as fo:
        for offset, length in extents:
            fi.seek(offset)
            data = fi.read(length)
            fo.seek(offset)
            fo.write(data)
            copied += len(data)
        fo.flush()
        os.fsync(fo.fileno())
    return copied


def main(workdir: str) -> int:
    disk, raw, backup = (os.path.join(workdir, n) for n in ("disk.qcow2", "disk.raw", "backup.raw"))
    for p in (disk, raw, backup):
        if os.path.exists(p):
            os.remove(p)
    run(workdir, "qemu-img", "create", "-f", "qcow2", "-o", "data_file=disk.raw,data_file_raw=on",
        "disk.qcow2", str(SIZE))

    guest_write(workdir, 0, 1 << 20, "0x11")
    guest_write(workdir, 20 << 20, 3 << 20, "0x22")

    # Full backup: the bitmap is added and cleared in one transaction, at the copy.
    with qdirty.Image.open(disk, rw=True) as img:
        with qdirty.Transaction() as txn:
            txn.add(img, BITMAP, persistent=True)
            txn.clear(img, BITMAP)
            shutil.copyfile(raw, backup)
    print(f"full backup: {os.path.getsize(backup)} bytes")

    # The guest keeps writing; QEMU records it in the persistent bitmap.
    guest_write(workdir, 512 << 10, 128 << 10, "0x33")
    guest_write(workdir, 40 << 20, 64 << 10, "0x44")
    guest_write(workdir, SIZE - 4096, 4096, "0x55")

    # Incremental backup.
    with qdirty.Image.open(disk, rw=True) as img:
        bm = img[BITMAP]
        bm.check(qdirty.CHECK_DEFAULT)
        frozen_sha = bm.sha256()
        successor = bm.create_successor()
        try:
            extents = list(bm.dirty_extents(max_len=4 << 20))
            copied = copy_extents(raw, backup, extents)
        except BaseException:
            bm.reclaim()  # the job failed: the bitmap keeps every bit
            raise
        assert bm.sha256() == frozen_sha
        new = bm.abdicate()  # the job succeeded: the successor takes over the name
        assert new is successor and new.name == BITMAP and new.persistent
        assert new.count() == 0
    print(f"incremental backup: {len(extents)} extents, {copied} bytes copied of {SIZE} "
          f"({100.0 * copied / SIZE:.2f}%)")

    out = run(workdir, "qemu-img", "compare", "-f", "qcow2", "-F", "raw", "disk.qcow2", "backup.raw")
    print(out.strip())
    run(workdir, "qemu-img", "check", "disk.qcow2")
    info = run(workdir, "qemu-img", "info", "disk.qcow2")
    assert BITMAP in info, info
    print("qemu-img check: no errors; the bitmap is stored and empty, ready for the next backup")
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1:
        os.makedirs(sys.argv[1], exist_ok=True)
        sys.exit(main(sys.argv[1]))
    with tempfile.TemporaryDirectory(prefix="qdirty-backup-") as d:
        sys.exit(main(d))
