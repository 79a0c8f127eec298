//! Tests of the engine against a model (one bool per granule) and of its invariants.

use super::chunk::{GROUP_MASK, SPARSE_MAX};
use super::tower::Tower;
use super::*;
use crate::bitmap::sha256::{to_hex, Sha256};

use qdirty_testkit::Prng as Rng;

/// `percent` % of the time.
fn chance(rng: &mut Rng, percent: u64) -> bool {
    rng.below(100) < percent
}

/// The obviously correct model: one bool per granule.
#[derive(Clone)]
struct Model {
    size: u64,
    g: u32,
    bits: Vec<bool>,
}

impl Model {
    fn new(size: u64, g: u32) -> Self {
        let n = size.div_ceil(1 << g) as usize;
        Model {
            size,
            g,
            bits: vec![false; n],
        }
    }
    fn gran(&self) -> u64 {
        1 << self.g
    }
    fn span(&self, start: u64, bytes: u64) -> std::ops::Range<usize> {
        if bytes == 0 || start >= self.size {
            return 0..0;
        }
        let first = (start >> self.g) as usize;
        let last = (start.saturating_add(bytes - 1) >> self.g) as usize;
        first..last.min(self.bits.len() - 1) + 1
    }
    fn fill(&mut self, start: u64, bytes: u64, v: bool) {
        let r = self.span(start, bytes);
        self.bits[r].fill(v);
    }
    fn dirty(&self) -> u64 {
        self.bits.iter().filter(|&&b| b).count() as u64
    }
    fn get(&self, off: u64) -> bool {
        off < self.size && self.bits[(off >> self.g) as usize]
    }
    fn next(&self, start: u64, bytes: u64, want: bool) -> Option<u64> {
        if start >= self.size || bytes == 0 {
            return None;
        }
        let end = start.saturating_add(bytes).min(self.size);
        let first = (start >> self.g) as usize;
        let end_g = (end - 1) >> self.g;
        (first..=end_g as usize)
            .find(|&k| self.bits[k] == want)
            .map(|k| start.max((k as u64) << self.g))
    }
    fn area(&self, start: u64, end: u64, max: u64) -> Option<(u64, u64)> {
        let end = end.min(self.size);
        if start >= end || max == 0 {
            return None;
        }
        let s = self.next(start, end - start, true)?;
        let z = self.next(s, end - s, false).unwrap_or(end);
        let e = end.min(s.saturating_add(max)).min(z);
        Some((s, e - s))
    }
    fn status(&self, start: u64, bytes: u64) -> (bool, u64) {
        if start >= self.size {
            return (false, 0);
        }
        let d = self.get(start);
        let end = start.saturating_add(bytes).min(self.size);
        // Walk granule by granule.
        let mut pos = start;
        while pos < end && self.get(pos) == d {
            pos = ((pos >> self.g) + 1) << self.g;
        }
        (d, pos.min(end) - start)
    }
    /// QEMU layout of the words spanned by [start, start + bytes).
    fn serialize(&self, start: u64, bytes: u64) -> Vec<u8> {
        if bytes == 0 {
            return Vec::new();
        }
        let fw = (start >> self.g) >> 6;
        let lw = (start.saturating_add(bytes - 1) >> self.g) >> 6;
        let n = (lw - fw + 1) as usize;
        let mut out = vec![0u8; n * 8];
        for i in 0..n * 64 {
            let k = (fw * 64) as usize + i;
            if k < self.bits.len() && self.bits[k] {
                out[i / 8] |= 1 << (i % 8);
            }
        }
        out
    }
    /// The bytes QEMU hashes: all words, at least one.
    fn hash_input(&self) -> Vec<u8> {
        let mut v = self.serialize(0, self.size.max(1));
        if v.is_empty() {
            v = vec![0; 8];
        }
        v
    }
    fn merge(&mut self, other: &Model) {
        for (k, &b) in other.bits.iter().enumerate() {
            if b {
                let s = (k as u64) << other.g;
                let e = ((k as u64 + 1) << other.g).min(self.size);
                self.fill(s, e - s, true);
            }
        }
    }
    fn truncate(&mut self, new_size: u64) {
        self.size = new_size;
        self.bits
            .resize(new_size.div_ceil(1 << self.g) as usize, false);
    }
}

/// Structural invariants: canonical chunk states, exact chunk summaries and counts, towers
/// equal to a fresh build, zero bits past the end.
fn check_invariants(hb: &HBitmap) {
    assert_eq!(hb.granules, hb.size.div_ceil(1 << hb.granularity_bits));
    let n = chunk_count(hb.granules);
    assert_eq!(hb.chunks.len(), n, "chunk table");
    assert_eq!(hb.sparse.len(), n, "sparse table");
    assert_eq!(hb.sparse.live(), hb.sparse.iter().count(), "sparse live");
    assert_eq!(hb.chunks.live(), hb.chunks.iter().count(), "chunks live");
    let mut dirty = 0u64;
    for c in 0..n {
        let cap = hb.cap(c);
        let (ne, nf) = (hb.nonempty.get(c), hb.notfull.get(c));
        if let Some(s) = hb.sp(c) {
            assert!(!hb.chunks.is_some(c), "chunk {c} both sparse and partial");
            assert!(ne && nf, "sparse chunk {c} flags");
            assert!(s.entries.len() <= SPARSE_MAX, "sparse chunk {c} too long");
            let mut count = 0u64;
            for (i, &(k, v)) in s.entries.iter().enumerate() {
                assert!(v != 0, "sparse chunk {c}: zero word");
                assert!(i == 0 || s.entries[i - 1].0 < k, "sparse chunk {c}: order");
                for b in 0..64 {
                    if (v >> b) & 1 != 0 {
                        assert!((u64::from(k) << 6) + b < cap, "sparse tail bit");
                    }
                }
                count += u64::from(v.count_ones());
            }
            assert_eq!(count, u64::from(s.count), "sparse chunk {c} count");
            assert!(count > 0 && count < cap, "sparse chunk {c} not canonical");
            dirty += count;
            continue;
        }
        match hb.chunks.get(c) {
            Some(p) => {
                assert!(ne && nf, "partial chunk {c} flags");
                let count: u64 = p.words.iter().map(|w| u64::from(w.count_ones())).sum();
                assert_eq!(count, u64::from(p.count), "chunk {c} count");
                assert!(count > 0 && count < cap, "chunk {c} not canonical");
                for (g, ws) in p.words.chunks(64).enumerate() {
                    let a = ws
                        .iter()
                        .enumerate()
                        .fold(0u64, |v, (i, &w)| v | (u64::from(w != 0) << i));
                    let f = ws
                        .iter()
                        .enumerate()
                        .fold(0u64, |v, (i, &w)| v | (u64::from(w == !0) << i));
                    assert_eq!(p.any1[g], a, "chunk {c} any1 {g}");
                    assert_eq!(p.full1[g], f, "chunk {c} full1 {g}");
                    assert_eq!((p.any2 >> g) & 1, u64::from(a != 0), "chunk {c} any2");
                    assert_eq!((p.full2 >> g) & 1, u64::from(f == !0), "chunk {c} full2");
                }
                assert_eq!(p.any2 & !GROUP_MASK, 0);
                assert_eq!(p.full2 & !GROUP_MASK, 0);
                for k in cap..CHUNK_GRANULES {
                    assert_eq!((p.words[(k >> 6) as usize] >> (k & 63)) & 1, 0, "tail bit");
                }
                dirty += count;
            }
            None if cap == 0 => assert!(!ne && nf, "zero-capacity chunk"),
            None => {
                assert!(ne != nf, "chunk {c} clean xor full");
                if ne {
                    dirty += cap;
                }
            }
        }
    }
    assert_eq!(dirty, hb.dirty, "count");
    for t in [&hb.nonempty, &hb.notfull] {
        let bits = t.to_bits();
        assert_eq!(bits.len(), n.div_ceil(64).max(1));
        for i in n..bits.len() * 64 {
            assert_eq!((bits[i >> 6] >> (i & 63)) & 1, 0, "tower bit past the end");
        }
        assert_eq!(
            Tower::from_bits(n, &bits).summary_levels(),
            t.summary_levels(),
            "tower summaries"
        );
        assert!(t.pages_canonical(), "tower pages");
    }
}

fn assert_same(hb: &HBitmap, m: &Model) {
    assert_eq!(hb.size(), m.size);
    assert_eq!(hb.granules(), m.bits.len() as u64);
    assert_eq!(hb.dirty_granules(), m.dirty());
    assert_eq!(hb.count(), m.dirty() << m.g);
    assert_eq!(hb.is_empty(), m.dirty() == 0);
    let mut buf = vec![0u8; hb.serialization_size(0, m.size) as usize];
    hb.serialize_part(&mut buf, 0, m.size);
    assert_eq!(buf, m.serialize(0, m.size), "bits differ");
}

/// An offset biased toward interesting places (granule and word edges, the end, far away).
fn pick_offset(rng: &mut Rng, m: &Model) -> u64 {
    let gran = m.gran();
    let n = m.bits.len() as u64;
    match rng.below(10) {
        0 => 0,
        1 => m.size.saturating_sub(rng.below(3)),
        2 => m.size + rng.below(3 * gran),
        3 => ((rng.below(n + 1) << m.g) + rng.below(3)).saturating_sub(1),
        4 => ((rng.below(n / 64 + 2) * 64) << m.g).saturating_sub(rng.below(2)),
        5 => u64::MAX - rng.below(3),
        6 => {
            // A chunk boundary, give or take a granule.
            let c = rng.below(n / CHUNK_GRANULES + 2) * CHUNK_GRANULES;
            ((c + rng.below(3)).saturating_sub(1) << m.g) + rng.below(2)
        }
        _ => rng.below(m.size + 1),
    }
}

fn pick_len(rng: &mut Rng, m: &Model, start: u64) -> u64 {
    let gran = m.gran();
    match rng.below(10) {
        0 => 0,
        1 => 1,
        2 => gran * (1 + rng.below(3)),
        3 => u64::MAX - rng.below(2),
        4 => (u64::MAX - start).saturating_sub(rng.below(2)),
        5 => m.size.saturating_sub(start),
        6 => rng.below(64 * gran * 3) + 1,
        _ => rng.below(m.size / 2 + 2) + 1,
    }
}

/// A caller-valid reset range: aligned start, aligned length or reaching the end.
fn pick_reset(rng: &mut Rng, m: &Model) -> (u64, u64) {
    let n = m.bits.len() as u64;
    let k = rng.below(n + 1);
    let start = (k << m.g).min(m.size);
    let room = n - k;
    let bytes = match rng.below(4) {
        0 => m.size - start,
        1 => 1u64.min(room) << m.g,
        _ => rng.below(room + 1) << m.g,
    };
    (start, bytes.min(m.size - start))
}

fn random_bitmap(rng: &mut Rng, size: u64, g: u32) -> (HBitmap, Model) {
    let mut hb = HBitmap::new(size, g);
    let mut m = Model::new(size, g);
    for _ in 0..rng.below(6) {
        let s = pick_offset(rng, &m);
        let l = pick_len(rng, &m, s);
        let l = if l > m.size / 4 {
            rng.below(m.size / 4 + 1)
        } else {
            l
        };
        hb.set(s, l);
        m.fill(s, l, true);
    }
    (hb, m)
}

fn check_serialization(rng: &mut Rng, hb: &HBitmap, m: &Model) {
    let align = hb.serialization_align();
    assert_eq!(align, 64 << m.g);
    let chunk = align * (1 + rng.below(3));
    // Start from garbage to prove that deserialization overwrites.
    let (mut copy, _) = random_bitmap(rng, m.size, m.g);
    let mut start = 0;
    while start < m.size {
        let len = chunk.min(m.size - start);
        let expect = m.serialize(start, len);
        let sz = hb.serialization_size(start, len);
        assert_eq!(sz, expect.len() as u64);
        let mut buf = vec![0xa5u8; sz as usize + 3];
        hb.serialize_part(&mut buf, start, len);
        assert_eq!(&buf[..sz as usize], &expect[..], "chunk at {start}");
        assert_eq!(&buf[sz as usize..], &[0xa5; 3], "wrote past the size");
        let range = m.span(start, len);
        if m.bits[range.clone()].iter().all(|&b| !b) && chance(rng, 70) {
            copy.deserialize_zeroes(start, len);
        } else if m.bits[range].iter().all(|&b| b) && chance(rng, 70) {
            copy.deserialize_ones(start, len);
        } else {
            copy.deserialize_part(&buf, start, len);
        }
        start += len;
    }
    copy.deserialize_finish();
    check_invariants(&copy);
    assert_same(&copy, m);
}

/// Long random operation sequences against the model.
fn run_random(g: u32, granules: u64, seed: u64, ops: usize) {
    let gran = 1u64 << g;
    let mut rng = Rng::new(seed);
    let size = if granules == 0 {
        0
    } else {
        granules * gran - rng.below(gran)
    };
    let mut hb = HBitmap::new(size, g);
    let mut m = Model::new(size, g);
    for op in 0..ops {
        let ctx = || format!("g {g} size {size} op {op}");
        match rng.below(100) {
            0..=19 => {
                let s = pick_offset(&mut rng, &m);
                let l = pick_len(&mut rng, &m, s);
                // Mostly bounded sets so the bitmap does not saturate.
                let l = if chance(&mut rng, 85) {
                    l.min(m.size / 8 + gran)
                } else {
                    l
                };
                hb.set(s, l);
                m.fill(s, l, true);
            }
            20..=31 => {
                let (s, l) = pick_reset(&mut rng, &m);
                hb.reset(s, l);
                m.fill(s, l, false);
            }
            32 => {
                // Unaligned reset: the engine clears every intersecting granule.
                let s = pick_offset(&mut rng, &m);
                let l = pick_len(&mut rng, &m, s).min(m.size / 4 + 1);
                hb.reset(s, l);
                m.fill(s, l, false);
            }
            33 => {
                if chance(&mut rng, 30) {
                    hb.reset_all();
                    m.bits.fill(false);
                }
            }
            34..=37 => {
                let s = pick_offset(&mut rng, &m);
                assert_eq!(hb.get(s), m.get(s), "get {s} {}", ctx());
            }
            38..=49 => {
                let s = pick_offset(&mut rng, &m);
                let l = pick_len(&mut rng, &m, s);
                assert_eq!(
                    hb.next_dirty(s, l),
                    m.next(s, l, true),
                    "nd {s} {l} {}",
                    ctx()
                );
            }
            50..=61 => {
                let s = pick_offset(&mut rng, &m);
                let l = pick_len(&mut rng, &m, s);
                assert_eq!(
                    hb.next_zero(s, l),
                    m.next(s, l, false),
                    "nz {s} {l} {}",
                    ctx()
                );
            }
            62..=71 => {
                let s = pick_offset(&mut rng, &m);
                let e = s.saturating_add(pick_len(&mut rng, &m, s));
                let e = if chance(&mut rng, 20) {
                    pick_offset(&mut rng, &m)
                } else {
                    e
                };
                let max = match rng.below(6) {
                    0 => 1,
                    1 => 3,
                    2 => gran,
                    3 => gran * (1 + rng.below(70)),
                    4 => u64::MAX,
                    _ => rng.below(3 * gran) + 1,
                };
                if chance(&mut rng, 30) {
                    // The run iterator equals repeated next_dirty_area without a cap.
                    let runs: Vec<_> = hb.dirty_runs(s, e).collect();
                    let mut want = Vec::new();
                    let mut pos = s;
                    while let Some((a, len)) = m.area(pos, e, u64::MAX) {
                        want.push((a, len));
                        pos = a + len;
                    }
                    assert_eq!(runs, want, "runs {s} {e} {}", ctx());
                }
                let got = hb.next_dirty_area(s, e, max);
                assert_eq!(got, m.area(s, e, max), "area {s} {e} {max} {}", ctx());
                if let Some((a, len)) = got {
                    // Independent properties of the run.
                    assert!(len > 0 && len <= max && a >= s && a + len <= e.min(m.size));
                    assert!((a..a + len).step_by(gran as usize).all(|o| m.get(o)));
                    assert!(m.get(a + len - 1));
                }
            }
            72..=79 => {
                let s = pick_offset(&mut rng, &m);
                let l = pick_len(&mut rng, &m, s);
                let st = hb.status(s, l);
                assert_eq!(st, m.status(s, l), "status {s} {l} {}", ctx());
            }
            80..=84 => {
                // Finer sources at most 32 times finer, to keep the model small.
                let og = [g.saturating_sub(5), g.saturating_sub(1), g, g, g + 1, g + 7]
                    [rng.below(6) as usize];
                let (other, om) = random_bitmap(&mut rng, m.size, og);
                hb.merge_from(&other);
                m.merge(&om);
            }
            85..=86 => {
                let new_size = match rng.below(4) {
                    0 => m.size.saturating_sub(rng.below(3 * gran)),
                    1 => m.size + rng.below(3 * gran),
                    2 => rng.below(m.size + 1),
                    _ => rng.below(2 * m.size + 70 * gran),
                };
                let new_size = new_size.min((granules + 300) * gran);
                hb.truncate(new_size);
                m.truncate(new_size);
                check_invariants(&hb);
            }
            87..=89 => check_serialization(&mut rng, &hb, &m),
            90..=91 => {
                let expect = to_hex(&Sha256::digest(&m.hash_input()));
                assert_eq!(hb.sha256_hex(), expect, "{}", ctx());
            }
            _ => {
                // Dense fill of a random region, to exercise the `full` tower.
                let s = rng.below(m.size + 1);
                let l = rng.below(m.size - s + 1);
                hb.set(s, l);
                m.fill(s, l, true);
            }
        }
        assert_eq!(hb.dirty_granules(), m.dirty(), "count {}", ctx());
        if op % 16 == 0 {
            check_invariants(&hb);
            assert_same(&hb, &m);
        }
    }
    check_invariants(&hb);
    assert_same(&hb, &m);
}

#[test]
fn random_against_model() {
    let counts = [
        0u64, 1, 2, 3, 63, 64, 65, 100, 127, 128, 129, 1000, 4095, 4096, 4097, 5000,
    ];
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    for g in [0u32, 1, 4, 9, 16] {
        for &n in &counts {
            seed = seed.wrapping_add(0x1234_5678_9abc);
            let ops = if n > 1000 { 800 } else { 3000 };
            run_random(g, n, seed, ops);
        }
    }
}

/// Sizes spanning several chunks (production chunk size), every granularity class.
#[test]
fn random_against_model_across_chunks() {
    let mut seed: u64 = 0x5851_f42d_4c95_7f2d;
    for (g, granules, ops) in [
        (0u32, 2 * CHUNK_GRANULES + 1, 400),
        (9, 2 * CHUNK_GRANULES - 1, 400),
        (16, CHUNK_GRANULES, 300),
        (16, CHUNK_GRANULES + 1, 300),
        (31, 3 * CHUNK_GRANULES + 77, 300),
        (20, CHUNK_GRANULES + 64, 300),
    ] {
        seed = seed.wrapping_add(0x9e37_79b9);
        run_random(g, granules, seed, ops);
    }
}

/// Every granularity from 1 byte to 2 GiB, small sizes not a multiple of it.
#[test]
fn random_against_model_all_granularities() {
    let mut seed: u64 = 0x2545_f491;
    for g in 0..=31u32 {
        for n in [1u64, 65, 700] {
            seed = seed.wrapping_add(0x1234_5678_9abc);
            run_random(g, n, seed, 400);
        }
    }
}

/// A bitmap of the model's shape with `words` random non-zero words (mostly one or two
/// granules each): sparse chunks, some grown past SPARSE_MAX.
fn scattered(rng: &mut Rng, m: &Model, words: u64) -> (HBitmap, Model) {
    let mut hb = HBitmap::new(m.size, m.g);
    let mut om = Model::new(m.size, m.g);
    let n = m.bits.len() as u64;
    for _ in 0..words {
        let k = rng.below(n);
        let l = 1 + rng.below(3);
        hb.set(k << m.g, l << m.g);
        om.fill(k << m.g, l << m.g, true);
    }
    (hb, om)
}

/// Little-endian words of the model, words w0..w0 + n (zero past the end).
fn model_words(m: &Model, w0: u64, n: u64) -> Vec<u8> {
    let mut out = vec![0u8; (n * 8) as usize];
    for i in 0..n * 64 {
        let k = (w0 * 64 + i) as usize;
        if k < m.bits.len() && m.bits[k] {
            out[(i / 8) as usize] |= 1 << (i % 8);
        }
    }
    out
}

/// The sparse chunk state against the model: short sets and resets that move chunks
/// between clean, sparse and partial (both ways, across SPARSE_MAX and SPARSE_BACK), bulk
/// loads of scattered words (whole chunks and parts of chunks, into every state), merges
/// of sparse sources, contains_words, store, SHA-256, searches and runs, truncation.
#[test]
fn sparse_chunks_against_model() {
    let mut rng = Rng::new(0x005b_a75e);
    let (mut saw_sparse, mut saw_dense) = (false, false);
    for round in 0..12u64 {
        let g = [0u32, 9, 16][(round % 3) as usize];
        let granules =
            [3 * CHUNK_GRANULES + 77, 2 * CHUNK_GRANULES, 100, 5000][(round / 3 % 4) as usize];
        let size = (granules << g) - rng.below(1 << g);
        let mut hb = HBitmap::new(size, g);
        let mut m = Model::new(size, g);
        for op in 0..400 {
            let ctx = format!("round {round} op {op}");
            let n = m.bits.len() as u64;
            match rng.below(20) {
                0..=5 => {
                    // Scattered short sets, concentrated in one chunk so that it grows.
                    let c = rng.below(n / CHUNK_GRANULES + 1);
                    for _ in 0..rng.below(80) {
                        let k = c * CHUNK_GRANULES + rng.below(CHUNK_GRANULES);
                        let wide = chance(&mut rng, 10);
                        let l = 1 + rng.below(if wide { 300 } else { 3 });
                        hb.set(k << g, l << g);
                        m.fill(k << g, l << g, true);
                    }
                }
                6..=8 => {
                    // Short or chunk-wide resets (shrinking back to sparse).
                    for _ in 0..rng.below(40) {
                        let k = rng.below(n + 1);
                        let l = if chance(&mut rng, 20) {
                            rng.below(CHUNK_GRANULES)
                        } else {
                            1 + rng.below(200)
                        };
                        let (s, l) = ((k << g).min(m.size), l << g);
                        hb.reset(s, l);
                        m.fill(s, l, false);
                    }
                }
                9..=10 => {
                    // A bulk load of scattered words at a random word range.
                    let total = words_for(n);
                    let w0 = rng.below(total);
                    let nw = match rng.below(3) {
                        0 => 1 + rng.below(40),
                        1 => CHUNK_WORDS as u64 - w0 % CHUNK_WORDS as u64,
                        _ => 1 + rng.below(3 * CHUNK_WORDS as u64),
                    };
                    let k = rng.below(300);
                    let (_, src) = scattered(&mut rng, &m, k);
                    let mut bytes = model_words(&src, w0, nw);
                    if chance(&mut rng, 30) {
                        // Garbage past the end of the bitmap (masked off) and a dense word.
                        let l = bytes.len();
                        bytes[l - 8..].fill(0xff);
                    }
                    hb.load_words_le(w0, &bytes);
                    hb.deserialize_finish();
                    let mut want = m.clone();
                    for i in 0..(nw * 64) {
                        let k = (w0 * 64 + i) as usize;
                        if k < want.bits.len() {
                            want.bits[k] = (bytes[(i / 8) as usize] >> (i % 8)) & 1 != 0;
                        }
                    }
                    m = want;
                }
                11 => {
                    let k = rng.below(400);
                    let (other, om) = scattered(&mut rng, &m, k);
                    let w0 = rng.below(words_for(n) + 1);
                    let w1 = w0 + rng.below(3 * CHUNK_WORDS as u64);
                    let a = model_words(&om, w0, w1 - w0);
                    let b = model_words(&m, w0, w1 - w0);
                    let want = a.iter().zip(&b).all(|(x, y)| x & !y == 0);
                    assert_eq!(hb.contains_words(&other, w0, w1), want, "{ctx}");
                    assert!(other.contains_words(&other, w0, w1));
                    hb.merge_from(&other);
                    m.merge(&om);
                    assert!(hb.contains_words(&other, 0, u64::MAX), "{ctx}");
                }
                12 => {
                    let k = rng.below(n + 1) << g;
                    let l = pick_len(&mut rng, &m, k);
                    assert_eq!(hb.next_dirty(k, l), m.next(k, l, true), "{ctx}");
                    assert_eq!(hb.next_zero(k, l), m.next(k, l, false), "{ctx}");
                    assert_eq!(hb.status(k, l), m.status(k, l), "{ctx}");
                    assert_eq!(hb.get(k), m.get(k), "{ctx}");
                }
                13 => {
                    let s = rng.below(m.size + 1);
                    let e = s + rng.below(m.size + 1);
                    let runs: Vec<_> = hb.dirty_runs(s, e).collect();
                    let mut want = Vec::new();
                    let mut pos = s;
                    while let Some((a, len)) = m.area(pos, e, u64::MAX) {
                        want.push((a, len));
                        pos = a + len;
                    }
                    assert_eq!(runs, want, "{ctx}");
                }
                14 => {
                    let w0 = rng.below(words_for(n) + 2);
                    let nw = 1 + rng.below(3 * CHUNK_WORDS as u64);
                    let mut out = vec![0x5au8; (nw * 8) as usize];
                    hb.store_words_le(w0, &mut out);
                    assert_eq!(out, model_words(&m, w0, nw), "{ctx}");
                }
                15 => {
                    let expect = to_hex(&Sha256::digest(&m.hash_input()));
                    assert_eq!(hb.sha256_hex(), expect, "{ctx}");
                    check_serialization(&mut rng, &hb, &m);
                }
                16 => {
                    if chance(&mut rng, 30) {
                        let new_size = rng.below(2 * size + 1).max(1).min(4 * size);
                        hb.truncate(new_size);
                        m.truncate(new_size);
                    }
                }
                _ => {
                    // A sparse bitmap merged into a copy of this one, then swapped in.
                    let k = rng.below(200);
                    let (other, om) = scattered(&mut rng, &m, k);
                    let mut copy = other.clone();
                    copy.merge_from(&hb);
                    let mut cm = om.clone();
                    cm.merge(&m);
                    hb = copy;
                    m = cm;
                }
            }
            saw_sparse |= hb.sparse_chunks() > 0;
            saw_dense |= hb.allocated_chunks() > hb.sparse_chunks();
            assert_eq!(hb.dirty_granules(), m.dirty(), "count {ctx}");
            if op % 8 == 0 {
                check_invariants(&hb);
                assert_same(&hb, &m);
            }
        }
        check_invariants(&hb);
        assert_same(&hb, &m);
    }
    assert!(saw_sparse && saw_dense);
}

/// A whole chunk of all-ones bytes loads as a full chunk (no storage); one clear bit anywhere
/// in it, also between the first and last words that are all ones, keeps every other bit and
/// that bit clear.
#[test]
fn full_chunk_load_sees_every_clear_bit() {
    let g = 9;
    let size = (3 * CHUNK_GRANULES) << g;
    let chunk_bytes = CHUNK_WORDS * 8;
    let mut positions: Vec<usize> = vec![8, 9, 63, 64, 65, 127, 4095, 4096, chunk_bytes - 9];
    let mut rng = Rng::new(0xa11_0e5);
    positions.extend((0..40).map(|_| 8 + rng.below((chunk_bytes - 16) as u64) as usize));
    for &byte in &positions {
        for bit in [0u8, 5, 7] {
            let mut bytes = vec![0xffu8; 3 * chunk_bytes];
            bytes[chunk_bytes + byte] &= !(1 << bit);
            let mut hb = HBitmap::new(size, g);
            hb.load_words_le(0, &bytes);
            hb.deserialize_finish();
            check_invariants(&hb);
            let clear = (CHUNK_GRANULES + byte as u64 * 8 + u64::from(bit)) << g;
            assert_eq!(
                hb.dirty_granules(),
                3 * CHUNK_GRANULES - 1,
                "byte {byte} bit {bit}"
            );
            assert!(!hb.get(clear), "byte {byte} bit {bit}");
            assert!(hb.get(clear - (1 << g)) || clear == CHUNK_GRANULES << g);
            assert_eq!(
                hb.allocated_chunks(),
                1,
                "only the middle chunk has storage"
            );
            let mut out = vec![0u8; bytes.len()];
            hb.store_words_le(0, &mut out);
            assert_eq!(out, bytes);
        }
    }
}

/// load_words_le builds sparse chunks from scattered words without a partial chunk, and a
/// chunk goes partial past SPARSE_MAX words and back to sparse when cleared to a few bits.
#[test]
fn sparse_load_and_transitions() {
    let g = 16;
    let size = (4 * CHUNK_GRANULES) << g;
    let mut hb = HBitmap::new(size, g);
    let mut bytes = vec![0u8; 4 * CHUNK_WORDS * 8];
    for c in 0..4 {
        for j in 0..(10 * (c + 1)) {
            let w = c * CHUNK_WORDS + j * 7;
            bytes[w * 8] = 0x81;
        }
    }
    hb.load_words_le(0, &bytes);
    hb.deserialize_finish();
    check_invariants(&hb);
    assert_eq!(hb.sparse_chunks(), 4);
    assert_eq!(hb.allocated_chunks(), 4);
    assert_eq!(hb.dirty_granules(), 2 * (10 + 20 + 30 + 40));
    assert!(hb.heap_bytes() < 8 * 1024, "{}", hb.heap_bytes());
    let mut out = vec![0u8; bytes.len()];
    hb.store_words_le(0, &mut out);
    assert_eq!(out, bytes);
    // Grow chunk 0 past SPARSE_MAX words: partial.
    for w in 0..=SPARSE_MAX as u64 {
        hb.set((w * 64 + 1) << g, 1 << g);
    }
    check_invariants(&hb);
    assert_eq!(hb.sparse_chunks(), 3);
    assert_eq!(hb.allocated_chunks(), 4);
    // Clear it down to a few bits (words 118..=128): sparse again.
    hb.reset(0, ((SPARSE_MAX as u64 - 10) * 64) << g);
    check_invariants(&hb);
    assert_eq!(hb.sparse_chunks(), 4);
    // Clear everything: no storage, and the sparse table is freed.
    hb.reset(0, size);
    check_invariants(&hb);
    assert_eq!(hb.allocated_chunks(), 0);
    assert_eq!(hb.heap_bytes(), HBitmap::new(size, g).heap_bytes());
}

/// A flat reference built in the test: bytes of every word, for SHA-256 and serialization.
fn flat_bytes(hb: &HBitmap) -> Vec<u8> {
    let mut v = vec![0u8; (words_for(hb.granules()) * 8) as usize];
    for (s, len) in hb.dirty_runs(0, hb.size()) {
        let first = s >> hb.granularity_bits();
        let last = (s + len - 1) >> hb.granularity_bits();
        for k in first..=last {
            v[(k / 8) as usize] |= 1 << (k % 8);
        }
    }
    v
}

#[test]
fn chunk_states_memory_and_sha256() {
    // 5 chunks and a partial one at 64 KiB, the last word partial.
    let g = 16;
    let size = ((5 * CHUNK_GRANULES + 100) << g) - 1000;
    let mut hb = HBitmap::new(size, g);
    let empty = hb.heap_bytes();
    assert_eq!(hb.allocated_chunks(), 0);
    // Whole chunks dirty: no storage.
    hb.set(CHUNK_GRANULES << g, (2 * CHUNK_GRANULES) << g);
    assert_eq!(hb.allocated_chunks(), 0);
    assert_eq!(hb.heap_bytes(), empty);
    assert_eq!(hb.dirty_granules(), 2 * CHUNK_GRANULES);
    // Chunk boundaries ±1 granule.
    for k in [
        CHUNK_GRANULES - 1,
        3 * CHUNK_GRANULES,
        3 * CHUNK_GRANULES + 1,
        5 * CHUNK_GRANULES + 99,
    ] {
        hb.set(k << g, 1);
    }
    assert_eq!(hb.allocated_chunks(), 3);
    check_invariants(&hb);
    hb.reset((CHUNK_GRANULES + 5) << g, 1 << g);
    assert_eq!(hb.allocated_chunks(), 4);
    assert!(!hb.get((CHUNK_GRANULES + 5) << g));
    assert_eq!(
        hb.next_zero(CHUNK_GRANULES << g, u64::MAX),
        Some((CHUNK_GRANULES + 5) << g)
    );
    let runs: Vec<_> = hb.dirty_runs(0, u64::MAX).collect();
    assert_eq!(
        runs,
        vec![
            ((CHUNK_GRANULES - 1) << g, 6 << g),
            ((CHUNK_GRANULES + 6) << g, (2 * CHUNK_GRANULES + 2 - 6) << g),
            (
                (5 * CHUNK_GRANULES + 99) << g,
                size - ((5 * CHUNK_GRANULES + 99) << g)
            ),
        ]
    );
    let flat = flat_bytes(&hb);
    assert_eq!(hb.sha256_hex(), to_hex(&Sha256::digest(&flat)));
    let mut buf = vec![0u8; hb.serialization_size(0, size) as usize];
    hb.serialize_part(&mut buf, 0, size);
    assert_eq!(buf, flat);
    // Fully dirty, including the partial last chunk: no storage, hash of ones with the tail
    // word masked.
    hb.set(0, size);
    assert_eq!(hb.allocated_chunks(), 0);
    assert_eq!(hb.dirty_granules(), hb.granules());
    assert_eq!(hb.sha256_hex(), to_hex(&Sha256::digest(&flat_bytes(&hb))));
    check_invariants(&hb);
    // Emptying a chunk frees it.
    hb.reset_all();
    hb.set(7 << g, 1);
    assert_eq!(hb.allocated_chunks(), 1);
    hb.reset(7 << g, 1 << g);
    assert_eq!(hb.allocated_chunks(), 0);
    assert_eq!(hb.heap_bytes(), empty);
    // Truncating into a full chunk and growing again.
    hb.set(0, size);
    hb.truncate((CHUNK_GRANULES + 3) << g);
    assert_eq!(hb.dirty_granules(), CHUNK_GRANULES + 3);
    assert_eq!(hb.allocated_chunks(), 0);
    check_invariants(&hb);
    hb.truncate(size);
    assert_eq!(hb.dirty_granules(), CHUNK_GRANULES + 3);
    assert_eq!(hb.next_zero(0, u64::MAX), Some((CHUNK_GRANULES + 3) << g));
    assert_eq!(hb.allocated_chunks(), 1);
    check_invariants(&hb);
}

/// load_words_le against deserialize_part and the model, and store_words_le against
/// serialize_part: random word ranges (whole chunks, parts of chunks, across chunks, past
/// the end, with garbage bytes past the bitmap's end) into random (garbage) targets.
#[test]
fn bulk_words_against_deserialize_and_model() {
    let mut rng = Rng::new(0xb01c);
    let sizes = [
        1u64,
        64,
        100,
        CHUNK_GRANULES,
        2 * CHUNK_GRANULES,
        3 * CHUNK_GRANULES + 77,
        CHUNK_GRANULES + 64,
        5 * CHUNK_GRANULES - 1,
    ];
    for round in 0..120 {
        let g = [0u32, 3, 9, 16][round % 4];
        let granules = sizes[rng.below(sizes.len() as u64) as usize];
        let size = granules * (1 << g) - rng.below(1 << g);
        let (mut src, mut m) = random_bitmap(&mut rng, size, g);
        // Whole chunks full or clean too.
        for _ in 0..rng.below(3) {
            let c = rng.below(granules.div_ceil(CHUNK_GRANULES));
            let (s, l) = ((c * CHUNK_GRANULES) << g, CHUNK_GRANULES << g);
            let v = chance(&mut rng, 50);
            if v {
                src.set(s, l);
            } else {
                src.reset(s, l.min(size - s.min(size)));
            }
            m.fill(s, l.min(size.saturating_sub(s)), v);
        }
        assert_same(&src, &m);
        let total = words_for(src.granules());
        let mut flat = m.serialize(0, total * (64 << g));
        // Garbage past the end of the bitmap: must be masked off.
        if src.granules() % 64 != 0 {
            if let Some(last) = flat.last_mut() {
                *last |= 0x80;
            }
        }
        flat.extend_from_slice(&[0xffu8; 8 * 3]);
        let (mut a, _) = random_bitmap(&mut rng, size, g);
        let mut b = a.clone();
        let mut w = 0u64;
        while w < total {
            let n = match rng.below(4) {
                0 => CHUNK_WORDS as u64,
                1 => 1 + rng.below(70),
                2 => CHUNK_WORDS as u64 * (1 + rng.below(3)),
                _ => 1 + rng.below(3 * CHUNK_WORDS as u64),
            }
            .min(total + 3 - w);
            let bytes = &flat[(w * 8) as usize..((w + n) * 8) as usize];
            let extra = [&[0xa5u8][..], &[][..]][rng.below(2) as usize];
            let mut input = bytes.to_vec();
            input.extend_from_slice(extra);
            a.load_words_le(w, &input);
            b.deserialize_part(bytes, (w * 64) << g, (n * 64) << g);
            check_invariants(&a);
            assert_eq!(
                a.dirty_granules(),
                b.dirty_granules(),
                "round {round} w {w}"
            );
            assert_eq!(a.dirty, b.dirty, "round {round} w {w}");
            w += n;
        }
        a.deserialize_finish();
        b.deserialize_finish();
        assert_same(&a, &m);
        assert_eq!(flat_bytes(&a), flat_bytes(&b));
        // Clean chunks stay unallocated, full ones too.
        assert_eq!(
            a.allocated_chunks(),
            src.allocated_chunks(),
            "round {round}"
        );
        // store_words_le against serialize_part, random ranges incl. past the end.
        for _ in 0..8 {
            let w0 = rng.below(total + 2);
            let n = 1 + rng.below(3 * CHUNK_WORDS as u64);
            let mut x = vec![0x5au8; (n * 8) as usize + 5];
            let mut y = vec![0x5au8; (n * 8) as usize + 5];
            src.store_words_le(w0, &mut x);
            src.serialize_part(&mut y, (w0 * 64) << g, (n * 64) << g);
            assert_eq!(x, y, "round {round} w0 {w0} n {n}");
        }
    }
}

/// contains_words against the model: random pairs, random word ranges.
#[test]
fn contains_words_against_model() {
    let mut rng = Rng::new(0xc0de);
    for round in 0..200 {
        let g = [0u32, 9, 16][round % 3];
        let granules = [64u64, 100, CHUNK_GRANULES + 77, 3 * CHUNK_GRANULES][round % 4];
        let size = granules << g;
        let (mut a, mut ma) = random_bitmap(&mut rng, size, g);
        let (b, mb) = if chance(&mut rng, 30) {
            (a.clone(), Model { ..ma.clone() })
        } else {
            random_bitmap(&mut rng, size, g)
        };
        if chance(&mut rng, 30) {
            a.merge_from(&b);
            ma.merge(&mb);
        }
        let total = words_for(granules);
        for _ in 0..10 {
            let w0 = rng.below(total);
            let w1 = w0 + 1 + rng.below(2 * CHUNK_WORDS as u64);
            let expect = (w0 * 64..(w1 * 64).min(granules))
                .all(|k| !mb.bits[k as usize] || ma.bits[k as usize]);
            assert_eq!(a.contains_words(&b, w0, w1), expect, "round {round}");
        }
    }
}

#[test]
fn deserialize_keeps_clean_chunks_unallocated() {
    let g = 9;
    let size = (3 * CHUNK_GRANULES + 10) << g;
    let mut hb = HBitmap::new(size, g);
    let zeros = vec![0u8; hb.serialization_size(0, size) as usize];
    hb.deserialize_part(&zeros, 0, size);
    hb.deserialize_zeroes(0, size);
    assert_eq!(hb.allocated_chunks(), 0);
    // Ones over whole chunks: full state, no storage; then a partial word.
    hb.deserialize_ones(CHUNK_GRANULES << g, CHUNK_GRANULES << g);
    assert_eq!(hb.allocated_chunks(), 0);
    // Like QEMU, the count shows deserialized bits only after the finish.
    assert_eq!(hb.dirty_granules(), 0);
    assert!(hb.get(CHUNK_GRANULES << g));
    assert_eq!(hb.next_dirty(0, u64::MAX), Some(CHUNK_GRANULES << g));
    hb.deserialize_finish();
    assert_eq!(hb.dirty_granules(), CHUNK_GRANULES);
    let ones = vec![0xffu8; hb.serialization_size(0, size) as usize];
    hb.deserialize_part(&ones, 0, size);
    hb.deserialize_finish();
    assert_eq!(hb.allocated_chunks(), 0);
    assert_eq!(hb.dirty_granules(), hb.granules());
    check_invariants(&hb);
    // Round trip of a mixed bitmap in serialization-aligned pieces across chunk boundaries.
    let mut src = HBitmap::new(size, g);
    for k in [
        0,
        CHUNK_GRANULES - 1,
        CHUNK_GRANULES,
        2 * CHUNK_GRANULES + 63,
    ] {
        src.set(k << g, 2 << g);
    }
    src.set((2 * CHUNK_GRANULES + 200) << g, u64::MAX);
    let piece = src.serialization_align() * 100;
    let mut dst = HBitmap::new(size, g);
    dst.set(0, size);
    let mut start = 0;
    while start < size {
        let len = piece.min(size - start);
        let mut buf = vec![0u8; src.serialization_size(start, len) as usize];
        src.serialize_part(&mut buf, start, len);
        dst.deserialize_part(&buf, start, len);
        start += len;
    }
    dst.deserialize_finish();
    check_invariants(&dst);
    assert_eq!(flat_bytes(&dst), flat_bytes(&src));
    assert_eq!(dst.sha256_hex(), src.sha256_hex());
    assert_eq!(dst.dirty_granules(), src.dirty_granules());
}

/// Memory follows the dirt on a 16 TiB disk at 64 KiB granularity: behaviour, not timing.
#[test]
fn memory_follows_the_dirt() {
    let size = 16u64 << 40;
    let flat = (size >> 16 >> 3) as usize;
    let mut hb = HBitmap::new(size, 16);
    assert!(hb.heap_bytes() <= 64 << 10, "empty: {}", hb.heap_bytes());
    let mut rng = Rng::new(77);
    for _ in 0..20_000 {
        hb.set(rng.below((100u64 << 30) / 4096) * 4096, 4096);
    }
    assert!(hb.heap_bytes() <= 1 << 20, "100 GiB: {}", hb.heap_bytes());
    hb.set(0, size);
    assert!(
        hb.heap_bytes() * 100 <= flat * 105,
        "full: {}",
        hb.heap_bytes()
    );
    assert_eq!(hb.count(), size);
    // Dense but not full: flat size plus the summaries.
    let mut hb = HBitmap::new(1 << 40, 16);
    let flat = (1usize << 40 >> 16) / 8;
    for k in 0..(1u64 << 24) / 2 {
        hb.set((2 * k) << 16, 1);
    }
    assert!(
        hb.heap_bytes() * 100 <= flat * 105,
        "dense: {}",
        hb.heap_bytes()
    );
}

/// Memory follows the dirt that is left on a 64 TiB disk at 512 B (2^21 chunks): an empty
/// bitmap, one after 100 000 random 512-byte writes, after a reset of most of the disk and
/// after a clear. Behaviour, not timing.
#[test]
fn memory_is_given_back_when_the_dirt_goes() {
    let size = 64u64 << 40;
    let g = 9;
    let mut hb = HBitmap::new(size, g);
    let empty = hb.heap_bytes();
    // The towers' pages and summaries: a few bytes per 4096 chunks.
    assert!(empty <= 64 << 10, "empty: {empty}");
    let mut rng = Rng::new(0x64);
    for _ in 0..100_000 {
        hb.set(rng.below(size / 512) * 512, 512);
    }
    check_invariants(&hb);
    let dirty = hb.heap_bytes();
    // 100 000 sparse chunks of one word (a list of 16-byte entries each) and the table pages.
    assert!(dirty <= 40 << 20, "dirty: {dirty}");
    // A reset of all but the first 1 GiB: the chunks and table pages beyond it go.
    let kept = hb.next_dirty(0, 1 << 30).is_some();
    hb.reset(1 << 30, size - (1 << 30));
    check_invariants(&hb);
    assert!(
        hb.heap_bytes() <= empty + (64 << 10),
        "after reset: {} (empty {empty}, first GiB dirty: {kept})",
        hb.heap_bytes()
    );
    hb.set(0, size);
    assert_eq!(hb.heap_bytes(), empty, "full");
    hb.set(12345 * 512, 512);
    hb.reset(777 * 512, 512);
    hb.reset_all();
    check_invariants(&hb);
    assert_eq!(hb.heap_bytes(), empty, "after clear");
    assert!(hb.is_empty());
}

/// The paged towers against a flat model: several pages and a partial last one, random sets
/// and clears, whole pages filled and emptied; searches, bits, summaries and canonical pages.
#[test]
fn tower_pages_against_a_model() {
    let mut rng = Rng::new(0x70);
    for bits in [1usize, 63, 4096, 4097, 3 * 4096 + 77, 5 * 4096] {
        for ones in [false, true] {
            let mut t = Tower::new(bits, ones);
            let mut m = vec![ones; bits];
            for step in 0..4000 {
                match rng.below(10) {
                    0..=3 => {
                        let i = rng.below(bits as u64 + 2) as usize;
                        t.set(i);
                        if i < bits {
                            m[i] = true;
                        }
                    }
                    4..=7 => {
                        let i = rng.below(bits as u64 + 2) as usize;
                        t.clear(i);
                        if i < bits {
                            m[i] = false;
                        }
                    }
                    _ => {
                        // A whole page (or the rest of the vector) one way.
                        let p = rng.below(bits.div_ceil(4096) as u64) as usize * 4096;
                        let v = rng.below(2) == 0;
                        for (i, b) in m.iter_mut().enumerate().take(p + 4096).skip(p) {
                            if v {
                                t.set(i);
                            } else {
                                t.clear(i);
                            }
                            *b = v;
                        }
                    }
                }
                let pos = rng.below(bits as u64 + 1) as usize;
                let want = (pos..bits).find(|&i| m[i]);
                assert_eq!(t.find(pos), want, "bits {bits} ones {ones} step {step}");
                let i = rng.below(bits as u64) as usize;
                assert_eq!(t.get(i), m[i]);
            }
            let v = t.to_bits();
            for i in 0..bits {
                assert_eq!((v[i >> 6] >> (i & 63)) & 1 != 0, m[i]);
            }
            assert_eq!(
                Tower::from_bits(bits, &v).summary_levels(),
                t.summary_levels()
            );
            assert!(t.pages_canonical());
        }
    }
}

#[test]
fn merge_chunk_states() {
    let g = 12;
    let size = (4 * CHUNK_GRANULES - 3) << g;
    let mut a = HBitmap::new(size, g);
    let mut b = HBitmap::new(size, g);
    a.set(0, CHUNK_GRANULES << g); // chunk 0 full
    a.set((2 * CHUNK_GRANULES + 5) << g, 1); // chunk 2 partial
    b.set(10 << g, 1); // into a full chunk
    b.set((CHUNK_GRANULES + 1) << g, 1); // into a clean chunk (copied)
    b.set((2 * CHUNK_GRANULES) << g, CHUNK_GRANULES << g); // fills chunk 2
    b.set((3 * CHUNK_GRANULES) << g, u64::MAX); // the partial last chunk, full
    let mut want = flat_bytes(&a);
    for (x, y) in want.iter_mut().zip(flat_bytes(&b)) {
        *x |= y;
    }
    a.merge_from(&b);
    check_invariants(&a);
    assert_eq!(flat_bytes(&a), want);
    assert_eq!(a.allocated_chunks(), 1);
    assert_eq!(a.dirty_granules(), a.granules() - CHUNK_GRANULES + 1);
    // Across granularities.
    let mut coarse = HBitmap::new(size, g + 3);
    coarse.merge_from(&a);
    check_invariants(&coarse);
    assert_eq!(coarse.count(), (3 * CHUNK_GRANULES + 8) << g);
}

#[test]
fn empty_bitmap() {
    let mut hb = HBitmap::new(0, 16);
    assert_eq!(hb.granules(), 0);
    hb.set(0, 100);
    hb.set(0, u64::MAX);
    hb.reset(0, 100);
    assert!(hb.is_empty());
    assert!(!hb.get(0));
    assert_eq!(hb.next_dirty(0, 1), None);
    assert_eq!(hb.next_zero(0, 1), None);
    assert_eq!(hb.next_dirty_area(0, u64::MAX, u64::MAX), None);
    assert_eq!(hb.status(0, 10), (false, 0));
    assert_eq!(hb.serialization_size(0, 0), 0);
    hb.deserialize_ones(0, 1);
    hb.deserialize_finish();
    assert!(hb.is_empty());
    // QEMU hashes one zero word for an empty bitmap.
    assert_eq!(hb.sha256_hex(), to_hex(&Sha256::digest(&[0u8; 8])));
    check_invariants(&hb);
    hb.truncate(1 << 20);
    assert_eq!(hb.granules(), 16);
    hb.set(0, 1 << 20);
    assert_eq!(hb.count(), 1 << 20);
    hb.truncate(0);
    assert!(hb.is_empty());
    check_invariants(&hb);
}

#[test]
fn partial_last_granule() {
    // 3 granules of 512 bytes, the last one 100 bytes long.
    let size = 2 * 512 + 100;
    let mut hb = HBitmap::new(size, 9);
    assert_eq!(hb.granules(), 3);
    hb.set(size - 1, 1);
    assert!(hb.get(1024) && hb.get(size - 1) && !hb.get(size));
    assert_eq!(hb.count(), 512);
    assert_eq!(hb.next_dirty(0, u64::MAX), Some(1024));
    assert_eq!(hb.next_dirty(1100, 5), Some(1100));
    assert_eq!(hb.next_zero(1024, u64::MAX), None);
    assert_eq!(hb.next_dirty_area(0, u64::MAX, u64::MAX), Some((1024, 100)));
    assert_eq!(hb.status(1030, 1000), (true, size - 1030));
    hb.set(0, u64::MAX);
    assert_eq!(hb.dirty_granules(), 3);
    assert_eq!(hb.next_zero(0, u64::MAX), None);
    hb.reset(1024, 100);
    assert_eq!(hb.next_zero(0, u64::MAX), Some(1024));
    assert_eq!(hb.status(0, u64::MAX), (true, 1024));
    // Truncate into the middle of a granule keeps it; dropping whole granules clears them.
    hb.set(0, size);
    hb.truncate(600);
    assert_eq!(hb.dirty_granules(), 2);
    hb.truncate(size);
    assert_eq!(hb.dirty_granules(), 2);
    assert!(!hb.get(1024));
    check_invariants(&hb);
}

/// next_dirty, next_zero and status agree with the model around every mark (and a few
/// fixed places), crossing words and summary levels.
fn searches_match(hb: &HBitmap, m: &Model, marks: &[u64], n: u64) {
    for &k in marks.iter().chain(&[1, 65, 4000, 5000, 200_000]) {
        for s in [k.saturating_sub(1), k, k + 1] {
            let ctx = format!("n {n} s {s}");
            assert_eq!(
                hb.next_dirty(s, u64::MAX),
                m.next(s, u64::MAX, true),
                "{ctx}"
            );
            assert_eq!(
                hb.next_zero(s, u64::MAX),
                m.next(s, u64::MAX, false),
                "{ctx}"
            );
            assert_eq!(hb.status(s, u64::MAX), m.status(s, u64::MAX), "{ctx}");
        }
    }
}

#[test]
fn word_and_level_boundaries() {
    for n in [
        64u64, 65, 4095, 4096, 4097, 262_143, 262_144, 262_145, 300_000,
    ] {
        let mut hb = HBitmap::new(n, 0);
        let mut m = Model::new(n, 0);
        let marks: Vec<u64> = [0u64, 62, 63, 64, 4095, 4096, 4097, 262_143, 262_144, n - 1]
            .into_iter()
            .filter(|&k| k < n)
            .collect();
        // Single bits: searches must cross words and summary levels.
        for &k in &marks {
            hb.set(k, 1);
            m.fill(k, 1, true);
        }
        check_invariants(&hb);
        searches_match(&hb, &m, &marks, n);
        // Full bitmap with single holes.
        hb.set(0, n);
        m.fill(0, n, true);
        assert_eq!(hb.next_zero(0, u64::MAX), None);
        assert_eq!(hb.count(), n);
        check_invariants(&hb);
        for &k in &marks {
            hb.reset(k, 1);
            m.fill(k, 1, false);
        }
        check_invariants(&hb);
        searches_match(&hb, &m, &marks, n);
        // Dirty areas walk the whole bitmap in order.
        let mut pos = 0;
        let mut total = 0;
        while let Some((s, l)) = hb.next_dirty_area(pos, u64::MAX, 5000) {
            assert_eq!(Some((s, l)), m.area(pos, u64::MAX, 5000));
            total += l;
            pos = s + l;
        }
        assert_eq!(total, m.dirty());
        assert_same(&hb, &m);
        // Clearing everything in pieces empties every summary.
        hb.reset(0, n);
        assert!(hb.is_empty());
        check_invariants(&hb);
        assert_eq!(hb.next_dirty(0, u64::MAX), None);
    }
}

#[test]
fn deserialize_ones_masks_the_tail() {
    for (size, g) in [(100u64, 0u32), (65 * 512 + 7, 9), (64 << 16, 16), (1, 4)] {
        let mut hb = HBitmap::new(size, g);
        let align = hb.serialization_align();
        let mut start = 0;
        while start < size {
            let len = align.min(size - start);
            hb.deserialize_ones(start, len);
            start += len;
        }
        hb.deserialize_finish();
        check_invariants(&hb);
        assert_eq!(hb.dirty_granules(), hb.granules());
        assert_eq!(hb.next_zero(0, u64::MAX), None);
        let mut m = Model::new(size, g);
        m.bits.fill(true);
        assert_eq!(hb.sha256_hex(), to_hex(&Sha256::digest(&m.hash_input())));
        // deserialize_part masks too.
        let mut hb2 = HBitmap::new(size, g);
        let buf = vec![0xffu8; hb2.serialization_size(0, size) as usize];
        hb2.deserialize_part(&buf, 0, size);
        hb2.deserialize_finish();
        assert_eq!(hb2.dirty_granules(), hb2.granules());
        check_invariants(&hb2);
    }
}

#[test]
fn serialization_layout() {
    let mut hb = HBitmap::new(1 << 30, 16); // 16384 granules, 256 words
    hb.set(0, 1); // granule 0
    hb.set(9 << 16, 1); // granule 9
    hb.set(64 << 16, 1); // granule 64: first bit of the second word
    assert_eq!(hb.serialization_align(), 4 << 20);
    assert_eq!(hb.serialization_size(0, 1 << 30), 256 * 8);
    assert_eq!(hb.serialization_size(0, 1), 8);
    assert_eq!(hb.serialization_size(0, (64 << 16) + 1), 16);
    let mut buf = vec![0u8; 16];
    hb.serialize_part(&mut buf, 0, 128 << 16);
    assert_eq!(buf, [1, 2, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0]);
    // Unaligned start still works on the spanned words.
    let mut buf = vec![0u8; 8];
    hb.serialize_part(&mut buf, 65 << 16, 1);
    assert_eq!(buf, [1, 0, 0, 0, 0, 0, 0, 0]);
    // Spans past the end are written as zeros; a short buffer is not overrun.
    let mut buf = vec![0xeeu8; 24];
    hb.serialize_part(&mut buf, 255 << 22, 3 << 22);
    assert_eq!(buf, [0u8; 24]);
    let mut short = [0xeeu8; 5];
    hb.serialize_part(&mut short, 0, 1 << 30);
    assert_eq!(short, [0xee; 5]);
    hb.deserialize_part(&[1, 2, 3], 0, 1 << 30);
    hb.deserialize_finish();
    assert_eq!(hb.dirty_granules(), 3);
}

#[test]
fn sha256_known_contents() {
    // 64 MiB at 64 KiB: 1024 granules = 16 words = 128 zero bytes.
    let hb = HBitmap::new(64 << 20, 16);
    let zeros = to_hex(&Sha256::digest(&[0u8; 128]));
    assert_eq!(hb.sha256_hex(), zeros);
    // Cross-check that expectation with coreutils when available.
    if let Ok(out) = std::process::Command::new("sh")
        .args(["-c", "head -c 128 /dev/zero | sha256sum"])
        .output()
    {
        if out.status.success() {
            let text = String::from_utf8(out.stdout).unwrap();
            assert_eq!(text.split_whitespace().next(), Some(zeros.as_str()));
        }
    }
    // Granule 0 dirty: first byte 0x01.
    let mut hb = hb;
    hb.set(0, 1);
    let mut bytes = [0u8; 128];
    bytes[0] = 1;
    assert_eq!(hb.sha256_hex(), to_hex(&Sha256::digest(&bytes)));
    // Larger than one hashing chunk, with a partial last word.
    let mut hb = HBitmap::new((70_000 << 9) - 3, 9);
    hb.set(12345 << 9, 777 << 9);
    let mut m = Model::new((70_000 << 9) - 3, 9);
    m.fill(12345 << 9, 777 << 9, true);
    assert_eq!(hb.sha256_hex(), to_hex(&Sha256::digest(&m.hash_input())));
}

#[test]
fn merge_granularities() {
    let size = 10 << 16;
    let mut fine = HBitmap::new(size, 9);
    fine.set((3 << 16) + 512, 1);
    let mut coarse = HBitmap::new(size, 16);
    coarse.merge_from(&fine);
    assert_eq!(
        coarse.next_dirty_area(0, size, u64::MAX),
        Some((3 << 16, 1 << 16))
    );
    let mut fine2 = HBitmap::new(size, 9);
    fine2.merge_from(&coarse);
    assert_eq!(fine2.count(), 1 << 16);
    assert_eq!(fine2.next_dirty(0, size), Some(3 << 16));
    let mut same = HBitmap::new(size, 9);
    same.set(0, 1);
    same.merge_from(&fine2);
    assert_eq!(same.count(), (1 << 16) + 512);
    check_invariants(&same);
}

#[test]
fn hostile_inputs_do_not_panic() {
    let mut hb = HBitmap::new(1000, 4);
    for &(s, l) in &[
        (u64::MAX, u64::MAX),
        (999, u64::MAX),
        (0, u64::MAX),
        (1000, 1),
        (u64::MAX, 0),
    ] {
        hb.set(s, l);
        hb.get(s);
        hb.next_dirty(s, l);
        hb.next_zero(s, l);
        hb.next_dirty_area(s, l, l);
        hb.status(s, l);
        hb.serialization_size(s, l);
        let mut buf = [0u8; 64];
        hb.serialize_part(&mut buf, s, l);
        hb.deserialize_part(&buf, s, l);
        hb.deserialize_zeroes(s, l);
        hb.deserialize_ones(s, l);
        hb.reset(s, l);
    }
    // Operations between deserialize_* and finish (stale summaries) must not panic.
    hb.deserialize_ones(0, 1000);
    hb.set(5, 10);
    hb.reset(0, 16);
    hb.next_dirty(0, 1000);
    hb.next_zero(0, 1000);
    hb.deserialize_finish();
    check_invariants(&hb);
    // Granularity bits past the contract are clamped, and huge sizes are fine lazily.
    let big = HBitmap::new(u64::MAX, 63);
    assert_eq!(big.granules(), 2);
    let mut big = big;
    big.set(0, u64::MAX);
    assert_eq!(big.count(), u64::MAX);
    assert_eq!(big.serialization_align(), u64::MAX);
    let other = HBitmap::new(12345, 9);
    hb.merge_from(&other);
    let mut other = other;
    other.set(0, 12345);
    hb.merge_from(&other);
    check_invariants(&hb);
}

/// A fully dirty 16 TiB / 64 KiB bitmap (2^28 granules): scans from many starting points
/// find no clean granule and one dirty run to the end.
#[test]
fn next_zero_fast_on_full_bitmap() {
    let size = 16u64 << 40;
    let mut hb = HBitmap::new(size, 16);
    assert_eq!(hb.granules(), 1 << 28);
    hb.set(0, size);
    assert_eq!(hb.dirty_granules(), 1 << 28);
    for i in 0..1000u64 {
        assert_eq!(hb.next_zero(i << 16, u64::MAX), None);
        assert_eq!(
            hb.next_dirty_area(i << 30, size, u64::MAX),
            Some((i << 30, size - (i << 30)))
        );
    }
    hb.reset(size - (1 << 16), 1 << 16);
    assert_eq!(hb.next_zero(0, u64::MAX), Some(size - (1 << 16)));
    hb.reset_all();
    assert!(hb.is_empty());
    assert_eq!(hb.next_dirty(0, u64::MAX), None);
}

/// Walks that continue where their last search stopped (the search hints of sparse chunks),
/// several walkers at once, with changes between their steps: sets and resets around the
/// walkers (resets that remove entries before a hint shift the entries under it), clears,
/// merges, truncation, jumps back. Every answer equals the model's search from scratch. (A
/// hint used without its check skips or misplaces runs here.)
#[test]
fn hinted_walks_against_model() {
    let mut rng = Rng::new(0x0057_a1c5);
    for round in 0..6u64 {
        let g = [0u32, 9, 16][(round % 3) as usize];
        let granules = 4 * CHUNK_GRANULES + 77;
        let size = (granules << g) - rng.below(1 << g);
        let (mut hb, mut m) = scattered(&mut rng, &Model::new(size, g), 250);
        let gran = 1u64 << g;
        let mut walkers = [0u64; 3];
        let mut sparse_steps = 0u32;
        for op in 0..3000 {
            let w = rng.below(walkers.len() as u64) as usize;
            let pos = walkers[w];
            let ctx = format!("round {round} op {op} walker {w} at {pos}");
            let n = m.bits.len() as u64;
            // A granule around the walker (behind or ahead of it).
            let near = |rng: &mut Rng| ((pos >> g) + rng.below(300)).saturating_sub(200).min(n);
            match rng.below(100) {
                0..=39 => {
                    let max = if chance(&mut rng, 80) {
                        u64::MAX
                    } else {
                        gran * (1 + rng.below(4))
                    };
                    let got = hb.next_dirty_area(pos, u64::MAX, max);
                    assert_eq!(got, m.area(pos, u64::MAX, max), "area {max} {ctx}");
                    walkers[w] = got.map_or(0, |(a, l)| a + l);
                }
                40..=54 => {
                    // An iterator's step: the next dirty granule, then past it.
                    let got = hb.next_dirty(pos, u64::MAX);
                    assert_eq!(got, m.next(pos, u64::MAX, true), "next_dirty {ctx}");
                    walkers[w] = got.map_or(0, |a| ((a >> g) + 1) << g);
                }
                55..=61 => {
                    let got = hb.next_zero(pos, u64::MAX);
                    assert_eq!(got, m.next(pos, u64::MAX, false), "next_zero {ctx}");
                    walkers[w] = got.unwrap_or(0);
                }
                62..=65 => walkers[w] = rng.below(m.size + 1),
                66..=75 => {
                    let k = near(&mut rng);
                    let wide = chance(&mut rng, 10);
                    let l = 1 + rng.below(if wide { 200 } else { 3 });
                    hb.set(k << g, l << g);
                    m.fill(k << g, l << g, true);
                }
                76..=87 => {
                    let k = near(&mut rng);
                    let wide = chance(&mut rng, 20);
                    let l = 1 + rng.below(if wide { 400 } else { 64 });
                    hb.reset(k << g, l << g);
                    m.fill(k << g, l << g, false);
                }
                88..=90 => {
                    let (other, om) = scattered(&mut rng, &m, 40);
                    hb.merge_from(&other);
                    m.merge(&om);
                }
                91 => {
                    hb.reset_all();
                    m.bits.fill(false);
                }
                92..=93 => {
                    let new_size = (size / 2 + rng.below(size / 2 + 1)).max(1);
                    hb.truncate(new_size);
                    m.truncate(new_size);
                }
                _ => {
                    // Dirt back when resets and clears took most of it.
                    if hb.dirty_granules() < 150 {
                        let (other, om) = scattered(&mut rng, &m, 150);
                        hb.merge_from(&other);
                        m.merge(&om);
                    }
                }
            }
            sparse_steps += u32::from(hb.sparse_chunks() > 0);
            if op % 64 == 0 {
                assert_eq!(hb.dirty_granules(), m.dirty(), "count {ctx}");
            }
        }
        // The walks went mostly through sparse chunks (where the hints are).
        assert!(
            sparse_steps > 2400,
            "round {round}: {sparse_steps} steps with sparse chunks"
        );
        check_invariants(&hb);
        assert_same(&hb, &m);
    }
}
