"""Bitmap state: check and its flags, busy/readonly/persistence/skip_store/inconsistent,
recording, release, create_bitmap, successors."""

import errno
import unittest

from _util import MiB, TempDirTest, qdirty

G = 65536
BUSY_MSG = "Bitmap 'b' is currently in use by another operation and cannot be used"
RO_MSG = "Bitmap 'b' is readonly and cannot be modified"
INCONS_MSG = "Bitmap 'b' is inconsistent and cannot be used"
HINT = "Try block-dirty-bitmap-remove to delete this bitmap from disk"


class StateTest(TempDirTest):
    def setUp(self):
        super().setUp()
        self.img = qdirty.Image.open(self.new_image(size=4 * MiB), rw=True)
        self.bm = self.img.add_bitmap("b", persistent=True)

    def tearDown(self):
        self.img.close()
        super().tearDown()

    def test_constants(self):
        self.assertEqual(qdirty.CHECK_BUSY, 1)
        self.assertEqual(qdirty.CHECK_RO, 2)
        self.assertEqual(qdirty.CHECK_INCONSISTENT, 4)
        self.assertEqual(qdirty.CHECK_DEFAULT, 7)
        self.assertEqual(qdirty.CHECK_ALLOW_RO, 5)

    def test_check_order_and_messages(self):
        bm = self.bm
        bm.check()
        bm.check(0)
        bm.set_busy()
        self.assertTrue(bm.busy)
        bm.set_readonly()
        self.assertTrue(bm.readonly)
        self.assertTrue(self.img.has_readonly_bitmaps)
        bm.set_inconsistent()
        self.assertTrue(bm.inconsistent)
        self.assertFalse(bm.enabled)
        with self.assertQdirtyError(errno.EBUSY) as cm:
            bm.check(qdirty.CHECK_DEFAULT)
        self.assertEqual(cm.exception.message, BUSY_MSG)
        with self.assertQdirtyError(errno.EPERM) as cm:
            bm.check(qdirty.CHECK_RO | qdirty.CHECK_INCONSISTENT)
        self.assertEqual(cm.exception.message, RO_MSG)
        with self.assertQdirtyError(errno.EINVAL) as cm:
            bm.check(qdirty.CHECK_ALLOW_RO & ~qdirty.CHECK_BUSY)
        self.assertEqual(cm.exception.message, INCONS_MSG)
        self.assertEqual(cm.exception.hint, HINT)
        bm.check(0)
        with self.assertQdirtyError(errno.EINVAL):
            bm.check(0x100)  # unknown flag bits
        bm.set_busy(False)
        bm.set_readonly(False)
        self.assertFalse(bm.busy)
        self.assertFalse(bm.readonly)
        self.assertFalse(self.img.has_readonly_bitmaps)
        bm.check(qdirty.CHECK_BUSY | qdirty.CHECK_RO)
        self.img.remove_bitmap("b")  # the only way out of inconsistent

    def test_busy_refuses_changes(self):
        bm = self.bm
        bm.set_busy(True)
        for op in (bm.enable, bm.disable, bm.clear):
            with self.subTest(op=op.__name__), self.assertQdirtyError(errno.EBUSY) as cm:
                op()
            self.assertEqual(cm.exception.message, BUSY_MSG)
        with self.assertQdirtyError(errno.EBUSY):
            self.img.remove_bitmap("b")
        with self.assertQdirtyError(errno.EBUSY):
            bm.release()  # busy: QEMU asserts, qdirty refuses
        bm.set_busy(False)

    def test_readonly_refuses_bit_changes(self):
        bm = self.bm
        bm.set_readonly(True)
        with self.assertQdirtyError(errno.EPERM) as cm:
            bm.clear()
        self.assertEqual(cm.exception.message, RO_MSG)
        with self.assertQdirtyError(errno.EPERM):
            bm.set_dirty(0, 1)
        bm.disable()  # state changes are allowed (ALLOW_RO)
        bm.set_readonly(False)

    def test_persistence_skip_store(self):
        bm = self.bm
        self.assertFalse(bm.skip_store)
        bm.set_skip_store()
        self.assertTrue(bm.skip_store)
        t = self.img.add_bitmap("t")
        t.set_persistence(True)
        self.assertTrue(t.persistent)
        t.set_persistence(False)
        self.assertFalse(t.persistent)
        with self.assertQdirtyError(errno.EINVAL):
            t.set_inconsistent()  # only persistent bitmaps
        self.img.store_bitmaps()
        bm.set_skip_store(False)
        self.assertFalse(bm.skip_store)

    def test_skip_store_leaves_bitmap_out(self):
        self.bm.set_skip_store(True)
        self.img.close()
        with qdirty.Image.open(self.img.path) as img:
            self.assertNotIn("b", img)

    def test_recording(self):
        bm = self.bm
        self.assertTrue(bm.recording)
        bm.disable()
        self.assertFalse(bm.recording)
        bm.enable()
        self.assertTrue(bm.recording)

    def test_release_and_create_bitmap(self):
        self.assertEqual(self.img.default_granularity, G)
        anon = self.img.create_bitmap()
        self.assertIsNone(anon.name)
        self.assertIsNone(anon.name_bytes)
        self.assertTrue(anon.enabled)
        self.assertFalse(anon.persistent)
        self.assertEqual(anon.granularity, G)
        named = self.img.create_bitmap("n", granularity=512)
        self.assertEqual(named.granularity, 512)
        self.assertIs(self.img["n"], named)
        with self.assertQdirtyError(errno.EEXIST) as cm:
            self.img.create_bitmap("n")
        self.assertEqual(cm.exception.message, "Bitmap already exists: n")
        with self.assertQdirtyError(errno.EINVAL):
            self.img.create_bitmap(granularity=3000)
        self.img.set_dirty(0, 1)
        self.assertTrue(anon.get(0))
        self.assertEqual(len(self.img), 3)
        self.assertEqual([b.name for b in self.img], ["n", None, "b"])
        anon.release()
        self.assertFalse(anon.valid)
        with self.assertRaisesRegex(ValueError, "released"):
            anon.count()
        with self.assertRaises(ValueError):
            anon.release()
        named.release()
        self.assertNotIn("n", self.img)
        with self.assertRaises(KeyError):
            self.img["n"]
        self.assertEqual(len(self.img), 1)
        it = self.bm.iter_granules()
        with self.assertQdirtyError(errno.EBUSY):
            self.bm.release()  # iterated
        it.close()

    def test_invalid_after_close(self):
        bm = self.bm
        self.img.close()
        for op in (lambda: bm.count(), lambda: bm.enabled, lambda: bm.check(), lambda: bm.sha256()):
            with self.assertRaisesRegex(ValueError, "closed"):
                op()
        self.assertFalse(bm.valid)
        self.assertIn("closed", repr(bm))


class SuccessorTest(TempDirTest):
    def setUp(self):
        super().setUp()
        self.img = qdirty.Image.open(self.new_image(size=4 * MiB), rw=True)
        self.bm = self.img.add_bitmap("b", persistent=True)
        self.bm.set_dirty(0, G)

    def tearDown(self):
        self.img.close()
        super().tearDown()

    def test_abdicate(self):
        bm = self.bm
        succ = bm.create_successor()
        self.assertIsNone(succ.name)
        self.assertTrue(bm.has_successor)
        self.assertTrue(bm.busy)
        self.assertFalse(bm.enabled)
        self.assertTrue(bm.recording)  # its successor records
        self.assertTrue(succ.enabled)
        self.assertEqual(succ.granularity, bm.granularity)
        self.assertEqual(len(self.img.query()), 2)
        self.img.set_dirty(G, 1)
        self.assertFalse(bm.get(G))
        self.assertTrue(succ.get(G))
        with self.assertQdirtyError(errno.EBUSY):
            bm.create_successor()
        with self.assertQdirtyError(errno.EBUSY):
            bm.release()
        new = bm.abdicate()
        self.assertIs(new, succ)
        self.assertEqual(new.name, "b")
        self.assertTrue(new.persistent)
        self.assertIs(self.img["b"], new)
        self.assertEqual(list(new.dirty_extents()), [(G, G)])
        with self.assertRaisesRegex(ValueError, "abdicated"):
            bm.count()
        with self.assertQdirtyError(errno.EINVAL) as cm:
            new.abdicate()
        self.assertEqual(cm.exception.message, "Cannot relinquish control if there's no successor present")

    def test_reclaim(self):
        bm = self.bm
        bm.disable()
        succ = bm.create_successor()
        self.assertFalse(succ.enabled)  # inherits the disabled state
        self.assertFalse(bm.recording)
        bm.enable_successor()
        self.assertTrue(succ.enabled)
        self.assertFalse(bm.enabled)
        self.img.set_dirty(2 * G, 1)
        back = bm.reclaim()
        self.assertIs(back, bm)
        self.assertFalse(bm.busy)
        self.assertFalse(bm.has_successor)
        self.assertTrue(bm.enabled)  # the successor's enabled state
        self.assertEqual(list(bm.dirty_extents()), [(0, G), (2 * G, G)])
        with self.assertRaisesRegex(ValueError, "reclaimed"):
            succ.count()
        self.assertEqual(len(self.img), 1)
        with self.assertQdirtyError(errno.EINVAL) as cm:
            bm.reclaim()
        self.assertEqual(cm.exception.message, "Cannot reclaim a successor when none is present")
        with self.assertQdirtyError(errno.EINVAL) as cm:
            bm.enable_successor()
        self.assertEqual(cm.exception.message, "The bitmap has no successor to enable")

    def test_double_successor(self):
        self.bm.create_successor()
        with self.assertQdirtyError(errno.EBUSY) as cm:
            self.bm.create_successor()
        self.assertIn("currently in use", cm.exception.message)
        self.bm.set_busy(False)
        with self.assertQdirtyError(errno.EINVAL) as cm:
            self.bm.create_successor()
        self.assertEqual(cm.exception.message, "Cannot create a successor for a bitmap that already has one")
        self.bm.set_busy(True)
        self.bm.reclaim()


if __name__ == "__main__":
    unittest.main()
