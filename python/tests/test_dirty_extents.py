"""Bitmap.dirty_extents over the batch call qdirty_bitmap_dirty_extents: runs equal to a model
of the dirty granules (any batch size, clipped ranges, max_len pieces), one reused array, and
errors from the call itself: inconsistent (EINVAL), unreadable (EIO), missing from an older
library (ENOSYS)."""

import errno
import random
import unittest
from unittest import mock

from _util import KiB, MiB, TempDirTest, qdirty
from qdirty import _bitmap, _ffi
from test_unusable import READS, FaultyHost, bitmap_data_range

G = 4096


def model_runs(granules, g, size, start=0, end=None):
    """Maximal runs of the dirty granules, in bytes, clipped to [start, min(end, size))."""
    stop = size if end is None else min(end, size)
    runs = []
    for i in sorted(granules):
        lo, hi = max(i * g, start), min((i + 1) * g, stop, size)
        if lo >= hi:
            continue
        if runs and runs[-1][0] + runs[-1][1] == lo:
            runs[-1] = (runs[-1][0], hi - runs[-1][0])
        else:
            runs.append((lo, hi - lo))
    return runs


class _Counting:
    """The library, with the calls of qdirty_bitmap_dirty_extents recorded."""

    def __init__(self, real):
        self.real = real
        self.calls = []

    def __getattr__(self, name):
        return getattr(self.real, name)

    def qdirty_bitmap_dirty_extents(self, *args):
        self.calls.append(args)
        return self.real.qdirty_bitmap_dirty_extents(*args)


class DirtyExtentsTest(TempDirTest):
    def setUp(self):
        super().setUp()
        self.size = 64 * MiB + 512  # the last granule is partial
        self.img = qdirty.Image.new_memory(self.size)
        self.bm = self.img.add_bitmap("b", granularity=G)
        rng = random.Random(11)
        self.granules = set()
        for _ in range(300):
            off = rng.randrange(self.size)
            n = rng.randrange(1, 40 * KiB)
            self.img.set_dirty(off, n)
            last = min(off + n, self.size) - 1
            self.granules.update(range(off // G, last // G + 1))
        self.img.set_dirty(self.size - 1, 1)
        self.granules.add((self.size - 1) // G)

    def tearDown(self):
        self.img.close()
        super().tearDown()

    def test_runs_equal_the_model_for_any_batch(self):
        want = model_runs(self.granules, G, self.size)
        self.assertGreater(len(want), 200)
        for batch in (1, 2, 7, 64, len(want), len(want) + 1, 1024):
            with self.subTest(batch=batch):
                self.assertEqual(list(self.bm.dirty_extents(batch=batch)), want)

    def test_ranges_are_clipped(self):
        rng = random.Random(5)
        for _ in range(50):
            a = rng.randrange(self.size + G)
            b = a + rng.randrange(8 * MiB)
            with self.subTest(start=a, end=b):
                self.assertEqual(
                    list(self.bm.dirty_extents(a, b, batch=3)),
                    model_runs(self.granules, G, self.size, a, b),
                )
        # end beyond the disk is clamped to it.
        self.assertEqual(list(self.bm.dirty_extents(0, 1 << 63)), model_runs(self.granules, G, self.size))

    def test_max_len_splits_runs(self):
        want = []
        for off, n in model_runs(self.granules, G, self.size):
            while n > 0:
                want.append((off, min(n, 3 * G)))
                off, n = off + min(n, 3 * G), n - min(n, 3 * G)
        self.assertEqual(list(self.bm.dirty_extents(batch=5, max_len=3 * G)), want)

    def test_one_reused_array_and_batched_calls(self):
        runs = model_runs(self.granules, G, self.size)
        counting = _Counting(_bitmap.lib)
        with mock.patch.object(_bitmap, "lib", counting):
            self.assertEqual(list(self.bm.dirty_extents(batch=10)), runs)
        # Full batches, then one short (possibly empty) batch.
        self.assertEqual(len(counting.calls), len(runs) // 10 + 1)
        self.assertEqual(len({id(c[3]) for c in counting.calls}), 1)
        # Each call resumes where the previous batch ended.
        for i, c in enumerate(counting.calls[1:], start=1):
            off, n = runs[i * 10 - 1]
            self.assertEqual(c[1], off + n)

    def test_missing_from_an_older_library(self):
        counting = _Counting(_bitmap.lib)
        counting.qdirty_bitmap_dirty_extents = _ffi._missing("qdirty_bitmap_dirty_extents", "libqdirty.so")
        with mock.patch.object(_bitmap, "lib", counting):
            with self.assertQdirtyError(errno.ENOSYS) as cm:
                list(self.bm.dirty_extents())
        self.assertIn("qdirty_bitmap_dirty_extents", cm.exception.message)


class DirtyExtentsErrorsTest(TempDirTest):
    def test_in_use_bitmap_fails_in_the_call(self):
        copy = self.in_use_copy()
        with qdirty.Image.open(copy) as img:
            bm = img["b"]
            # No check before the call: the C function refuses by itself.
            with mock.patch.object(_bitmap.Bitmap, "_check_readable", lambda *a: None):
                with self.assertQdirtyError(errno.EINVAL) as cm:
                    list(bm.dirty_extents())
            self.assertIn("Bitmap 'b' is inconsistent and cannot be used", cm.exception.message)
            self.assertIn("block-dirty-bitmap-remove", cm.exception.hint)

    def test_unreadable_data_is_eio_and_the_bitmap_stays_consistent(self):
        p = self.new_image(size=4 * MiB)
        with qdirty.Image.open(p, rw=True) as img:
            img.add_bitmap("b", persistent=True).set_dirty(MiB, 1)
        start, end = bitmap_data_range(p, "b")
        for what, read in READS.items():
            with self.subTest(read=what):
                host = FaultyHost(p, start, end)
                try:
                    with qdirty.Image.open_with_io(host, "faulty") as img:
                        bm = img["b"]
                        with self.assertQdirtyError(errno.EIO) as cm:
                            read(bm)
                        self.assertIn("Could not read bitmap 'b'", cm.exception.message)
                        self.assertFalse(bm.inconsistent)
                        # Once the fault is gone, the same handle reads the bit.
                        host.start = host.end = 0
                        self.assertEqual(list(bm.dirty_extents()), [(MiB, 64 * KiB)])
                finally:
                    host.close()


if __name__ == "__main__":
    unittest.main()
