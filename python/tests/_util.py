"""Shared helpers of the qdirty Python tests."""

import os
import sys
import tempfile
import unittest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import qdirty  # noqa: E402

MiB = 1 << 20
KiB = 1 << 10

# sha256 of 8 zero bytes: an empty bitmap of at most 64 granules (QEMU hashes 64-bit words).
SHA_EMPTY_WORD = "af5570f5a1810b7af78caf4bc70a660f0df51e42baf91d4de5b2328de0e83dfc"
# sha256 of 01 00 00 00 00 00 00 00: only granule 0 dirty.
SHA_FIRST_GRANULE = "7c9fa136d4413fa6173637e883b6998d32e1d675f88cddff9dcbcf331820f4b8"


class QdirtyTest(unittest.TestCase):
    """A test with assertQdirtyError."""

    def assertQdirtyError(self, errno_value: int):  # noqa: N802 (unittest style)
        return _ErrnoContext(self, errno_value)


class TempDirTest(QdirtyTest):
    """A test with a fresh temporary directory (under QDIRTY_TEST_TMP when set)."""

    def setUp(self) -> None:
        self._tmp = tempfile.TemporaryDirectory(
            prefix="qdirty-py-", dir=os.environ.get("QDIRTY_TEST_TMP") or None
        )
        self.dir = self._tmp.name

    def tearDown(self) -> None:
        qdirty.set_warning_handler(None)
        self._tmp.cleanup()

    def path(self, name: str) -> str:
        return os.path.join(self.dir, name)

    def new_image(self, name: str = "disk.qcow2", size: int = MiB, cluster_size: int = 0) -> str:
        p = self.path(name)
        qdirty.Image.create(p, size, cluster_size)
        return p

    def in_use_copy(self, size: int = 4 * MiB) -> str:
        """An image whose persistent bitmap "b" (first byte dirty) is in use: a copy taken while
        qdirty had the image open read-write, as a crash leaves it."""
        p = self.new_image(size=size)
        copy = self.path("copy.qcow2")
        with qdirty.Image.open(p, rw=True) as img:
            img.add_bitmap("b", persistent=True).set_dirty(0, 1)
        with qdirty.Image.open(p, rw=True):
            with open(p, "rb") as src, open(copy, "wb") as dst:
                dst.write(src.read())
        return copy


class _ErrnoContext:
    def __init__(self, test: unittest.TestCase, errno_value: int) -> None:
        self.test = test
        self.errno = errno_value
        self.exception = None

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.test.fail(f"QdirtyError(errno {self.errno}) not raised")
        if not issubclass(exc_type, qdirty.QdirtyError):
            return False
        self.exception = exc
        self.test.assertEqual(exc.errno, self.errno, f"wrong errno for: {exc}")
        self.test.assertTrue(exc.message, "the error has no message")
        return True


def require_tool(test: unittest.TestCase, tool: str) -> str:
    """The path of a QEMU tool; skips the test visibly when it is missing, or fails when
    QDIRTY_REQUIRE_QEMU=1."""
    import shutil

    path = shutil.which(tool)
    if path is None:
        if os.environ.get("QDIRTY_REQUIRE_QEMU") == "1":
            raise AssertionError(f"{tool} not found and QDIRTY_REQUIRE_QEMU=1")
        test.skipTest(f"{tool} not found (set QDIRTY_REQUIRE_QEMU=1 to make this a failure)")
    return path


def qemu_img_check(test: unittest.TestCase, path: str) -> None:
    """`qemu-img check` must pass (skipped without qemu-img)."""
    import subprocess

    tool = require_tool(test, "qemu-img")
    r = subprocess.run([tool, "check", path], capture_output=True, text=True)
    test.assertEqual(r.returncode, 0, r.stdout + r.stderr)


def qemu_img_bitmaps(test: unittest.TestCase, path: str) -> list:
    """The bitmaps `qemu-img info` reports: [{"name", "granularity", "flags"}]."""
    import json
    import subprocess

    tool = require_tool(test, "qemu-img")
    r = subprocess.run([tool, "info", "--output=json", "-U", path], capture_output=True, text=True)
    test.assertEqual(r.returncode, 0, r.stderr)
    info = json.loads(r.stdout)
    return info.get("format-specific", {}).get("data", {}).get("bitmaps", [])
