"""Reads of a bitmap that cannot be used raise QdirtyError, never answer "clean": a bitmap left
in_use on disk (QEMU killed while it had the image open read-write), one made inconsistent
while iterated, one whose data cannot be read."""

import errno
import os
import shlex
import struct
import subprocess
import unittest

from _util import KiB, MiB, TempDirTest, qdirty, qemu_img_bitmaps, require_tool

INCONSISTENT = "Bitmap 'b' is inconsistent and cannot be used"

#: Every read of a bitmap's bits, as a call on a Bitmap.
READS = {
    "count": lambda bm: bm.count(),
    "get": lambda bm: bm.get(0),
    "in": lambda bm: 0 in bm,
    "next_dirty": lambda bm: bm.next_dirty(),
    "next_zero": lambda bm: bm.next_zero(),
    "next_dirty_area": lambda bm: bm.next_dirty_area(),
    "status": lambda bm: bm.status(0),
    "sha256": lambda bm: bm.sha256(),
    "iter_granules": lambda bm: list(bm.iter_granules()),
    "dirty_extents": lambda bm: list(bm.dirty_extents()),
    "clean_extents": lambda bm: list(bm.clean_extents()),
}

BITMAPS_EXT = 0x23852875


def bitmap_data_range(path, name):
    """[first, end) of the data clusters of bitmap ``name``, read from the raw qcow2 file
    (header extensions, bitmap directory, bitmap table), independently of qdirty."""
    with open(path, "rb") as f:
        raw = f.read()
    cluster_bits = struct.unpack_from(">I", raw, 20)[0]
    header_length = struct.unpack_from(">I", raw, 100)[0]
    off = header_length
    while True:
        magic, length = struct.unpack_from(">II", raw, off)
        if magic == 0:
            raise AssertionError("no bitmaps extension")
        if magic == BITMAPS_EXT:
            nb, _, dir_size, dir_off = struct.unpack_from(">IIQQ", raw, off + 8)
            break
        off += 8 + (length + 7) // 8 * 8
    p = dir_off
    for _ in range(nb):
        table_off, table_size, _, _, _, name_size, extra = struct.unpack_from(">QIIBBHI", raw, p)
        at = p + 24 + extra
        if raw[at:at + name_size] == name.encode():
            entries = struct.unpack_from(f">{table_size}Q", raw, table_off)
            data = [e & 0x00FFFFFFFFFFFE00 for e in entries if e & 0x00FFFFFFFFFFFE00]
            return min(data), max(data) + (1 << cluster_bits)
        p += (24 + extra + name_size + 7) // 8 * 8
    raise AssertionError(f"no bitmap {name!r}")


class FaultyHost:
    """Serves a qcow2 file to Image.open_with_io; reads touching [start, end) fail with EIO."""

    def __init__(self, path, start, end):
        self.fd = os.open(path, os.O_RDONLY)
        self.start, self.end = start, end
        self.failed = 0

    def pread(self, offset, length):
        if offset < self.end and offset + length > self.start:
            self.failed += 1
            raise OSError(errno.EIO, "injected read error")
        return os.pread(self.fd, length, offset)

    def flush(self):
        pass

    def get_length(self):
        return os.fstat(self.fd).st_size

    def close(self):
        os.close(self.fd)


class UnusableBitmapTest(TempDirTest):
    def assert_reads_refused(self, bm, errno_value, message):
        for what, read in READS.items():
            with self.subTest(read=what):
                with self.assertQdirtyError(errno_value) as cm:
                    read(bm)
                self.assertIn(message, cm.exception.message)

    def qemu_in_use_image(self):
        """An image QEMU left with bitmap 'b' in_use (qemu-io aborted while writing), then a
        consistent bitmap 'ok' QEMU added and wrote [2 MiB, +4 KiB) to."""
        qemu_img = require_tool(self, "qemu-img")
        qemu_io = require_tool(self, "qemu-io")
        p = self.path("vm.qcow2")

        def run(*args):
            r = subprocess.run(args, capture_output=True, text=True)
            self.assertEqual(r.returncode, 0, f"{args}: {r.stderr}")

        run(qemu_img, "create", "-q", "-f", "qcow2", p, "4M")
        run(qemu_img, "bitmap", "--add", p, "b")
        run(qemu_io, "-f", "qcow2", "-c", "write 0 64k", p)
        script = f"ulimit -c 0; exec {shlex.quote(qemu_io)} -f qcow2 -c 'write 1M 64k' -c abort {shlex.quote(p)}"
        r = subprocess.run(["sh", "-c", script], capture_output=True)
        self.assertNotEqual(r.returncode, 0, "qemu-io abort exited normally")
        run(qemu_img, "bitmap", "--add", p, "ok")
        run(qemu_io, "-f", "qcow2", "-c", "write 2M 4k", p)
        flags = {b["name"]: b["flags"] for b in qemu_img_bitmaps(self, p)}
        self.assertEqual(flags, {"b": ["in-use", "auto"], "ok": ["auto"]})
        return p

    def test_in_use_bitmap_from_qemu(self):
        p = self.qemu_in_use_image()
        for rw in (False, True):
            with self.subTest(rw=rw), qdirty.Image.open(p, rw=rw) as img:
                bm = img["b"]
                self.assertTrue(bm.inconsistent)
                self.assert_reads_refused(bm, errno.EINVAL, INCONSISTENT)
                with self.assertQdirtyError(errno.EINVAL) as cm:
                    bm.count()
                self.assertIn("block-dirty-bitmap-remove", cm.exception.hint)
                # The consistent one reads as QEMU wrote it (64 KiB granularity).
                ok = img["ok"]
                self.assertEqual(ok.count(), 64 * KiB)
                self.assertEqual(list(ok.dirty_extents()), [(2 * MiB, 64 * KiB)])
                self.assertEqual(list(ok.iter_granules()), [2 * MiB])

    def test_in_use_bitmap_left_by_a_copy(self):
        # The same without QEMU: a copy taken while qdirty had the image open read-write.
        copy = self.in_use_copy()
        with qdirty.Image.open(copy) as img:
            self.assert_reads_refused(img["b"], errno.EINVAL, INCONSISTENT)

    def test_iteration_stops_with_an_error_when_the_bitmap_becomes_inconsistent(self):
        p = self.new_image(size=4 * MiB)
        with qdirty.Image.open(p, rw=True) as img:
            bm = img.add_bitmap("b", persistent=True, granularity=64 * KiB)
            bm.set_dirty(0, 1)
            bm.set_dirty(MiB, 1)
            with bm.iter_granules() as it:
                self.assertEqual(next(it), 0)
                bm.set_inconsistent()
                with self.assertQdirtyError(errno.EINVAL) as cm:
                    next(it)
                self.assertIn(INCONSISTENT, cm.exception.message)

    def test_unreadable_bitmap_data_is_never_clean(self):
        p = self.new_image(size=4 * MiB)
        with qdirty.Image.open(p, rw=True) as img:
            img.add_bitmap("b", persistent=True).set_dirty(MiB, 1)
        start, end = bitmap_data_range(p, "b")
        warnings = []
        qdirty.set_warning_handler(warnings.append)
        for what, read in READS.items():
            with self.subTest(read=what):
                host = FaultyHost(p, start, end)
                try:
                    with qdirty.Image.open_with_io(host, "faulty") as img:
                        bm = img["b"]
                        with self.assertRaises(qdirty.QdirtyError) as cm:
                            read(bm)
                        self.assertIn("'b'", cm.exception.message)
                    self.assertGreater(host.failed, 0)
                finally:
                    host.close()
        # Without the fault the same reads see the bit.
        host = FaultyHost(p, 0, 0)
        try:
            with qdirty.Image.open_with_io(host, "sound") as img:
                self.assertEqual(list(img["b"].dirty_extents()), [(MiB, 64 * KiB)])
        finally:
            host.close()


if __name__ == "__main__":
    unittest.main()
