"""Threads: the guest write hook from several threads while the main thread queries."""

import threading
import unittest

from _util import MiB, TempDirTest, qdirty


class ThreadTest(TempDirTest):
    def test_write_hook_from_threads(self):
        size = 64 * MiB
        g = 65536
        with qdirty.Image.open(self.new_image(size=size), rw=True) as img:
            bm = img.add_bitmap("t", persistent=True)
            anon = img.create_bitmap(granularity=4096)
            nthreads, per = 4, 256
            stop = threading.Event()
            errors = []

            def writer(k):
                try:
                    for i in range(per):
                        img.set_dirty(((i * nthreads + k) * g) % size, 512)
                except BaseException as e:  # pragma: no cover
                    errors.append(e)

            def querier():
                while not stop.is_set():
                    q = img.query()
                    assert len(q) == 2
                    bm.count()
                    bm.sha256()
                    list(anon.dirty_extents(max_len=MiB))

            threads = [threading.Thread(target=writer, args=(k,)) for k in range(nthreads)]
            qt = threading.Thread(target=querier)
            qt.start()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            stop.set()
            qt.join()
            self.assertEqual(errors, [])
            self.assertEqual(bm.count(), nthreads * per * g)
            self.assertEqual(anon.count(), nthreads * per * 4096)
            self.assertEqual(list(bm.dirty_extents()), [(0, nthreads * per * g)])
        with qdirty.Image.open(img.path) as img2:
            self.assertEqual(img2["t"].count(), nthreads * per * g)


if __name__ == "__main__":
    unittest.main()
