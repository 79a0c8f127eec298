"""Embedding: Image.open_with_io over a Python host object that serves a real file, and the
callbacks' error paths."""

import errno
import gc
import os
import unittest

from _util import MiB, TempDirTest, qdirty, qemu_img_bitmaps, qemu_img_check


class FileHost:
    """A host that owns the image file and serves qdirty's I/O."""

    def __init__(self, path, writable=True):
        self.fd = os.open(path, os.O_RDWR if writable else os.O_RDONLY)
        self.calls = {"pread": 0, "pwrite": 0, "flush": 0, "get_length": 0}
        self.fail = {}

    def _count(self, name):
        self.calls[name] += 1
        if name in self.fail:
            raise self.fail[name]

    def pread(self, offset, length):
        self._count("pread")
        return os.pread(self.fd, length, offset)

    def pwrite(self, offset, data):
        self._count("pwrite")
        os.pwrite(self.fd, data, offset)

    def flush(self):
        self._count("flush")
        os.fsync(self.fd)

    def get_length(self):
        self._count("get_length")
        return os.fstat(self.fd).st_size

    def close(self):
        os.close(self.fd)


class ReadOnlyHost(FileHost):
    pwrite = None  # type: ignore[assignment]

    def __init__(self, path):
        super().__init__(path, writable=False)


class EmbedTest(TempDirTest):
    def test_round_trip_through_callbacks(self):
        p = self.new_image(size=8 * MiB)
        host = FileHost(p)
        img = qdirty.Image.open_with_io(host, "vm-disk", rw=True)
        self.assertEqual(img.path, "vm-disk")
        self.assertEqual(img.size, 8 * MiB)
        bm = img.add_bitmap("hosted", persistent=True)
        img.set_dirty(MiB, 4096)
        img.store_bitmaps()
        self.assertGreater(host.calls["pwrite"], 0)
        self.assertGreater(host.calls["flush"], 0)
        del host  # the image keeps its host and callbacks alive
        gc.collect()
        img.set_dirty(2 * MiB, 1)
        img.close()
        self.assertFalse(bm.valid)
        qemu_img_check(self, p)
        self.assertEqual([b["name"] for b in qemu_img_bitmaps(self, p)], ["hosted"])
        with qdirty.Image.open(p) as again:
            self.assertEqual(list(again["hosted"].dirty_extents()), [(MiB, 65536), (2 * MiB, 65536)])

    def test_read_only_host(self):
        p = self.new_image(size=MiB)
        with qdirty.Image.open(p, rw=True) as img:
            img.add_bitmap("x", persistent=True).set_dirty(0, 1)
        host = ReadOnlyHost(p)
        try:
            with qdirty.Image.open_with_io(host, "ro") as img:
                self.assertTrue(img.read_only)
                self.assertTrue(img["x"].get(0))
            self.assertEqual(host.calls["flush"], 0)
        finally:
            host.close()
        host = ReadOnlyHost(p)
        with self.assertQdirtyError(errno.EINVAL):
            qdirty.Image.open_with_io(host, "ro", rw=True)  # pwrite missing
        host.close()

    def test_callback_errors(self):
        p = self.new_image(size=MiB)
        host = FileHost(p)
        host.fail["pread"] = OSError(errno.EIO, "disk on fire")
        with self.assertQdirtyError(errno.EIO) as cm:
            qdirty.Image.open_with_io(host, "broken")
        self.assertIsInstance(cm.exception.__cause__, OSError)
        self.assertIn("disk on fire", str(cm.exception.__cause__))
        host.fail.clear()
        host.fail["get_length"] = RuntimeError("not an OSError")
        with self.assertQdirtyError(errno.EIO) as cm:
            qdirty.Image.open_with_io(host, "broken")
        self.assertIsInstance(cm.exception.__cause__, RuntimeError)
        host.fail.clear()

        warnings = []
        qdirty.set_warning_handler(warnings.append)  # leaked clusters are reported there
        img = qdirty.Image.open_with_io(host, "full", rw=True)
        img.add_bitmap("p", persistent=True)
        host.fail["pwrite"] = OSError(errno.ENOSPC, "no space")
        with self.assertQdirtyError(errno.ENOSPC) as cm:
            img.store_bitmaps()
        self.assertIsInstance(cm.exception.__cause__, OSError)
        with self.assertQdirtyError(errno.ENOSPC):
            img.close()  # closed anyway
        self.assertTrue(img.closed)
        host.close()

    def test_with_block_reports_a_failed_close(self):
        # An exception leaves the block and the close that follows fails too: the exception
        # goes on, and the failed close reaches the warnings instead of vanishing.
        p = self.new_image(size=MiB)
        host = FileHost(p)
        warnings = []
        qdirty.set_warning_handler(warnings.append)
        try:
            with self.assertRaises(KeyError):
                with qdirty.Image.open_with_io(host, "full", rw=True) as img:
                    img.add_bitmap("p", persistent=True).set_dirty(0, 1)
                    host.fail["pwrite"] = OSError(errno.ENOSPC, "no space")
                    raise KeyError("the caller's own error")
            self.assertTrue(img.closed)
            failed = [w for w in warnings if w.startswith("closing the image after an exception failed too")]
            self.assertEqual(len(failed), 1, warnings)
            self.assertIn("No space left on device", failed[0])
        finally:
            qdirty.set_warning_handler(None)
            host.close()

    def test_with_block_reports_a_failed_abort(self):
        # Durable mode stores the outcome of an abort: when that fails after an exception
        # left the transaction's block, the exception goes on and the failure is warned.
        p = self.new_image(size=MiB)
        with qdirty.Image.open(p, rw=True) as img:
            img.add_bitmap("b", persistent=True).set_dirty(0, 1)
        host = FileHost(p)
        warnings = []
        qdirty.set_warning_handler(warnings.append)
        try:
            img = qdirty.Image.open_with_io(host, "durable", rw=True, durable=True)
            with self.assertRaises(KeyError):
                with qdirty.Transaction() as txn:
                    txn.clear(img, "b")
                    host.fail["pwrite"] = OSError(errno.EIO, "disk on fire")
                    raise KeyError("the caller's own error")
            failed = [w for w in warnings if w.startswith("aborting the transaction after an exception failed too")]
            self.assertEqual(len(failed), 1, warnings)
            # While the host fails, every call retries the store and reports its failure,
            # reads too; once it works, the next call stores the restored bits.
            with self.assertQdirtyError(errno.EIO):
                img["b"].get(0)
            host.fail.clear()
            self.assertTrue(img["b"].get(0), "the abort gave the bits back")
            with qdirty.Image.open(p, force_share=True) as peek:
                self.assertTrue(peek["b"].get(0), "and they are stored")
            img.close()
            with qdirty.Image.open(p) as again:
                self.assertTrue(again["b"].get(0))
        finally:
            qdirty.set_warning_handler(None)
            host.close()

    def test_short_read(self):
        p = self.new_image(size=MiB)
        host = FileHost(p)
        host.pread = lambda offset, length: b"\0" * (length // 2)
        with self.assertQdirtyError(errno.EIO) as cm:
            qdirty.Image.open_with_io(host, "short")
        self.assertIn("short read", str(cm.exception.__cause__))
        host.close()

    def test_allocator_must_be_complete(self):
        p = self.new_image(size=MiB)
        host = FileHost(p)
        host.alloc_clusters = lambda n, cluster_size: 0
        with self.assertQdirtyError(errno.EINVAL):
            qdirty.Image.open_with_io(host, "half", rw=True)
        host.close()

    def test_host_allocator_errors(self):
        p = self.new_image(size=MiB)
        host = FileHost(p)
        seen = []

        def alloc(n, cluster_size):
            seen.append((n, cluster_size))
            raise OSError(errno.ENOSPC, "host allocator full")

        host.alloc_clusters = alloc
        host.free_clusters = lambda offset, n, cluster_size: None
        img = qdirty.Image.open_with_io(host, "alloc", rw=True)
        img.add_bitmap("p", persistent=True)
        with self.assertQdirtyError(errno.ENOSPC):
            img.store_bitmaps()
        self.assertTrue(seen)
        self.assertEqual(seen[0][1], 65536)
        img.remove_bitmap("p")
        img.close()
        host.close()
        qemu_img_check(self, p)


if __name__ == "__main__":
    unittest.main()
