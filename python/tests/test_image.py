"""Images: create, open, add/find/iterate/remove/merge bitmaps, close and reopen, read-only
opens, images left in use."""

import errno
import shutil
import unittest

from _util import KiB, MiB, SHA_EMPTY_WORD, SHA_FIRST_GRANULE, TempDirTest, qdirty

AUTOLOAD_WARNING = "Autoload option is deprecated and its value is ignored"


def read_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


class ImageTest(TempDirTest):
    def test_lifecycle_and_persistence(self):
        p = self.new_image(size=MiB, cluster_size=64 * KiB)
        warnings = []
        qdirty.set_warning_handler(warnings.append)
        with qdirty.Image.open(p, rw=True) as img:
            self.assertEqual(img.size, MiB)
            self.assertFalse(img.read_only)
            self.assertEqual(img.bitmaps, [])
            self.assertEqual(len(img), 0)

            persist = img.add_bitmap("persist", persistent=True)
            self.assertEqual(persist.name, "persist")
            self.assertEqual(persist.name_bytes, b"persist")
            self.assertEqual(persist.granularity, 64 * KiB)
            self.assertEqual(persist.size, MiB)
            self.assertTrue(persist.enabled)
            self.assertTrue(persist.persistent)
            self.assertFalse(persist.inconsistent)
            self.assertFalse(persist.readonly)
            self.assertIs(persist.image, img)
            self.assertEqual(persist.sha256(), SHA_EMPTY_WORD)

            disabled = img.add_bitmap(b"disabled", granularity=4096, persistent=True, disabled=True)
            self.assertFalse(disabled.enabled)
            self.assertEqual(warnings, [])
            auto = img.add_bitmap("auto", persistent=True, autoload=True)
            self.assertEqual(warnings, [AUTOLOAD_WARNING])
            self.assertTrue(auto.enabled)
            img.add_bitmap("auto-false", autoload=False)  # any value: accepted and ignored
            self.assertEqual(len(warnings), 2)
            img.remove_bitmap("auto-false")
            transient = img.add_bitmap("transient")
            self.assertFalse(transient.persistent)

            # Lookup, identity, iteration order (newest first).
            self.assertIs(img.find("disabled"), disabled)
            self.assertIsNone(img.find("nope"))
            self.assertIn("auto", img)
            self.assertNotIn("nope", img)
            self.assertEqual([b.name for b in img], ["transient", "auto", "disabled", "persist"])
            self.assertEqual(len(img), 4)

            # Rejected adds.
            with self.assertQdirtyError(errno.EEXIST):
                img.add_bitmap("persist")
            with self.assertQdirtyError(errno.EINVAL):
                img.add_bitmap("g", granularity=1000)
            with self.assertQdirtyError(errno.EINVAL):
                img.add_bitmap("g", granularity=256)
            with self.assertQdirtyError(errno.EINVAL):
                img.add_bitmap("")
            with self.assertQdirtyError(errno.EINVAL):
                img.add_bitmap("n" * 1024)

            # The write hook.
            img.set_dirty(0, 512)
            self.assertTrue(persist.get(0))
            self.assertTrue(auto.get(0))
            self.assertFalse(disabled.get(0))
            self.assertEqual(auto.sha256(), SHA_FIRST_GRANULE)

            disabled.set_dirty(128 * KiB, 1)
            disabled.enable()
            persist.disable()
            self.assertTrue(disabled.enabled)
            self.assertFalse(persist.enabled)
            img.set_dirty(512 * KiB, 1)
            self.assertFalse(persist.get(512 * KiB))

            img.merge_bitmap("persist", "disabled")
            self.assertTrue(persist.get(128 * KiB))
            self.assertTrue(persist.get(512 * KiB))
            with self.assertQdirtyError(errno.ENOENT):
                img.merge_bitmap("persist", "nope")

            img.remove_bitmap("transient")
            with self.assertRaises(ValueError):
                transient.count()
            with self.assertQdirtyError(errno.ENOENT) as cm:
                img.remove_bitmap("transient")
            self.assertIn("transient", cm.exception.message)
            img.store_bitmaps()
            auto_sha = auto.sha256()

        self.assertTrue(img.closed)
        with self.assertRaises(ValueError):
            img.size
        with self.assertRaises(ValueError):
            persist.get(0)
        img.close()  # twice: no-op

        with qdirty.Image.open(p, rw=True) as img:
            self.assertEqual(sorted(b.name for b in img), ["auto", "disabled", "persist"])
            persist, disabled, auto = img.find("persist"), img.find("disabled"), img.find("auto")
            self.assertFalse(persist.enabled)
            self.assertTrue(disabled.enabled)
            self.assertTrue(auto.enabled)
            self.assertEqual(disabled.granularity, 4096)
            self.assertEqual(list(persist.dirty_extents()), [(0, 64 * KiB), (128 * KiB, 64 * KiB), (512 * KiB, 64 * KiB)])
            self.assertEqual(auto.sha256(), auto_sha)
            img.remove_bitmap("auto")

        with qdirty.Image.open(p) as img:
            self.assertIsNone(img.find("auto"))
            self.assertEqual(len(img), 2)

    def test_read_only(self):
        p = self.new_image(size=4 * MiB)
        with qdirty.Image.open(p, rw=True) as img:
            img.add_bitmap("b", persistent=True).set_dirty(0, 1)
        before = read_bytes(p)
        with qdirty.Image.open(p) as img:
            self.assertTrue(img.read_only)
            bm = img.find("b")
            self.assertTrue(bm.readonly)
            self.assertTrue(bm.get(0))
            with self.assertQdirtyError(errno.EPERM):
                bm.set_dirty(65536, 1)
            with self.assertQdirtyError(errno.EPERM):
                bm.reset_dirty(0, 65536)
            with self.assertQdirtyError(errno.EPERM):
                bm.clear()
            with self.assertRaises(qdirty.QdirtyError) as cm:
                img.add_bitmap("p", persistent=True)
            self.assertIn(cm.exception.errno, (errno.EROFS, errno.EPERM))
            with self.assertRaises(qdirty.QdirtyError) as cm:
                img.remove_bitmap("b")
            self.assertIn(cm.exception.errno, (errno.EROFS, errno.EPERM))
            with self.assertQdirtyError(errno.EROFS):
                img.store_bitmaps()
        self.assertEqual(read_bytes(p), before)

    def test_locks_and_force_share(self):
        p = self.new_image(size=4 * MiB)
        with qdirty.Image.open(p, rw=True) as img:
            img.add_bitmap("b", persistent=True)
            img.store_bitmaps()
            # A second opener is another open file description: refused like QEMU would be.
            with self.assertQdirtyError(errno.EAGAIN):
                qdirty.Image.open(p, rw=True)
            with self.assertQdirtyError(errno.EAGAIN):
                qdirty.Image.open(p)
            with qdirty.Image.open(p, force_share=True) as peek:
                self.assertTrue(peek.find("b").inconsistent)
            with self.assertQdirtyError(errno.EINVAL):
                qdirty.Image.open(p, rw=True, force_share=True)
        with qdirty.Image.open(p) as img:
            self.assertFalse(img.find("b").inconsistent)

    def test_store_space(self):
        p = self.new_image(size=64 * MiB)
        with qdirty.Image.open(p, rw=True) as img:
            self.assertEqual(img.store_space(), qdirty.StoreSpace(0, 0, 0))
            img.add_bitmap("b", persistent=True)
            img.set_dirty(0, 1)
            space = img.store_space()
            # One data cluster, one table cluster, one directory cluster (64 KiB clusters).
            self.assertEqual((space.clusters, space.bytes), (3, 3 * 64 * KiB))
            # qemu-img measure: data + table + directory, each a whole cluster.
            self.assertEqual(space.measure_bytes, 3 * 64 * KiB)
            img.store_bitmaps()
            self.assertEqual(img.store_space().clusters, 0)

    def test_inconsistent_after_crash(self):
        p = self.new_image()
        copy = self.path("copy.qcow2")
        with qdirty.Image.open(p, rw=True) as img:
            img.add_bitmap("b", persistent=True)
        with qdirty.Image.open(p, rw=True):
            shutil.copyfile(p, copy)  # in_use on disk: what a killed process leaves
        with qdirty.Image.open(copy, rw=True) as img:
            bm = img.find("b")
            self.assertTrue(bm.inconsistent)
            self.assertTrue(bm.persistent)
            self.assertFalse(bm.enabled)
            with self.assertQdirtyError(errno.EINVAL) as cm:
                bm.set_dirty(0, 1)
            self.assertIn("inconsistent", cm.exception.message)
            self.assertIn("block-dirty-bitmap-remove", cm.exception.hint)
            with self.assertQdirtyError(errno.EINVAL):
                bm.enable()
            with self.assertQdirtyError(errno.EEXIST):
                img.add_bitmap("b")
            img.remove_bitmap("b")
            self.assertEqual(img.bitmaps, [])

    def test_merge_across_images(self):
        a = self.new_image("a.qcow2", size=2 * MiB)
        b = self.new_image("b.qcow2", size=2 * MiB, cluster_size=4096)
        c = self.new_image("c.qcow2", size=3 * MiB)
        with qdirty.Image.open(a, rw=True) as ia, qdirty.Image.open(b) as ib, qdirty.Image.open(c, rw=True) as ic:
            dst = ia.add_bitmap("dst", granularity=65536)
            src = ib.add_bitmap("src", granularity=4096)
            src.set_dirty(MiB + 4096, 4096)
            ic.add_bitmap("other")
            ia.merge_bitmap("dst", "src", src_image=ib)
            self.assertEqual(list(dst.dirty_extents()), [(MiB, 65536)])
            with self.assertQdirtyError(errno.EINVAL):
                ia.merge_bitmap("dst", "other", src_image=ic)
            ia.merge_bitmap("dst", "dst", src_image=ia)

    def test_context_manager_closes_on_exception(self):
        p = self.new_image()
        with self.assertRaises(RuntimeError):
            with qdirty.Image.open(p, rw=True) as img:
                img.add_bitmap("b", persistent=True)
                raise RuntimeError("boom")
        self.assertTrue(img.closed)
        with qdirty.Image.open(p) as img:
            self.assertIsNotNone(img.find("b"))

    def test_garbage_collected_image_is_closed(self):
        p = self.new_image()
        img = qdirty.Image.open(p, rw=True)
        img.add_bitmap("b", persistent=True)
        del img
        import gc

        gc.collect()
        with qdirty.Image.open(p) as img:
            bm = img.find("b")
            self.assertIsNotNone(bm)
            self.assertFalse(bm.inconsistent)


if __name__ == "__main__":
    unittest.main()
