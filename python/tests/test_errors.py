"""Errors, NULL arguments and the errp rules, through the package and the raw prototypes."""

import ctypes
import errno
import unittest

from _util import MiB, TempDirTest, qdirty
from qdirty import _ffi

lib = _ffi.lib


def raw_error(fn, *args):
    """Calls fn(*args, &err); returns (result, errno, message, hint) and frees the error."""
    err = _ffi.ErrorP()
    r = fn(*args, ctypes.byref(err))
    if not err:
        return r, 0, None, None
    try:
        return (
            r,
            lib.qdirty_error_errno(err),
            lib.qdirty_error_message(err).decode(),
            lib.qdirty_error_hint(err),
        )
    finally:
        lib.qdirty_error_free(err)


class VersionAndFreeTest(unittest.TestCase):
    def test_version(self):
        v = qdirty.version()
        self.assertRegex(v, r"^\d+\.\d+\.\d+")
        self.assertEqual(qdirty.__version__, v)

    def test_package_version_matches_library(self):
        import os
        import re

        here = os.path.dirname(os.path.abspath(__file__))
        with open(os.path.join(here, "..", "pyproject.toml"), encoding="utf-8") as f:
            m = re.search(r'^version = "([^"]+)"', f.read(), re.M)
        self.assertEqual(m.group(1), qdirty.version())

    def test_frees_accept_null(self):
        lib.qdirty_error_free(None)
        lib.qdirty_string_free(None)
        self.assertIsNone(lib.qdirty_error_message(None))
        self.assertIsNone(lib.qdirty_error_hint(None))
        self.assertEqual(lib.qdirty_error_errno(None), 0)

    def test_warning_handler_can_be_set_and_reset(self):
        seen = []
        qdirty.set_warning_handler(seen.append)
        qdirty.set_warning_handler(None)
        self.assertEqual(seen, [])


class NullArgumentTest(unittest.TestCase):
    """Every function: NULL arguments never crash."""

    def test_functions_with_errp(self):
        E = errno.EINVAL
        cases = [
            (lib.qdirty_image_create, (None, MiB, 0), -E),
            (lib.qdirty_image_open, (None, 0), None),
            (lib.qdirty_image_close, (None,), -E),
            (lib.qdirty_image_store_bitmaps, (None,), -E),
            (lib.qdirty_image_add_bitmap, (None, b"b", 0, 0), None),
            (lib.qdirty_image_remove_bitmap, (None, b"b"), -E),
            (lib.qdirty_image_merge_bitmap, (None, b"a", None, b"b"), -E),
            (lib.qdirty_bitmap_enable, (None,), -E),
            (lib.qdirty_bitmap_disable, (None,), -E),
            (lib.qdirty_bitmap_set_dirty, (None, 0, 512), -E),
            (lib.qdirty_bitmap_reset_dirty, (None, 0, 512), -E),
            (lib.qdirty_bitmap_clear, (None,), -E),
            (lib.qdirty_bitmap_sha256, (None,), None),
        ]
        for fn, args, expected in cases:
            with self.subTest(fn=fn.__name__):
                r, code, message, hint = raw_error(fn, *args)
                if expected is None:
                    self.assertFalse(r)
                else:
                    self.assertEqual(r, expected)
                self.assertEqual(code, errno.EINVAL)
                self.assertIn("NULL", message)
                self.assertIsNone(hint)
                # errp NULL: same result, no details
                r2 = fn(*args, None)
                if expected is None:
                    self.assertFalse(r2)
                else:
                    self.assertEqual(r2, expected)

    def test_functions_without_errp(self):
        self.assertEqual(lib.qdirty_image_size(None), 0)
        self.assertFalse(lib.qdirty_image_read_only(None))
        self.assertFalse(lib.qdirty_image_first_bitmap(None))
        self.assertFalse(lib.qdirty_image_find_bitmap(None, b"b"))
        self.assertFalse(lib.qdirty_image_find_bitmap(None, None))
        lib.qdirty_image_set_dirty(None, 0, 4096)
        self.assertFalse(lib.qdirty_bitmap_next(None))
        self.assertIsNone(lib.qdirty_bitmap_name(None))
        self.assertEqual(lib.qdirty_bitmap_granularity(None), 0)
        self.assertEqual(lib.qdirty_bitmap_size(None), 0)
        self.assertFalse(lib.qdirty_bitmap_enabled(None))
        self.assertFalse(lib.qdirty_bitmap_persistent(None))
        self.assertFalse(lib.qdirty_bitmap_inconsistent(None))
        self.assertFalse(lib.qdirty_bitmap_readonly(None))
        self.assertFalse(lib.qdirty_bitmap_get(None, 0))
        self.assertEqual(lib.qdirty_bitmap_count(None), 0)
        self.assertEqual(lib.qdirty_bitmap_next_dirty(None, 0, 2**64 - 1), -1)
        self.assertEqual(lib.qdirty_bitmap_next_zero(None, 0, 2**64 - 1), -1)
        s, c = ctypes.c_uint64(5), ctypes.c_uint64(5)
        self.assertFalse(
            lib.qdirty_bitmap_next_dirty_area(None, 0, 2**64 - 1, 2**64 - 1, ctypes.byref(s), ctypes.byref(c))
        )
        self.assertEqual((s.value, c.value), (0, 0))
        self.assertFalse(lib.qdirty_bitmap_next_dirty_area(None, 0, 1, 1, None, None))

    def test_errp_in_use_is_refused_without_side_effects(self):
        err = _ffi.ErrorP()
        self.assertFalse(lib.qdirty_image_open(None, 0, ctypes.byref(err)))
        self.assertTrue(err)
        first = ctypes.addressof(err.contents)
        message = lib.qdirty_error_message(err)
        self.assertEqual(lib.qdirty_image_close(None, ctypes.byref(err)), -errno.EINVAL)
        self.assertFalse(lib.qdirty_image_add_bitmap(None, b"b", 0, 0, ctypes.byref(err)))
        self.assertEqual(lib.qdirty_bitmap_clear(None, ctypes.byref(err)), -errno.EINVAL)
        self.assertEqual(ctypes.addressof(err.contents), first)
        self.assertEqual(lib.qdirty_error_message(err), message)
        lib.qdirty_error_free(err)


class PackageErrorTest(TempDirTest):
    def test_qdirty_error_fields(self):
        e = qdirty.QdirtyError(errno.ENOENT, "Dirty bitmap 'x' not found", "a hint")
        self.assertEqual(e.errno, errno.ENOENT)
        self.assertEqual(e.message, "Dirty bitmap 'x' not found")
        self.assertEqual(e.hint, "a hint")
        self.assertIn("ENOENT", str(e))
        self.assertIn("a hint", str(e))
        self.assertIsInstance(e, Exception)

    def test_empty_path(self):
        with self.assertQdirtyError(errno.EINVAL) as cm:
            qdirty.Image.create("", MiB)
        self.assertIn("path", cm.exception.message)
        with self.assertQdirtyError(errno.EINVAL):
            qdirty.Image.open("")

    def test_bad_flags_raw(self):
        r, code, message, _ = raw_error(lib.qdirty_image_open, self.path("x.qcow2").encode(), 0x80)
        self.assertFalse(r)
        self.assertEqual(code, errno.EINVAL)
        self.assertIn("flag", message)

    def test_bad_cluster_size(self):
        for cs in (1000, 256, 4 << 20):
            with self.subTest(cluster_size=cs), self.assertQdirtyError(errno.EINVAL):
                qdirty.Image.create(self.path("bad.qcow2"), MiB, cs)

    def test_missing_file(self):
        with self.assertQdirtyError(errno.ENOENT):
            qdirty.Image.open(self.path("missing.qcow2"))
        with self.assertQdirtyError(errno.ENOENT):
            qdirty.Image.create(self.path("no-such-dir/x.qcow2"), MiB)

    def test_not_qcow2(self):
        p = self.path("junk.img")
        with open(p, "wb") as f:
            f.write(bytes(range(256)) * 16)
        with self.assertQdirtyError(errno.EINVAL):
            qdirty.Image.open(p)

    def test_existing_file(self):
        p = self.new_image()
        with self.assertQdirtyError(errno.EEXIST):
            qdirty.Image.create(p, MiB)

    def test_name_type(self):
        p = self.new_image()
        with qdirty.Image.open(p, rw=True) as img:
            with self.assertRaises(TypeError):
                img.add_bitmap(42)  # type: ignore[arg-type]


if __name__ == "__main__":
    unittest.main()
