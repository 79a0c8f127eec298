"""Salvage: broken bitmap directory entries listed, removed; the whole extension dropped."""

import struct
import subprocess
import unittest

from _util import MiB, TempDirTest, qdirty, qemu_img_bitmaps, require_tool

BITMAPS_MAGIC = 0x23852875


def bitmaps_ext(path: str):
    """(offset of the extension data in the file, nb_bitmaps, dir size, dir offset)."""
    with open(path, "rb") as f:
        c0 = f.read(65536)
    off = struct.unpack(">I", c0[100:104])[0]
    while off + 8 <= len(c0):
        magic, length = struct.unpack(">II", c0[off : off + 8])
        if magic == 0:
            break
        if magic == BITMAPS_MAGIC:
            nb, _, size, doff = struct.unpack(">IIQQ", c0[off + 8 : off + 32])
            return off + 8, nb, size, doff
        off += 8 + (length + 7) // 8 * 8
    raise AssertionError("no bitmaps extension")


def set_entry_flags(path: str, index: int, bits: int) -> None:
    _, _, size, doff = bitmaps_ext(path)
    with open(path, "r+b") as f:
        f.seek(doff)
        d = f.read(size)
        pos = 0
        for _ in range(index):
            name_size, extra = struct.unpack(">HI", d[pos + 18 : pos + 24])
            pos += (24 + name_size + extra + 7) // 8 * 8
        flags = struct.unpack(">I", d[pos + 12 : pos + 16])[0] | bits
        f.seek(doff + pos + 12)
        f.write(struct.pack(">I", flags))


class SalvageTest(TempDirTest):
    def make(self) -> str:
        p = self.new_image(size=64 * MiB)
        with qdirty.Image.open(p, rw=True) as img:
            for n in ("a", "b", "c"):
                img.add_bitmap(n, persistent=True)
            img.set_dirty(0, 65536)
        return p

    def test_broken_entry_listed_and_removed(self) -> None:
        p = self.make()
        set_entry_flags(p, 1, 4)  # reserved flag bit 2 on "b"
        with self.assertQdirtyError(22) as cm:
            qdirty.Image.open(p)
        self.assertIn("doesn't satisfy the constraints", cm.exception.message)
        with qdirty.Image.open(p, salvage=True) as img:
            broken = img.broken_bitmaps()
            self.assertEqual([(b.index, b.name, b.display_name) for b in broken], [(1, b"b", "b")])
            self.assertIn("has reserved bits set (0x4)", broken[0].reason)
            self.assertIn(broken[0].reason, cm.exception.message)
            self.assertEqual(sorted(b.name for b in img.bitmaps), ["a", "c"])
            with self.assertQdirtyError(30):  # EROFS: read-only
                img.remove_broken_bitmap(0)
        with qdirty.Image.open(p, rw=True, salvage=True) as img:
            with self.assertQdirtyError(2):  # ENOENT
                img.remove_broken_bitmap(1)
            img.remove_broken_bitmap(0)
            self.assertEqual(img.broken_bitmaps(), [])
        with qdirty.Image.open(p) as img:
            self.assertEqual(img.broken_bitmaps(), [])
            self.assertEqual(sorted(b.name for b in img.bitmaps), ["a", "c"])
        self.assertEqual(sorted(b["name"] for b in qemu_img_bitmaps(self, p)), ["a", "c"])
        tool = require_tool(self, "qemu-img")
        r = subprocess.run([tool, "check", "-r", "leaks", p], capture_output=True, text=True)
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)

    def test_drop_extension(self) -> None:
        p = self.make()
        ext_at, nb, _, _ = bitmaps_ext(p)
        with open(p, "r+b") as f:  # nb_bitmaps 4: a directory broken as a whole
            f.seek(ext_at)
            f.write(struct.pack(">I", nb + 1))
        with self.assertQdirtyError(22) as cm:
            qdirty.Image.open(p, salvage=True)
        self.assertIn("drop", cm.exception.message)
        self.assertTrue(qdirty.drop_bitmaps_extension(p))
        self.assertFalse(qdirty.drop_bitmaps_extension(p))
        with qdirty.Image.open(p) as img:
            self.assertEqual(list(img.bitmaps), [])
        self.assertEqual(qemu_img_bitmaps(self, p), [])
        with self.assertQdirtyError(22):
            qdirty.drop_bitmaps_extension("")


if __name__ == "__main__":
    unittest.main()
