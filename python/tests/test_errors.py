"""Errors, NULL arguments and the errp rules, through the package and the raw prototypes."""

import ctypes
import errno
import os
import pickle
import subprocess
import sys
import traceback
import unittest
import warnings

from _util import MiB, TempDirTest, qdirty, require_tool
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


class PythonErrorTest(TempDirTest):
    """QdirtyError is an OSError, raised as the OSError subclass of its errno."""

    def test_missing_image_is_file_not_found(self):
        p = self.path("missing.qcow2")
        with self.assertRaises(FileNotFoundError) as cm:
            qdirty.Image.open(p)
        e = cm.exception
        self.assertIsInstance(e, qdirty.QdirtyError)
        self.assertIsInstance(e, OSError)
        self.assertEqual(e.errno, errno.ENOENT)
        # QEMU's wording with the C library's strerror, and nothing of Rust's "(os error 2)".
        self.assertEqual(e.message, f"Could not open '{p}': {os.strerror(errno.ENOENT)}")
        self.assertEqual(e.strerror, e.message)
        self.assertNotIn("os error", str(e))
        self.assertEqual(str(e), f"[ENOENT] {e.message}")
        # Shown as qdirty.QdirtyError, in repr and in tracebacks.
        self.assertEqual(type(e).__name__, "QdirtyError")
        self.assertEqual(type(e).__module__, "qdirty")
        self.assertEqual(repr(e), f"qdirty.QdirtyError({errno.ENOENT}, {e.message!r})")
        shown = traceback.format_exception_only(type(e), e)[-1]
        self.assertEqual(shown, f"qdirty.QdirtyError: [ENOENT] {e.message}\n")

    def test_missing_directory_on_create_is_file_not_found(self):
        with self.assertRaises(FileNotFoundError):
            qdirty.Image.create(self.path("no-such-dir/x.qcow2"), MiB)

    def test_existing_file_is_file_exists(self):
        p = self.new_image()
        with self.assertRaises(FileExistsError) as cm:
            qdirty.Image.create(p, MiB)
        self.assertIsInstance(cm.exception, qdirty.QdirtyError)
        self.assertEqual(cm.exception.errno, errno.EEXIST)

    def test_locked_image_is_blocking_io_error(self):
        p = self.new_image()
        with qdirty.Image.open(p, rw=True):
            with self.assertRaises(BlockingIOError) as cm:
                qdirty.Image.open(p, rw=True)
        e = cm.exception
        self.assertIsInstance(e, qdirty.QdirtyError)
        self.assertEqual(e.errno, errno.EAGAIN)
        self.assertIn("lock", e.message)

    def test_read_only_bitmap_is_permission_error(self):
        p = self.new_image()
        with qdirty.Image.open(p, rw=True) as img:
            bm = img.add_bitmap("b")
            bm.set_readonly(True)
            with self.assertRaises(PermissionError) as cm:
                bm.clear()
            self.assertIsInstance(cm.exception, qdirty.QdirtyError)
            self.assertEqual(cm.exception.errno, errno.EPERM)

    def test_errno_without_subclass_is_plain_qdirty_error(self):
        p = self.path("junk.img")
        with open(p, "wb") as f:
            f.write(bytes(range(256)) * 16)
        with self.assertRaises(qdirty.QdirtyError) as cm:
            qdirty.Image.open(p)
        self.assertIs(type(cm.exception), qdirty.QdirtyError)
        self.assertEqual(cm.exception.errno, errno.EINVAL)

    def test_constructed_like_oserror(self):
        # OSError(errno, message) picks the subclass of the errno; so does QdirtyError.
        for code in (errno.ENOENT, errno.EPERM, errno.EACCES, errno.EAGAIN, errno.EEXIST,
                     errno.EINVAL, errno.EBUSY, errno.EIO):
            with self.subTest(errno=errno.errorcode[code]):
                e = qdirty.QdirtyError(code, "m", "h")
                builtin = type(OSError(code, "m"))
                self.assertIsInstance(e, builtin)
                self.assertIsInstance(e, qdirty.QdirtyError)
                self.assertEqual((e.errno, e.message, e.hint, e.args), (code, "m", "h", (code, "m")))

    def test_pickles(self):
        e = qdirty.QdirtyError(errno.ENOENT, "Dirty bitmap 'x' not found", "a hint")
        back = pickle.loads(pickle.dumps(e))
        self.assertIs(type(back), type(e))
        self.assertIsInstance(back, FileNotFoundError)
        self.assertEqual((back.errno, back.message, back.hint), (e.errno, e.message, e.hint))


AUTOLOAD_WARNING = "Autoload option is deprecated and its value is ignored"

# Prints the warnings and what Python shows on stderr for: a bitmap added with autoload.
AUTOLOAD_SCRIPT = """
import sys, qdirty
qdirty.Image.create(sys.argv[1], 1 << 20)
with qdirty.Image.open(sys.argv[1], rw=True) as img:
    img.add_bitmap("b", autoload=True)
    print("added:", img.find("b") is not None)
"""


def clear_bitmaps_autoclear_bit(path):
    """What a program without bitmap support does to a qcow2 v3 image it writes: clears the
    "bitmaps" autoclear bit (bit 0 of the big-endian autoclear_features at header offset 88)."""
    with open(path, "r+b") as f:
        f.seek(88)
        value = int.from_bytes(f.read(8), "big")
        f.seek(88)
        f.write((value & ~1).to_bytes(8, "big"))


class PythonWarningTest(TempDirTest):
    """The library's warnings go through Python's warnings module."""

    def test_autoload_is_a_deprecation_warning_of_the_caller(self):
        p = self.new_image()
        with qdirty.Image.open(p, rw=True) as img:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                img.add_bitmap("b", autoload=True)
                with qdirty.Transaction() as txn:
                    txn.add(img, "t", autoload=False)
        self.assertEqual([str(w.message) for w in caught], [AUTOLOAD_WARNING] * 2)
        self.assertEqual({w.category for w in caught}, {DeprecationWarning})
        self.assertEqual({w.filename for w in caught}, {__file__})

    def test_autoload_under_error_filter_raises_before_anything_is_done(self):
        p = self.new_image()
        with qdirty.Image.open(p, rw=True) as img:
            with warnings.catch_warnings():
                warnings.simplefilter("error", DeprecationWarning)
                with self.assertRaises(DeprecationWarning) as cm:
                    img.add_bitmap("b", autoload=True)
                self.assertEqual(str(cm.exception), AUTOLOAD_WARNING)
                with qdirty.Transaction() as txn:
                    with self.assertRaises(DeprecationWarning):
                        txn.add(img, "t", autoload=True)
            self.assertEqual(img.bitmaps, [])

    def test_autoload_in_a_script(self):
        py = [sys.executable, "-c", AUTOLOAD_SCRIPT]
        env = dict(os.environ, PYTHONPATH=os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
        env.pop("PYTHONWARNINGS", None)
        # Python's default filters show a DeprecationWarning of __main__'s code.
        r = subprocess.run(py + [self.path("a.qcow2")], capture_output=True, text=True, env=env)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn("added: True", r.stdout)
        self.assertIn(f"DeprecationWarning: {AUTOLOAD_WARNING}", r.stderr)
        self.assertNotIn("qdirty: warning", r.stderr)
        # -W error makes it an exception.
        r = subprocess.run([sys.executable, "-W", "error::DeprecationWarning"] + py[1:] + [self.path("b.qcow2")],
                           capture_output=True, text=True, env=env)
        self.assertEqual(r.returncode, 1, r.stderr)
        self.assertNotIn("added:", r.stdout)
        self.assertIn(f"DeprecationWarning: {AUTOLOAD_WARNING}", r.stderr.strip().splitlines()[-1])
        # -W ignore silences it.
        r = subprocess.run([sys.executable, "-W", "ignore::DeprecationWarning"] + py[1:] + [self.path("c.qcow2")],
                           capture_output=True, text=True, env=env)
        self.assertEqual((r.returncode, r.stderr), (0, ""))

    def qemu_image_with_dropped_bitmaps(self):
        """A qcow2 image with a bitmap (qemu-img), then written by a program without bitmap
        support: QEMU warns that the bitmaps are inconsistent when it opens it."""
        tool = require_tool(self, "qemu-img")
        p = self.path("dropped.qcow2")
        for args in (["create", "-q", "-f", "qcow2", p, "1M"], ["bitmap", "--add", p, "b"]):
            r = subprocess.run([tool] + args, capture_output=True, text=True)
            self.assertEqual(r.returncode, 0, r.stderr)
        clear_bitmaps_autoclear_bit(p)
        return p

    def test_library_warning_is_a_qdirty_warning_of_the_caller(self):
        p = self.qemu_image_with_dropped_bitmaps()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            qdirty.Image.open(p).close()
        self.assertEqual(len(caught), 1, [str(w.message) for w in caught])
        w = caught[0]
        self.assertIs(w.category, qdirty.QdirtyWarning)
        self.assertTrue(issubclass(qdirty.QdirtyWarning, UserWarning))
        self.assertIn("a program lacking bitmap support modified this file", str(w.message))
        self.assertEqual(w.filename, __file__)

    def test_library_warning_under_error_filter_is_raised_by_the_call(self):
        p = self.qemu_image_with_dropped_bitmaps()
        with warnings.catch_warnings():
            warnings.simplefilter("error", qdirty.QdirtyWarning)
            with self.assertRaises(qdirty.QdirtyWarning) as cm:
                qdirty.Image.open(p, rw=True)
        self.assertIn("lacking bitmap support", str(cm.exception))
        # The image opened by that call was closed with it: nothing holds its lock.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", qdirty.QdirtyWarning)
            qdirty.Image.open(p, rw=True).close()

    def test_handler_gets_them_instead(self):
        p = self.qemu_image_with_dropped_bitmaps()
        seen = []
        qdirty.set_warning_handler(seen.append)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            qdirty.Image.open(p).close()
        self.assertEqual(caught, [])
        self.assertEqual(len(seen), 1)
        self.assertIn("lacking bitmap support", seen[0])


if __name__ == "__main__":
    unittest.main()
