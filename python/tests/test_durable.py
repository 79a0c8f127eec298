"""Durable mode: Image.open(durable=True), prepare_write, zone_bytes; the file QEMU sees while the
image is open and after the process is killed."""

import errno
import json
import os
import signal
import subprocess
import sys
import unittest
import warnings

from _util import KiB, MiB, TempDirTest, qdirty, qemu_img_bitmaps, qemu_img_check, require_tool
from test_embed import FileHost
from test_validation import no_c_calls

#: The default zone size of durable mode (include/qdirty.h: "Zones are 16 MiB").
DEFAULT_ZONE = 16 * MiB
G = 64 * KiB

#: The host of the crash test: opens the image in durable mode with 1 MiB zones, adds a
#: persistent bitmap, completes one guest write (prepare_write, the data into the raw data
#: file, set_dirty), starts a second one (prepare_write, the data) that never completes, and is
#: killed.
CRASH_SCRIPT = r"""
import os, signal, sys
import qdirty
image, raw = sys.argv[1], sys.argv[2]
img = qdirty.Image.open(image, rw=True, durable=True, zone_bytes=1 << 20)
img.add_bitmap("b", granularity=65536, persistent=True)
fd = os.open(raw, os.O_RDWR)
# completed: [1 MiB + 4 KiB, +8 KiB)
img.prepare_write(0x101000, 0x2000)
os.pwrite(fd, b"\xaa" * 0x2000, 0x101000)
os.fdatasync(fd)
img.set_dirty(0x101000, 0x2000)
# in flight: [5 MiB + 64 KiB, +64 KiB)
img.prepare_write(0x510000, 0x10000)
os.pwrite(fd, b"\xbb" * 0x10000, 0x510000)
os.fdatasync(fd)
print("ready", flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def qemu_img_info(test, path):
    tool = require_tool(test, "qemu-img")
    r = subprocess.run([tool, "info", "--output=json", "-U", path], capture_output=True, text=True)
    test.assertEqual(r.returncode, 0, r.stderr)
    return json.loads(r.stdout)


def nbd_dirty_extents(test, path, name):
    """The dirty runs of bitmap ``name`` as QEMU exports them: qemu-nbd -B, read with nbdinfo's
    map of ``qemu:dirty-bitmap:NAME``."""
    nbd = require_tool(test, "qemu-nbd")
    nbdinfo = require_tool(test, "nbdinfo")
    r = subprocess.run(
        [nbdinfo, "--json", f"--map=qemu:dirty-bitmap:{name}", "--",
         "[", nbd, "-r", "-f", "qcow2", "-B", name, path, "]"],
        capture_output=True, text=True, timeout=60,
    )
    test.assertEqual(r.returncode, 0, r.stderr)
    # Type 1 is "dirty" in QEMU's dirty-bitmap context.
    return [(e["offset"], e["length"]) for e in json.loads(r.stdout) if e["type"] & 1]


def zones_of(offset, length, zone):
    first, last = offset // zone, (offset + length - 1) // zone
    return set(range(first, last + 1))


class DurableOpenTest(TempDirTest):
    def test_durable_open_and_zone_bytes(self):
        p = self.new_image(size=8 * MiB)
        with qdirty.Image.open(p, rw=True, durable=True) as img:
            self.assertFalse(img.read_only)
            self.assertEqual(img.zone_bytes, DEFAULT_ZONE)
        with qdirty.Image.open(p, rw=True, durable=True, zone_bytes=MiB) as img:
            self.assertEqual(img.zone_bytes, MiB)
        with qdirty.Image.open(p, rw=True) as img:
            self.assertEqual(img.zone_bytes, 0)
            img.prepare_write(0, 4096)  # not durable: nothing to do
        with qdirty.Image.open(p) as img:
            self.assertEqual(img.zone_bytes, 0)
        with qdirty.Image.new_memory(MiB) as img:
            self.assertEqual(img.zone_bytes, 0)
            img.prepare_write(0, 4096)
        self.assertEqual(qdirty.QDIRTY_OPEN_DURABLE, 8)

    def test_prepare_write_then_set_dirty(self):
        p = self.new_image(size=8 * MiB)
        with qdirty.Image.open(p, rw=True, durable=True, zone_bytes=MiB) as img:
            bm = img.add_bitmap("b", granularity=G, persistent=True)
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # no protocol warning for a prepared write
                img.prepare_write(MiB + 4096, 8192)
                img.set_dirty(MiB + 4096, 8192)
                img.prepare_write(MiB + 4096, 8192)  # covered already
                img.set_dirty(MiB + 4096, 8192)
            self.assertEqual(list(bm.dirty_extents()), [(MiB, G)])
        with qdirty.Image.open(p) as img:
            self.assertEqual(list(img["b"].dirty_extents()), [(MiB, G)])
        qemu_img_check(self, p)

    def test_closed_image(self):
        p = self.new_image()
        img = qdirty.Image.open(p, rw=True, durable=True)
        img.close()
        with self.assertRaises(ValueError):
            img.prepare_write(0, 1)
        with self.assertRaises(ValueError):
            img.zone_bytes


class DurableValidationTest(TempDirTest):
    def test_durable_needs_rw_before_any_c_call(self):
        missing = self.path("missing.qcow2")
        with no_c_calls(), self.assertRaises(ValueError):
            qdirty.Image.open(missing, durable=True)
        with no_c_calls(), self.assertRaises(ValueError):
            qdirty.Image.open(missing, durable=True, zone_bytes=MiB)
        with no_c_calls(), self.assertRaises(ValueError):
            qdirty.Image.open(missing, rw=True, zone_bytes=MiB)  # zone_bytes without durable
        with no_c_calls(), self.assertRaises(ValueError):
            qdirty.Image.open(missing, rw=True, durable=True, salvage=True, zone_bytes=MiB)
        with no_c_calls(), self.assertRaises(ValueError):
            qdirty.Image.open_with_io(object(), durable=True)

    def test_zone_bytes_is_checked(self):
        p = self.new_image()
        for bad, exc in [(-1, ValueError), (1 << 64, ValueError), (True, TypeError),
                         (float(MiB), TypeError), (str(MiB), TypeError)]:
            with self.subTest(zone_bytes=bad), no_c_calls(), self.assertRaises(exc):
                qdirty.Image.open(p, rw=True, durable=True, zone_bytes=bad)
        # Not a power of two of at least 64 KiB: the library refuses it.
        for bad in [0, 3 * 64 * KiB, 32 * KiB, 64 * KiB + 1]:
            with self.subTest(zone_bytes=bad), self.assertQdirtyError(errno.EINVAL):
                qdirty.Image.open(p, rw=True, durable=True, zone_bytes=bad)
        with qdirty.Image.open(p, rw=True, durable=True, zone_bytes=64 * KiB) as img:
            self.assertEqual(img.zone_bytes, 64 * KiB)
        with qdirty.Image.open(p, rw=True) as img:
            for bad, exc in [(-1, ValueError), (1 << 64, ValueError), (True, TypeError)]:
                with self.subTest(bad=bad), self.assertRaises(exc):
                    img.prepare_write(bad, 1)
                with self.subTest(bad=bad), self.assertRaises(exc):
                    img.prepare_write(0, bad)


class DurableWarningTest(TempDirTest):
    def test_set_dirty_without_prepare_warns(self):
        p = self.new_image(size=8 * MiB)
        with qdirty.Image.open(p, rw=True, durable=True) as img:
            img.add_bitmap("b", persistent=True)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                img.set_dirty(2 * MiB, 4096)
            self.assertEqual(len(caught), 1, [str(w.message) for w in caught])
            self.assertIs(caught[0].category, qdirty.QdirtyWarning)
            self.assertIn("without a prepare_write", str(caught[0].message))
            self.assertEqual(caught[0].filename, __file__)
            # Through the package's handler too; a prepared write gives none.
            got = []
            qdirty.set_warning_handler(got.append)
            img.set_dirty(3 * MiB, 4096)
            img.prepare_write(4 * MiB, 4096)
            img.set_dirty(4 * MiB, 4096)
            self.assertEqual(len(got), 1, got)
            self.assertIn("without a prepare_write", got[0])
            # The write is recorded all the same.
            self.assertTrue(img["b"].get(2 * MiB))
            self.assertTrue(img["b"].get(3 * MiB))


class DurableFailureTest(TempDirTest):
    def test_prepare_write_failure_raises(self):
        p = self.new_image(size=8 * MiB)
        host = FileHost(p)
        try:
            with qdirty.Image.open_with_io(host, "hosted", rw=True, durable=True) as img:
                self.assertEqual(img.zone_bytes, DEFAULT_ZONE)
                img.add_bitmap("b", persistent=True)
                host.fail["pwrite"] = OSError(errno.EIO, "disk on fire")
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")  # the failed store may warn of leaks
                    with self.assertQdirtyError(errno.EIO) as cm:
                        img.prepare_write(0, 4096)
                self.assertTrue(all(w.category is qdirty.QdirtyWarning for w in caught))
                self.assertIn("disk on fire", str(cm.exception.__cause__))
                host.fail.clear()
                img.prepare_write(0, 4096)  # the zone is covered now
                img.set_dirty(0, 4096)
        finally:
            host.close()
        qemu_img_check(self, p)
        self.assertEqual([b["name"] for b in qemu_img_bitmaps(self, p)], ["b"])


class DurableQemuTest(TempDirTest):
    """What QEMU's tools see of an image in durable mode."""

    def test_open_image_has_no_in_use_bitmap(self):
        p = self.new_image(size=8 * MiB)
        with qdirty.Image.open(p, rw=True) as img:  # the ordinary mode, for contrast
            img.add_bitmap("b", persistent=True)
            img.store_bitmaps()
            self.assertIn("in-use", qemu_img_bitmaps(self, p)[0]["flags"])
        with qdirty.Image.open(p, rw=True, durable=True) as img:
            img.add_bitmap("c", persistent=True)
            img.prepare_write(MiB, 4096)
            img.set_dirty(MiB, 4096)
            bitmaps = qemu_img_bitmaps(self, p)
            self.assertEqual(sorted(b["name"] for b in bitmaps), ["b", "c"])
            for b in bitmaps:
                self.assertNotIn("in-use", b["flags"], b)
        qemu_img_check(self, p)

    def test_killed_process_leaves_consistent_bitmaps(self):
        qemu_img = require_tool(self, "qemu-img")
        p, raw = self.path("disk.qcow2"), self.path("disk.raw")
        r = subprocess.run(
            [qemu_img, "create", "-q", "-f", "qcow2", "-o", f"data_file={raw},data_file_raw=on",
             p, str(8 * MiB)],
            capture_output=True, text=True,
        )
        self.assertEqual(r.returncode, 0, r.stderr)
        env = dict(os.environ, PYTHONPATH=os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
        r = subprocess.run([sys.executable, "-c", CRASH_SCRIPT, p, raw],
                           capture_output=True, text=True, env=env, timeout=120)
        self.assertEqual(r.returncode, -signal.SIGKILL, r.stderr)
        self.assertEqual(r.stdout, "ready\n", r.stderr)

        info = qemu_img_info(self, p)
        bitmaps = info["format-specific"]["data"]["bitmaps"]
        self.assertEqual([b["name"] for b in bitmaps], ["b"])
        self.assertNotIn("in-use", bitmaps[0]["flags"])
        self.assertEqual(bitmaps[0]["granularity"], G)
        qemu_img_check(self, p)

        # QEMU's own reading of the bitmap covers both writes (the completed one and the one in
        # flight) and nothing outside their 1 MiB zones.
        written = [(0x101000, 0x2000), (0x510000, 0x10000)]
        dirty = nbd_dirty_extents(self, p, "b")
        for off, length in written:
            self.assertTrue(any(o <= off and off + length <= o + n for o, n in dirty),
                            f"write [{off:#x}, +{length:#x}) missing from {dirty}")
        zones = set().union(*(zones_of(o, n, MiB) for o, n in written))
        for o, n in dirty:
            self.assertLessEqual(zones_of(o, n, MiB), zones, f"dirty run [{o:#x}, +{n:#x})")
        # The data written is where the bitmap says.
        with open(raw, "rb") as f:
            data = f.read()
        for off, length in written:
            self.assertNotEqual(data[off:off + length], bytes(length))

        # qdirty opens it again, read-write, and a clean close leaves it valid.
        with qdirty.Image.open(p, rw=True, durable=True) as img:
            self.assertFalse(img["b"].inconsistent)
            self.assertTrue(img["b"].get(0x510000))
        qemu_img_check(self, p)


if __name__ == "__main__":
    unittest.main()
