//! Dirty runs as (offset, length) lists: the models the tests compute independently of qdirty
//! (ranges rounded to granules, unions), and their differences in messages.

use crate::prng::Prng;

/// Merges adjacent or overlapping (offset, length) runs; drops empty ones. Input may be unsorted.
pub fn merge_runs(mut runs: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    runs.retain(|r| r.1 > 0);
    runs.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (o, l) in runs {
        if let Some(last) = out.last_mut() {
            if o <= last.0 + last.1 {
                let end = (o + l).max(last.0 + last.1);
                last.1 = end - last.0;
                continue;
            }
        }
        out.push((o, l));
    }
    out
}

/// The runs a bitmap of granularity `g` over a `size`-byte disk has after setting `ranges`:
/// each range rounded outward to granules, clamped to the disk end, merged.
pub fn expected_runs(ranges: &[(u64, u64)], g: u64, size: u64) -> Vec<(u64, u64)> {
    let runs = ranges
        .iter()
        .filter(|r| r.1 > 0 && r.0 < size)
        .map(|&(o, l)| {
            let s = o / g * g;
            let e = (o + l).div_ceil(g).saturating_mul(g).min(size);
            (s, e - s)
        })
        .collect();
    merge_runs(runs)
}

/// Re-rounds existing runs to granularity `g` (what a merge into a bitmap of granularity g gives).
pub fn regranulate(runs: &[(u64, u64)], g: u64, size: u64) -> Vec<(u64, u64)> {
    expected_runs(runs, g, size)
}

/// Union of two run lists.
pub fn union_runs(a: &[(u64, u64)], b: &[(u64, u64)]) -> Vec<(u64, u64)> {
    merge_runs(a.iter().chain(b.iter()).copied().collect())
}

/// `count` pseudo-random (offset, length) ranges inside a `size`-byte disk: offsets and
/// lengths are multiples of `align` (1 gives arbitrary byte ranges), lengths 1..=max_len
/// (rounded up to `align`) and clamped to the disk end.
pub fn random_ranges(
    rng: &mut Prng,
    count: usize,
    size: u64,
    max_len: u64,
    align: u64,
) -> Vec<(u64, u64)> {
    (0..count)
        .map(|_| {
            let off = rng.below(size / align) * align;
            let max = max_len.min(size - off).max(1);
            let len = (1 + rng.below(max)).div_ceil(align) * align;
            (off, len.min(size - off).max(1))
        })
        .collect()
}

/// Human-readable diff of two run lists.
pub fn diff_runs(qemu: &[(u64, u64)], qdirty: &[(u64, u64)]) -> String {
    let only_q: Vec<_> = qemu
        .iter()
        .filter(|r| !qdirty.contains(r))
        .take(5)
        .collect();
    let only_d: Vec<_> = qdirty
        .iter()
        .filter(|r| !qemu.contains(r))
        .take(5)
        .collect();
    format!(
        "QEMU has {} runs / {} bytes, qdirty {} runs / {} bytes; first QEMU-only {:?}; first qdirty-only {:?}",
        qemu.len(),
        qemu.iter().map(|r| r.1).sum::<u64>(),
        qdirty.len(),
        qdirty.iter().map(|r| r.1).sum::<u64>(),
        only_q,
        only_d
    )
}
