"""Transactions: commit, abort restoring exact sha256 and state, context manager, errors,
several images, closing an image with a pending transaction."""

import errno
import unittest

from _util import MiB, TempDirTest, qdirty, qemu_img_bitmaps

G = 65536


class TxnTest(TempDirTest):
    def setUp(self):
        super().setUp()
        self.p = self.new_image(size=4 * MiB)
        self.img = qdirty.Image.open(self.p, rw=True)
        self.a = self.img.add_bitmap("a", persistent=True)
        self.b = self.img.add_bitmap("b", disabled=True)
        self.a.set_dirty(0, 3 * G)
        self.b.set_dirty(10 * G, G)

    def tearDown(self):
        self.img.close()
        super().tearDown()

    def snapshot(self):
        return [(i, self.img[i.name].sha256() if i.name else None) for i in self.img.query()]

    def test_abort_restores_exactly(self):
        before = self.snapshot()
        txn = qdirty.Transaction()
        self.assertFalse(txn.pending)
        c = txn.add(self.img, "c", granularity=4096, persistent=True)
        self.assertEqual(c.granularity, 4096)
        txn.clear(self.img, "a")
        txn.enable(self.b)
        txn.disable(self.img, "a")
        txn.merge(self.img, "a", "b")
        txn.remove(self.img, "b")
        self.assertTrue(txn.pending)
        self.assertTrue(self.b.busy)
        self.assertEqual(list(self.a.dirty_extents()), [(10 * G, G)])
        txn.abort()
        self.assertFalse(txn.pending)
        self.assertEqual(self.snapshot(), before)
        self.assertNotIn("c", self.img)
        with self.assertRaises(ValueError):
            c.count()
        self.assertTrue(self.b.valid)
        self.assertFalse(self.b.busy)
        txn.close()
        with self.assertRaisesRegex(ValueError, "freed"):
            txn.clear(self.img, "a")
        txn.close()  # twice: no-op

    def test_commit(self):
        with qdirty.Transaction() as txn:
            c = txn.add(self.img, "c", persistent=True)
            txn.clear(self.a)
            txn.remove(self.img, "b")
        self.assertEqual(self.a.count(), 0)
        self.assertIs(self.img["c"], c)
        self.assertNotIn("b", self.img)
        with self.assertRaisesRegex(ValueError, "transaction"):
            self.b.count()
        with self.assertRaises(ValueError):
            txn.commit()  # freed by the with block
        self.img.store_bitmaps()
        self.assertEqual(sorted(b["name"] for b in qemu_img_bitmaps(self, self.p)), ["a", "c"])

    def test_context_manager_aborts_on_exception(self):
        before = self.snapshot()
        with self.assertRaises(qdirty.QdirtyError) as cm:
            with qdirty.Transaction() as txn:
                txn.clear(self.img, "a")
                txn.add(self.img, "new")
                txn.clear(self.img, "missing")  # fails: ENOENT
        self.assertEqual(cm.exception.errno, errno.ENOENT)
        self.assertEqual(self.snapshot(), before)
        self.assertNotIn("new", self.img)

    def test_action_errors(self):
        with qdirty.Transaction() as txn:
            with self.assertQdirtyError(errno.ENOENT):
                txn.enable(self.img, "nope")
            with self.assertQdirtyError(errno.EEXIST):
                txn.add(self.img, "a")
            self.a.set_busy(True)
            with self.assertQdirtyError(errno.EBUSY):
                txn.clear(self.img, "a")
            with self.assertQdirtyError(errno.EBUSY):
                txn.remove(self.img, "a")
            self.a.set_busy(False)
            self.a.set_readonly(True)
            with self.assertQdirtyError(errno.EPERM):
                txn.clear(self.img, "a")
            with self.assertQdirtyError(errno.EPERM):
                txn.merge(self.img, "a", "b")
            self.a.set_readonly(False)
            with self.assertRaises(TypeError):
                txn.clear(self.img)
            with self.assertRaises(TypeError):
                txn.clear(self.a, "a")
            anon = self.img.create_bitmap()
            with self.assertRaises(ValueError):
                txn.clear(anon)
            txn.abort()

    def test_across_images(self):
        with qdirty.Image.new_memory(4 * MiB) as mem:
            m = mem.create_bitmap("m", granularity=4096)
            m.set_dirty(MiB, 1)
            sha_a = self.a.sha256()
            txn = qdirty.Transaction()
            txn.merge(self.img, "a", "m", src_image=mem)
            txn.clear(mem, "m")
            self.assertTrue(self.a.get(MiB))
            txn.abort()
            self.assertEqual(self.a.sha256(), sha_a)
            self.assertTrue(m.get(MiB))
            with self.assertQdirtyError(errno.EINVAL):
                with qdirty.Image.new_memory(MiB) as small:
                    small.create_bitmap("s")
                    txn.merge(self.img, "a", "s", src_image=small)
            txn.close()

    def test_closing_an_image_aborts_pending_transactions(self):
        mem = qdirty.Image.new_memory(MiB)
        bm = mem.create_bitmap("x")
        bm.set_dirty(0, 1)
        txn = qdirty.Transaction()
        txn.clear(mem, "x")
        added = txn.add(self.img, "added")
        mem.close()
        self.assertFalse(txn.pending)
        self.assertFalse(added.valid)  # the abort released it
        self.assertNotIn("added", self.img)
        txn.commit()  # empty: nothing to do
        txn.close()

    def test_collected_transaction_aborts(self):
        import gc

        sha = self.a.sha256()
        txn = qdirty.Transaction()
        txn.clear(self.img, "a")
        del txn
        gc.collect()
        self.assertEqual(self.a.sha256(), sha)


if __name__ == "__main__":
    unittest.main()
