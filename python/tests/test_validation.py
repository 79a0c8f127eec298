"""Every method taking an offset, a length, a size, a granularity, a count or an index refuses
what is not an unsigned C integer (TypeError: not an int, bool included; ValueError: negative,
or too large for the C type) before any C call: ctypes would wrap -5 to 2**64 - 5."""

import contextlib
import unittest
from unittest import mock

from _util import MiB, TempDirTest, qdirty
from qdirty import _bitmap, _common, _image, _txn

G = 4096

#: Values no C parameter may receive, and the exception each one raises.
BAD_64 = [
    (-1, ValueError),
    (-4096, ValueError),
    (1 << 64, ValueError),
    ((1 << 64) + 4096, ValueError),
    (True, TypeError),
    (False, TypeError),
    (4096.0, TypeError),
    ("4096", TypeError),
    (b"\x00", TypeError),
]
#: For uint32_t parameters (granularities, cluster sizes, indices) also 2**32 and above.
BAD_32 = BAD_64 + [(1 << 32, ValueError), ((1 << 32) + 65536, ValueError)]


class _NoC:
    """Stands for the library: any use of a C function fails the test."""

    def __getattr__(self, name):
        raise AssertionError(f"C function {name} called with an invalid argument")


@contextlib.contextmanager
def no_c_calls():
    """Every module's handle on the library replaced by one that refuses to be used."""
    with contextlib.ExitStack() as stack:
        for mod in (_bitmap, _common, _image, _txn):
            stack.enter_context(mock.patch.object(mod, "lib", _NoC()))
        yield


class Index:
    """An integer-like object (as numpy's integers): accepted through __index__."""

    def __init__(self, v):
        self.v = v

    def __index__(self):
        return self.v


class ValidationTest(TempDirTest):
    def setUp(self):
        super().setUp()
        self.img = qdirty.Image.new_memory(MiB)
        self.bm = self.img.add_bitmap("b", granularity=G)
        self.bm.set_dirty(0, G)
        self.sha = self.bm.sha256()

    def tearDown(self):
        self.img.close()
        super().tearDown()

    def refused(self, call, bad=BAD_64):
        """call(v) raises the expected exception for every bad v, before any C call, and
        changes no bit."""
        for value, exc in bad:
            with self.subTest(value=value):
                with no_c_calls(), self.assertRaises(exc) as cm:
                    call(value)
                self.assertNotIsInstance(cm.exception, AssertionError)
        self.assertEqual(self.bm.sha256(), self.sha)
        self.assertEqual(self.bm.count(), G)

    # -- Image --------------------------------------------------------------------------------

    def test_image_set_dirty(self):
        self.refused(lambda v: self.img.set_dirty(v, G))
        self.refused(lambda v: self.img.set_dirty(0, v))
        # Each of these used to reach C: (0, -5) marked the whole disk, (-1, 4096) nothing.
        with self.assertRaises(ValueError):
            self.img.set_dirty(0, -5)
        with self.assertRaises(ValueError):
            self.img.set_dirty(-1, 4096)
        self.assertEqual(self.bm.count(), G)
        self.img.set_dirty(Index(2 * G), Index(1))
        self.assertEqual(self.bm.count(), 2 * G)

    def test_image_create(self):
        p = self.path("x.qcow2")
        self.refused(lambda v: qdirty.Image.create(p, v))
        self.refused(lambda v: qdirty.Image.create(p, MiB, v), BAD_32)
        qdirty.Image.create(p, Index(MiB), Index(4096))
        with qdirty.Image.open(p) as img:
            self.assertEqual(img.size, MiB)

    def test_image_new_memory(self):
        self.refused(qdirty.Image.new_memory)

    def test_image_truncate(self):
        self.refused(self.img.truncate)
        self.assertEqual(self.img.size, MiB)

    def test_image_add_bitmap(self):
        self.refused(lambda v: self.img.add_bitmap("x", granularity=v), BAD_32)
        # 2**32 + 65536 used to be truncated to a 64 KiB granularity.
        self.assertIsNone(self.img.find("x"))

    def test_image_create_bitmap(self):
        self.refused(lambda v: self.img.create_bitmap("x", granularity=v), BAD_32)
        self.assertIsNone(self.img.find("x"))

    def test_image_remove_broken_bitmap(self):
        self.refused(self.img.remove_broken_bitmap, BAD_32)

    def test_transaction_add(self):
        with qdirty.Transaction() as txn:
            self.refused(lambda v: txn.add(self.img, "x", granularity=v), BAD_32)
        self.assertIsNone(self.img.find("x"))

    # -- Bitmap -------------------------------------------------------------------------------

    def test_set_dirty(self):
        self.refused(lambda v: self.bm.set_dirty(v, G))
        self.refused(lambda v: self.bm.set_dirty(0, v))

    def test_reset_dirty(self):
        self.refused(lambda v: self.bm.reset_dirty(v, G))
        self.refused(lambda v: self.bm.reset_dirty(0, v))
        # Used to reach C as a range near 2**64.
        with self.assertRaises(ValueError):
            self.bm.reset_dirty(-4096, 4096)

    def test_get(self):
        self.refused(self.bm.get)
        self.refused(lambda v: v in self.bm)
        self.assertTrue(self.bm.get(Index(0)))

    def test_next_dirty(self):
        self.refused(self.bm.next_dirty)
        self.refused(lambda v: self.bm.next_dirty(0, v))
        self.assertEqual(self.bm.next_dirty(Index(0), None), 0)

    def test_next_zero(self):
        self.refused(self.bm.next_zero)
        self.refused(lambda v: self.bm.next_zero(0, v))
        self.assertEqual(self.bm.next_zero(0), G)

    def test_next_dirty_area(self):
        self.refused(self.bm.next_dirty_area)
        self.refused(lambda v: self.bm.next_dirty_area(0, v))
        self.refused(lambda v: self.bm.next_dirty_area(0, None, v))
        self.assertEqual(self.bm.next_dirty_area(0, None, None), (0, G))

    def test_status(self):
        self.refused(self.bm.status)
        self.refused(lambda v: self.bm.status(0, v))
        self.assertEqual(self.bm.status(0), (True, G))

    def test_dirty_extents(self):
        self.refused(lambda v: list(self.bm.dirty_extents(v)))
        self.refused(lambda v: list(self.bm.dirty_extents(0, v)))
        self.refused(lambda v: list(self.bm.dirty_extents(0, None, v)))
        self.refused(lambda v: list(self.bm.dirty_extents(0, None, max_len=v)))
        with self.assertRaises(ValueError):
            list(self.bm.dirty_extents(batch=0))
        with self.assertRaises(ValueError):
            list(self.bm.dirty_extents(max_len=0))

    def test_clean_extents(self):
        self.refused(lambda v: list(self.bm.clean_extents(v)))
        self.refused(lambda v: list(self.bm.clean_extents(0, v)))
        self.refused(lambda v: list(self.bm.clean_extents(0, None, v)))

    def test_iter_granules(self):
        self.refused(self.bm.iter_granules)
        self.img.truncate(MiB)  # refused while an iterator is left

    def test_iterator_seek(self):
        with self.bm.iter_granules() as it:
            self.refused(it.seek)
            self.assertEqual(list(it), [0])

    def test_serialization_size(self):
        self.refused(lambda v: self.bm.serialization_size(v, G))
        self.refused(lambda v: self.bm.serialization_size(0, v))

    def test_serialize_part(self):
        self.refused(lambda v: self.bm.serialize_part(v, MiB))
        self.refused(lambda v: self.bm.serialize_part(0, v))

    def test_deserialize_part(self):
        data = self.bm.serialize_part(0, MiB)
        self.refused(lambda v: self.bm.deserialize_part(data, v, MiB, True))
        self.refused(lambda v: self.bm.deserialize_part(data, 0, v, True))

    def test_deserialize_zeroes(self):
        self.refused(lambda v: self.bm.deserialize_zeroes(v, MiB, True))
        self.refused(lambda v: self.bm.deserialize_zeroes(0, v, True))

    def test_deserialize_ones(self):
        self.refused(lambda v: self.bm.deserialize_ones(v, MiB, True))
        self.refused(lambda v: self.bm.deserialize_ones(0, v, True))


if __name__ == "__main__":
    unittest.main()
