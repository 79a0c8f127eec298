"""Python side of the walk benchmark (benches/walk.rs runs it; not meant to be run alone).

``walk.py SIZE GRANULARITY DIRTY_ONE_IN RUNS BYTES SUM`` builds the benchmark's bitmap through the
package (an in-memory image, the same generator and the same granules as benches/walk.rs, set
with ``Image.set_dirty``), checks one ``Bitmap.dirty_extents()`` walk against the Rust side's
figures (runs, bytes, checksum), prints ``ready``, then answers each ``walk`` line of its input
with ``PY_NS TUPLES_NS``:

* PY_NS: one ``for offset, length in bm.dirty_extents()`` loop over the whole bitmap;
* TUPLES_NS: the same loop over a pure Python generator yielding as many ``(offset, length)``
  tuples (a fresh offset each): what building the tuples costs, whatever their source.

The Rust side times the C walk between two answers, so that all three figures share the load.
"""

import sys
import time
from typing import Iterator, Set, Tuple

import qdirty

U64 = (1 << 64) - 1


def build(size: int, granularity: int, one_in: int) -> Tuple[qdirty.Image, qdirty.Bitmap]:
    """benches/walk.rs's bitmap: its xorshift sequence of granules, one in ``one_in`` dirty."""
    img = qdirty.Image.new_memory(size)
    bm = img.add_bitmap("walk", granularity=granularity)
    granules = size // granularity
    x = 0x9E37_79B9_7F4A_7C15
    seen: Set[int] = set()
    while len(seen) < granules // one_in:
        x ^= (x << 13) & U64
        x ^= x >> 7
        x ^= (x << 17) & U64
        g = x % granules
        if g not in seen:
            seen.add(g)
            img.set_dirty(g * granularity, granularity)
    return img, bm


def found(bm: qdirty.Bitmap) -> Tuple[int, int, int]:
    """benches/walk.rs's ``Found`` of one walk: runs, bytes, order-sensitive checksum."""
    runs = total = s = 0
    for off, length in bm.dirty_extents():
        runs += 1
        total += length
        s = (((s << 7) | (s >> 57)) & U64) + (off ^ ((length * 0x9E37_79B9_7F4A_7C15) & U64))
        s &= U64
    return runs, total, s


def tuples(n: int, granularity: int) -> Iterator[Tuple[int, int]]:
    for i in range(n):
        yield i * granularity, granularity


def timed_walk(bm: qdirty.Bitmap, want: int) -> int:
    t = time.perf_counter_ns()
    n = 0
    for _off, _length in bm.dirty_extents():
        n += 1
    t = time.perf_counter_ns() - t
    assert n == want, (n, want)
    return t


def timed_tuples(count: int, granularity: int) -> int:
    t = time.perf_counter_ns()
    n = 0
    for _off, _length in tuples(count, granularity):
        n += 1
    t = time.perf_counter_ns() - t
    assert n == count
    return t


def main() -> None:
    size, granularity, one_in, runs, total, s = (int(a) for a in sys.argv[1:7])
    img, bm = build(size, granularity, one_in)
    got = found(bm)
    if got != (runs, total, s):
        sys.exit(f"walk.py: dirty_extents found {got}, the C walks {(runs, total, s)}")
    print("ready", flush=True)
    for line in sys.stdin:
        if line.strip() != "walk":
            break
        py = timed_walk(bm, runs)
        base = timed_tuples(runs, granularity)
        print(py, base, flush=True)
    img.close()


if __name__ == "__main__":
    main()
