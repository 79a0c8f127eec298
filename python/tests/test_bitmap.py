"""One bitmap's bits: set/reset/get/count, next_dirty/next_zero/next_dirty_area,
dirty_extents, sha256, enable/disable, clear."""

import errno
import hashlib
import unittest

from _util import MiB, TempDirTest, qdirty

G = 4096


class BitmapTest(TempDirTest):
    def setUp(self):
        super().setUp()
        self.size = MiB + 512  # the last granule is partial
        self.img = qdirty.Image.open(self.new_image(size=self.size), rw=True)
        self.bm = self.img.add_bitmap("bits", granularity=G)

    def tearDown(self):
        self.img.close()
        super().tearDown()

    def test_empty(self):
        bm = self.bm
        self.assertEqual(bm.size, self.size)
        self.assertEqual(bm.granularity, G)
        self.assertEqual(bm.count(), 0)
        self.assertIsNone(bm.next_dirty())
        self.assertEqual(bm.next_zero(), 0)
        self.assertIsNone(bm.next_dirty_area())
        self.assertEqual(list(bm.dirty_extents()), [])
        # 257 granules: five 64-bit words
        self.assertEqual(bm.sha256(), hashlib.sha256(bytes(40)).hexdigest())

    def test_set_get_count_iterate(self):
        bm = self.bm
        bm.set_dirty(5000, 1)
        self.assertFalse(bm.get(G - 1))
        self.assertTrue(bm.get(G))
        self.assertTrue(bm.get(2 * G - 1))
        self.assertFalse(bm.get(2 * G))
        self.assertFalse(bm.get(100 * MiB))
        self.assertEqual(bm.count(), G)
        self.assertEqual(bm.next_dirty(), G)
        self.assertIsNone(bm.next_dirty(0, G))
        self.assertEqual(bm.next_zero(G), 2 * G)
        bm.set_dirty(16 * G, 3 * G)
        self.assertEqual(list(bm.dirty_extents()), [(G, G), (16 * G, 3 * G)])
        self.assertEqual(len(list(bm.dirty_extents(max_len=G))), 4)
        self.assertIsNone(bm.next_dirty_area(2 * G, 16 * G))
        self.assertEqual(bm.next_dirty_area(2 * G, 17 * G), (16 * G, G))
        self.assertIsNone(bm.next_dirty_area(0, None, 0))
        words = bytearray(40)
        for granule in (1, 16, 17, 18):
            words[granule // 8] |= 1 << (granule % 8)
        self.assertEqual(bm.sha256(), hashlib.sha256(bytes(words)).hexdigest())

    def test_ranges_and_alignment(self):
        bm = self.bm
        bm.set_dirty(0, 4 * G)
        with self.assertQdirtyError(errno.EINVAL):
            bm.set_dirty(self.size, 1)
        with self.assertQdirtyError(errno.EINVAL):
            bm.reset_dirty(0, self.size + G)
        with self.assertQdirtyError(errno.EINVAL):
            bm.reset_dirty(G + 1, G)
        with self.assertQdirtyError(errno.EINVAL):
            bm.reset_dirty(G, 100)
        self.assertEqual(bm.count(), 4 * G)
        bm.reset_dirty(G, G)
        self.assertEqual(list(bm.dirty_extents()), [(0, G), (2 * G, 2 * G)])
        bm.set_dirty(self.size - 1, 1)
        self.assertEqual(bm.count(), 4 * G)  # the partial last granule counts in full
        bm.reset_dirty(256 * G, self.size - 256 * G)  # unaligned length that reaches the end
        self.assertFalse(bm.get(self.size - 1))

    def test_enable_disable_clear(self):
        bm = self.bm
        bm.disable()
        self.assertFalse(bm.enabled)
        self.img.set_dirty(100 * G, 1)
        self.assertFalse(bm.get(100 * G))
        bm.set_dirty(100 * G, 1)
        self.assertTrue(bm.get(100 * G))
        bm.enable()
        self.assertTrue(bm.enabled)
        self.img.set_dirty(200 * G, 1)
        self.assertTrue(bm.get(200 * G))
        twin = self.img.add_bitmap("twin", granularity=G)
        self.img.merge_bitmap("twin", "bits")
        self.assertEqual(twin.sha256(), bm.sha256())
        bm.clear()
        self.assertEqual(bm.count(), 0)
        self.assertEqual(twin.count(), 2 * G)


if __name__ == "__main__":
    unittest.main()
