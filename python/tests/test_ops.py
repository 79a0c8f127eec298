"""Backups and merge, iterators and status, extents, serialization, query, standalone images,
reopen, truncate, remove_stored_bitmap."""

import errno
import hashlib
import unittest

from _util import MiB, QdirtyTest, TempDirTest, qdirty, qemu_img_bitmaps, qemu_img_check

G = 4096


class BackupMergeTest(QdirtyTest):
    def setUp(self):
        self.img = qdirty.Image.new_memory(MiB)
        self.a = self.img.create_bitmap("a", granularity=G)
        self.b = self.img.create_bitmap("b", granularity=G)
        self.a.set_dirty(0, G)
        self.b.set_dirty(8 * G, 2 * G)

    def tearDown(self):
        self.img.close()

    def test_clear_with_backup_and_restore(self):
        sha = self.a.sha256()
        with self.a.clear_with_backup() as backup:
            self.assertIsInstance(backup, qdirty.Backup)
            self.assertEqual(self.a.count(), 0)
            self.a.restore(backup)
            self.assertEqual(self.a.sha256(), sha)
            with self.assertQdirtyError(errno.EINVAL):
                self.a.restore(backup)  # empty now
        self.assertTrue(backup.freed)
        with self.assertRaisesRegex(ValueError, "freed"):
            self.a.restore(backup)
        backup.free()  # twice: no-op

    def test_merge_with_and_without_backup(self):
        sha = self.a.sha256()
        self.assertIsNone(self.a.merge(self.b))
        self.assertEqual(list(self.a.dirty_extents()), [(0, G), (8 * G, 2 * G)])
        self.a.clear()
        self.a.set_dirty(0, G)
        backup = self.a.merge(self.b, backup=True)
        self.assertIsNotNone(backup)
        self.assertEqual(self.a.count(), 3 * G)
        self.a.restore(backup)
        self.assertEqual(self.a.sha256(), sha)
        backup.close()
        self.a.merge(self.a)  # the same bitmap: fine

    def test_merge_errors(self):
        other = qdirty.Image.new_memory(2 * MiB)
        try:
            c = other.create_bitmap("c")
            with self.assertQdirtyError(errno.EINVAL) as cm:
                self.a.merge(c)
            self.assertEqual(
                cm.exception.message,
                f"Bitmaps are of different sizes (destination size is {MiB}, source size is {2 * MiB}) and can't be merged",
            )
            self.b.set_busy(True)
            with self.assertQdirtyError(errno.EBUSY):
                self.a.merge(self.b)  # busy source
            with self.assertQdirtyError(errno.EBUSY):
                self.b.merge(self.a)
            with self.assertQdirtyError(errno.EBUSY):
                self.b.clear_with_backup()
            self.b.set_busy(False)
            self.b.set_readonly(True)
            self.a.merge(self.b)  # a readonly source is fine
            with self.assertQdirtyError(errno.EPERM):
                self.b.merge(self.a)
            self.b.set_readonly(False)
        finally:
            other.close()

    def test_restore_wrong_size(self):
        other = qdirty.Image.new_memory(2 * MiB)
        try:
            c = other.create_bitmap("c", granularity=G)
            with c.clear_with_backup() as backup:
                with self.assertQdirtyError(errno.EINVAL):
                    self.a.restore(backup)
        finally:
            other.close()


class IterStatusTest(QdirtyTest):
    def setUp(self):
        self.img = qdirty.Image.new_memory(MiB + 512)
        self.bm = self.img.create_bitmap("i", granularity=G)
        self.bm.set_dirty(G, 2 * G)
        self.bm.set_dirty(10 * G, G)
        self.bm.set_dirty(MiB, 1)  # the partial last granule

    def tearDown(self):
        self.img.close()

    def test_iterator(self):
        with self.bm.iter_granules() as it:
            self.assertIsInstance(it, qdirty.DirtyIterator)
            self.assertIs(it.bitmap, self.bm)
            self.assertEqual(list(it), [G, 2 * G, 10 * G, MiB])
            self.assertEqual(list(it), [])
            it.seek(2 * G + 5)
            self.assertEqual(next(it), 2 * G)
            it.seek(0)
            self.assertEqual(list(it), [G, 2 * G, 10 * G, MiB])
            with self.assertQdirtyError(errno.EINVAL):
                it.seek(MiB + 512)  # at the end: QEMU asserts
            with self.assertQdirtyError(errno.EINVAL) as cm:
                self.img.truncate(2 * MiB)  # iterated
            self.assertIn("busy, frozen or iterated", cm.exception.message)
        self.assertTrue(it.closed)
        with self.assertRaisesRegex(ValueError, "closed"):
            next(it)
        it.close()
        self.assertEqual(list(self.bm.iter_granules(5 * G)), [10 * G, MiB])

    def test_iterator_closed_with_image(self):
        img = qdirty.Image.new_memory(MiB)
        bm = img.create_bitmap()
        bm.set_dirty(0, 1)
        it = bm.iter_granules()
        img.close()
        self.assertTrue(it.closed)
        with self.assertRaises(ValueError):
            next(it)
        it.close()

    def test_iterator_collected_with_image(self):
        import gc

        img = qdirty.Image.new_memory(MiB)
        it = img.create_bitmap().iter_granules()
        del img
        del it
        gc.collect()

    def test_status(self):
        bm = self.bm
        self.assertEqual(bm.status(0), (False, G))
        self.assertEqual(bm.status(G), (True, 2 * G))
        self.assertEqual(bm.status(G + 100, G), (True, G))
        self.assertEqual(bm.status(3 * G), (False, 7 * G))
        self.assertEqual(bm.status(MiB), (True, 512))
        with self.assertQdirtyError(errno.EINVAL):
            bm.status(0, 0)
        with self.assertQdirtyError(errno.EINVAL):
            bm.status(0, MiB + 513)

    def test_extents(self):
        bm = self.bm
        self.assertEqual(list(bm.dirty_extents()), [(G, 2 * G), (10 * G, G), (MiB, 512)])
        self.assertEqual(list(bm.dirty_extents(max_len=G)), [(G, G), (2 * G, G), (10 * G, G), (MiB, 512)])
        self.assertEqual(list(bm.dirty_extents(2 * G, 11 * G)), [(2 * G, G), (10 * G, G)])
        self.assertEqual(list(bm.clean_extents()), [(0, G), (3 * G, 7 * G), (11 * G, MiB - 11 * G)])
        self.assertEqual(list(bm.clean_extents(4 * G, 6 * G, max_len=G)), [(4 * G, G), (5 * G, G)])
        total = sum(n for _, n in bm.dirty_extents()) + sum(n for _, n in bm.clean_extents())
        self.assertEqual(total, bm.size)
        with self.assertRaises(ValueError):
            list(bm.dirty_extents(max_len=0))
        self.assertEqual(bm.next_dirty_area(0, None, G), (G, G))
        self.assertEqual(bm.next_dirty(3 * G), 10 * G)
        self.assertEqual(bm.next_zero(G), 3 * G)
        self.assertIn(G, bm)
        self.assertNotIn(0, bm)


class SerializationTest(QdirtyTest):
    def test_round_trip(self):
        size = 64 * MiB + 512
        with qdirty.Image.new_memory(size) as a, qdirty.Image.new_memory(size) as b:
            src = a.create_bitmap("s", granularity=G)
            dst = b.create_bitmap("d", granularity=G)
            for off in (0, 5 * G, 300 * G, 4000 * G, size - 1):
                src.set_dirty(off, 3 * G if off < size - 1 else 1)
            align = src.serialization_align
            self.assertEqual(align, 64 * G)
            chunk = 16 * align
            self.assertEqual(src.serialization_size(0, chunk), chunk // G // 8)
            self.assertEqual(src.serialization_size(0, 0), 0)
            off = 0
            while off < size:
                n = min(chunk, size - off)
                data = src.serialize_part(off, n)
                self.assertEqual(len(data), src.serialization_size(off, n))
                if any(data):
                    dst.deserialize_part(data, off, n)
                else:
                    dst.deserialize_zeroes(off, n)
                off += n
            dst.deserialize_finish()
            self.assertEqual(dst.sha256(), src.sha256())
            self.assertEqual(dst.count(), src.count())
            # Layout: bit 0 of byte 0 is granule 0 (little-endian 64-bit words).
            self.assertEqual(src.serialize_part(0, align)[0], 0b11100111)
            dst.deserialize_ones(0, align, finish=True)
            self.assertEqual(dst.count(), src.count() + 58 * G)
            with self.assertQdirtyError(errno.EINVAL):
                src.serialization_size(G, align)  # unaligned start
            with self.assertQdirtyError(errno.EINVAL):
                src.serialize_part(0, size + align)
            with self.assertQdirtyError(errno.EINVAL):
                dst.deserialize_part(b"\0" * 4, 0, align)  # too short
            dst.set_readonly(True)
            with self.assertQdirtyError(errno.EPERM):
                dst.deserialize_zeroes(0, align)
            with self.assertQdirtyError(errno.EPERM):
                dst.deserialize_ones(0, align)
            self.assertEqual(
                hashlib.sha256(b"".join(src.serialize_part(o, min(chunk, size - o)) for o in range(0, size, chunk))).hexdigest(),
                src.sha256(),
            )


class MemoryImageTest(QdirtyTest):
    def test_standalone(self):
        img = qdirty.Image.new_memory(10 * MiB)
        with img:
            self.assertIsNone(img.path)
            self.assertIn("memory", repr(img))
            self.assertEqual(img.size, 10 * MiB)
            self.assertFalse(img.read_only)
            self.assertEqual(img.default_granularity, 65536)
            with self.assertRaises(qdirty.QdirtyError):
                img.add_bitmap("p", persistent=True)
            bm = img.add_bitmap("t", granularity=512, disabled=True)
            self.assertFalse(bm.enabled)
            img.reopen(rw=False)  # no-op for standalone images
            img.reopen(rw=True)
            img.remove_stored_bitmap("t")  # not stored: not an error
            bm.set_dirty(10 * MiB - 1, 1)
            img.truncate(20 * MiB)
            self.assertEqual(bm.size, 20 * MiB)
            self.assertEqual(img.size, 20 * MiB)
            self.assertEqual(list(bm.dirty_extents()), [(10 * MiB - 512, 512)])
            img.truncate(MiB)
            self.assertEqual(bm.count(), 0)
            bm.create_successor()
            with self.assertQdirtyError(errno.EINVAL):
                img.truncate(2 * MiB)  # frozen
            bm.reclaim()
            bm.set_busy(True)
            with self.assertQdirtyError(errno.EINVAL):
                img.truncate(2 * MiB)  # busy
            bm.set_busy(False)
        self.assertTrue(img.closed)
        with self.assertRaises(ValueError):
            img.truncate(MiB)

    def test_query(self):
        with qdirty.Image.new_memory(MiB) as img:
            self.assertEqual(img.query(), [])
            a = img.create_bitmap("a", granularity=G)
            a.set_dirty(0, G + 1)
            img.create_bitmap(granularity=512)
            b = img.add_bitmap("b", disabled=True)
            b.set_busy(True)
            q = img.query()
            self.assertEqual(
                q,
                [
                    qdirty.BitmapInfo("b", 0, 65536, False, True, False, False),
                    qdirty.BitmapInfo(None, 0, 512, True, False, False, False),
                    qdirty.BitmapInfo("a", 2 * G, G, True, False, False, False),
                ],
            )
            a.set_dirty(MiB - 1, 1)
            self.assertEqual(q[2].count, 2 * G)  # a snapshot
            self.assertEqual(img.query()[2].count, 3 * G)
            b.set_busy(False)


class FileImageTest(TempDirTest):
    def test_reopen(self):
        p = self.new_image(size=4 * MiB)
        with qdirty.Image.open(p, rw=True) as img:
            bm = img.add_bitmap("r", persistent=True)
            bm.set_dirty(0, 1)
            img.reopen(rw=False)
            self.assertTrue(img.read_only)
            self.assertTrue(bm.readonly)
            self.assertTrue(img.has_readonly_bitmaps)
            with self.assertQdirtyError(errno.EPERM):
                bm.set_dirty(0, 1)
            # stored and not in use: qemu-img sees a consistent bitmap
            self.assertEqual([b["flags"] for b in qemu_img_bitmaps(self, p)], [["auto"]])
            img.reopen(rw=True)
            self.assertFalse(img.read_only)
            self.assertFalse(bm.readonly)
            self.assertEqual([b["flags"] for b in qemu_img_bitmaps(self, p)], [["in-use", "auto"]])
            bm.set_dirty(G * 16, 1)
            with self.assertQdirtyError(errno.EINVAL):
                self._bad_reopen(img)  # unknown flag bits (raw call)
        qemu_img_check(self, p)
        with qdirty.Image.open(p) as img:
            self.assertEqual(img["r"].count(), 2 * 65536)

    def _bad_reopen(self, img):
        from qdirty._common import check_rc, lib

        check_rc(lib.qdirty_image_reopen, img._h(), 0x40)

    def test_truncate_qcow2(self):
        p = self.new_image(size=4 * MiB)
        with qdirty.Image.open(p, rw=True) as img:
            img.add_bitmap("t", persistent=True)
            with self.assertQdirtyError(errno.EINVAL):
                img.truncate(8 * MiB)  # the header says 4 MiB
            img.truncate(4 * MiB)

    def test_remove_stored_bitmap(self):
        p = self.new_image(size=4 * MiB)
        with qdirty.Image.open(p, rw=True) as img:
            bm = img.add_bitmap("s", persistent=True)
            img.store_bitmaps()
            self.assertEqual([b["name"] for b in qemu_img_bitmaps(self, p)], ["s"])
            img.remove_stored_bitmap("s")
            self.assertEqual(qemu_img_bitmaps(self, p), [])
            self.assertTrue(bm.valid)
            bm.set_persistence(False)
            img.add_bitmap("k", persistent=True)
        qemu_img_check(self, p)
        with qdirty.Image.open(p) as img:
            self.assertEqual([b.name for b in img], ["k"])
            img.remove_stored_bitmap("s")  # not stored: not an error
            with self.assertQdirtyError(errno.EROFS):
                img.remove_stored_bitmap("k")



class FreshReadsTest(QdirtyTest):
    """Every read right after the write hook sees its writes, whatever image it goes through."""

    def test_merge_from_another_image_sees_the_hook_writes(self):
        a = qdirty.Image.new_memory(MiB)
        b = qdirty.Image.new_memory(MiB)
        try:
            s = a.add_bitmap("s", granularity=G)
            t = b.add_bitmap("t", granularity=G)
            a.set_dirty(0, 4 * G)
            b.merge_bitmap("t", "s", src_image=a)
            self.assertEqual(t.count(), 4 * G)
            a.set_dirty(8 * G, 1)
            self.assertEqual(list(s.dirty_extents()), [(0, 4 * G), (8 * G, G)])
            self.assertEqual([i.count for i in a.query()], [5 * G])
        finally:
            a.close()
            b.close()


if __name__ == "__main__":
    unittest.main()
