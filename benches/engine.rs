//! Benchmark of the in-memory bitmap engine (`HBitmap`) against flat `Vec<u64>` baselines doing
//! the same work in the same run. `cargo bench --bench engine` (plain main, no harness).
//!
//! Every figure is the median of several runs. Ratios (engine / baseline) are what to compare
//! across machines; absolute times depend on the machine and its load.

use std::hint::black_box;
use std::time::{Duration, Instant};

use qdirty::bitmap::sha256::Sha256;
use qdirty::bitmap::HBitmap;
use qdirty_testkit::Prng;

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
const TIB: u64 = 1 << 40;

/// Median wall time of `runs` calls of `f` (each call gets its run index).
fn median(runs: usize, mut f: impl FnMut(usize)) -> Duration {
    let mut times: Vec<Duration> = (0..runs)
        .map(|i| {
            let t = Instant::now();
            f(i);
            t.elapsed()
        })
        .collect();
    times.sort();
    times[runs / 2]
}

fn fmt_time(d: Duration) -> String {
    let ns = d.as_secs_f64() * 1e9;
    if ns < 1e3 {
        format!("{ns:.1} ns")
    } else if ns < 1e6 {
        format!("{:.2} µs", ns / 1e3)
    } else if ns < 1e9 {
        format!("{:.2} ms", ns / 1e6)
    } else {
        format!("{:.3} s", ns / 1e9)
    }
}

fn fmt_bytes(b: u64) -> String {
    if b < 10 * KIB {
        format!("{b} B")
    } else if b < 10 * MIB {
        format!("{:.1} KiB", b as f64 / KIB as f64)
    } else {
        format!("{:.1} MiB", b as f64 / MIB as f64)
    }
}

/// Rows of the result table.
struct Table(Vec<[String; 5]>);

impl Table {
    fn time(&mut self, what: &str, engine: Duration, base: Duration, target: &str) {
        let ratio = engine.as_secs_f64() / base.as_secs_f64().max(1e-12);
        self.0.push([
            what.into(),
            fmt_time(engine),
            fmt_time(base),
            format!("{ratio:.3}"),
            target.into(),
        ]);
        self.flush_last();
    }
    fn per_op(&mut self, what: &str, engine: Duration, base: Duration, ops: u64, target: &str) {
        let e = engine / ops as u32;
        let b = base / ops as u32;
        let ratio = engine.as_secs_f64() / base.as_secs_f64().max(1e-12);
        self.0.push([
            what.into(),
            format!("{} /op", fmt_time(e)),
            format!("{} /op", fmt_time(b)),
            format!("{ratio:.3}"),
            target.into(),
        ]);
        self.flush_last();
    }
    fn memory(&mut self, what: &str, engine: u64, flat: u64, target: &str) {
        self.0.push([
            what.into(),
            fmt_bytes(engine),
            fmt_bytes(flat),
            format!("{:.5}", engine as f64 / flat as f64),
            target.into(),
        ]);
        self.flush_last();
    }
    fn flush_last(&self) {
        if let Some(r) = self.0.last() {
            eprintln!("  {} | {} | {} | {} | {}", r[0], r[1], r[2], r[3], r[4]);
        }
    }
    fn print(&self) {
        println!();
        println!("| Case | Engine | Baseline (flat Vec<u64>) | Ratio | Target |");
        println!("|---|---|---|---|---|");
        for r in &self.0 {
            println!("| {} | {} | {} | {} | {} |", r[0], r[1], r[2], r[3], r[4]);
        }
    }
}

/// Flat baseline: a plain bit per granule.
struct Flat {
    words: Vec<u64>,
    gbits: u32,
}

impl Flat {
    fn new(size: u64, gbits: u32) -> Flat {
        let granules = size.div_ceil(1 << gbits);
        Flat {
            words: vec![0; granules.div_ceil(64).max(1) as usize],
            gbits,
        }
    }
    #[inline]
    fn set(&mut self, start: u64, bytes: u64) {
        let first = start >> self.gbits;
        let last = (start + bytes - 1) >> self.gbits;
        for k in first..=last {
            self.words[(k >> 6) as usize] |= 1 << (k & 63);
        }
    }
    fn popcount(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }
    /// Plain word scan for runs of set bits (`ones` true) or clear bits: (count, total bits).
    fn runs(&self, ones: bool) -> (u64, u64) {
        let flip = if ones { 0 } else { !0u64 };
        let (mut n, mut total) = (0u64, 0u64);
        let mut open: Option<u64> = None;
        for (i, &w) in self.words.iter().enumerate() {
            let w = w ^ flip;
            let base = (i as u64) << 6;
            if w == 0 {
                if let Some(s) = open.take() {
                    n += 1;
                    total += base - s;
                }
                continue;
            }
            if w == !0 {
                if open.is_none() {
                    open = Some(base);
                }
                continue;
            }
            let mut pos = 0u32;
            loop {
                if let Some(s) = open {
                    let x = !w & (!0u64 << pos);
                    if x == 0 {
                        break;
                    }
                    pos = x.trailing_zeros();
                    n += 1;
                    total += base + u64::from(pos) - s;
                    open = None;
                } else {
                    let x = w & (!0u64 << pos);
                    if x == 0 {
                        break;
                    }
                    pos = x.trailing_zeros();
                    open = Some(base + u64::from(pos));
                }
            }
        }
        if let Some(s) = open {
            n += 1;
            total += ((self.words.len() as u64) << 6) - s;
        }
        (n, total)
    }
    fn bytes(&self) -> u64 {
        self.words.len() as u64 * 8
    }
}

fn main() {
    // Optional filter: `cargo bench --bench engine -- merge sha` runs only those sections
    // (set, memory, runs, clean, merge).
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let want = |name: &str| args.is_empty() || args.iter().any(|a| a == name);
    let runs = 7;
    let mut t = Table(Vec::new());
    eprintln!("engine benchmark (median of {runs} runs unless noted)");

    // 1. Random 4 KiB writes over 1 TiB at 64 KiB granularity.
    if want("set") {
        let size = TIB;
        let ops = 1u64 << 20;
        let mut rng = Prng::new(1);
        let offs: Vec<u64> = (0..ops).map(|_| rng.below(size / 4096) * 4096).collect();
        let mut hb = HBitmap::new(size, 16);
        let mut flat = Flat::new(size, 16);
        let e = median(runs, |_| {
            for &o in &offs {
                hb.set(black_box(o), 4096);
            }
        });
        let b = median(runs, |_| {
            for &o in &offs {
                flat.set(black_box(o), 4096);
            }
        });
        assert_eq!(hb.dirty_granules(), flat.popcount());
        t.per_op(
            "set, random 4 KiB writes, 1 TiB @ 64 KiB (warm)",
            e,
            b,
            ops,
            "(write hook: ≤ 25 ns via C, other bench)",
        );
        t.memory(
            "memory after those writes (1 TiB @ 64 KiB)",
            hb.heap_bytes() as u64,
            flat.bytes(),
            "",
        );
        // First set of each chunk: allocation of its storage.
        let size = 16 * TIB;
        let chunks = size >> 16 >> 16;
        let e = median(runs, |_| {
            let mut hb = HBitmap::new(size, 16);
            for c in 0..chunks {
                hb.set(black_box(c << 32), 4096);
            }
            black_box(&hb);
        });
        let b = median(runs, |_| {
            let mut flat = Flat::new(size, 16);
            for c in 0..chunks {
                flat.set(black_box(c << 32), 4096);
            }
            black_box(&flat);
        });
        t.per_op(
            "first set in a clean chunk (allocates), 16 TiB @ 64 KiB, incl. new()",
            e,
            b,
            chunks,
            "(reported)",
        );
    }

    // 2. Memory targets on 16 TiB at 64 KiB.
    let size16 = 16 * TIB;
    let flat16 = size16 >> 16 >> 3;
    if want("memory") {
        let hb = HBitmap::new(size16, 16);
        t.memory(
            "memory, empty 16 TiB @ 64 KiB",
            hb.heap_bytes() as u64,
            flat16,
            "≤ 64 KiB",
        );
        let mut hb = HBitmap::new(size16, 16);
        let mut rng = Prng::new(2);
        for _ in 0..1_000_000 {
            hb.set(rng.below(100 * GIB / 4096) * 4096, 4096);
        }
        t.memory(
            "memory, 1 M random 4 KiB writes in the first 100 GiB of 16 TiB",
            hb.heap_bytes() as u64,
            flat16,
            "≤ 1 MiB",
        );
        let mut hb = HBitmap::new(size16, 16);
        hb.set(0, size16);
        t.memory(
            "memory, fully dirty 16 TiB @ 64 KiB",
            hb.heap_bytes() as u64,
            flat16,
            "≤ 1.05× flat",
        );
    }

    // 3. Dirty runs, 0.1% random granules of 16 TiB at 64 KiB; count.
    if want("runs") {
        let granules = size16 >> 16;
        let mut hb = HBitmap::new(size16, 16);
        let mut flat = Flat::new(size16, 16);
        let mut rng = Prng::new(3);
        for _ in 0..granules / 1000 {
            let k = rng.below(granules);
            hb.set(k << 16, 1);
            flat.set(k << 16, 1);
        }
        let (want_runs, want_bits) = flat.runs(true);
        let e = median(runs, |_| {
            let (mut n, mut total) = (0u64, 0u64);
            for (_, len) in hb.dirty_runs(0, size16) {
                n += 1;
                total += len;
            }
            assert_eq!((n, total), (want_runs, want_bits << 16));
        });
        let b = median(runs, |_| {
            black_box(flat.runs(true));
        });
        t.time(
            &format!("iterate dirty runs, 16 TiB @ 64 KiB, 0.1% random ({want_runs} runs)"),
            e,
            b,
            "≤ 10 ms",
        );
        let e = median(runs, |_| {
            let (mut n, mut pos) = (0u64, 0u64);
            while let Some((s, len)) = hb.next_dirty_area(pos, size16, u64::MAX) {
                n += 1;
                pos = s + len;
            }
            assert_eq!(n, want_runs);
        });
        t.time(
            "  same through next_dirty_area (QEMU-style loop)",
            e,
            b,
            "≤ 10 ms",
        );
        let reps = 1000u32;
        let e = median(runs, |_| {
            for _ in 0..reps {
                black_box(black_box(&hb).count());
            }
        }) / reps;
        let b = median(3, |_| {
            black_box(flat.popcount());
        });
        assert_eq!(hb.dirty_granules(), flat.popcount());
        t.time("count (16 TiB @ 64 KiB, 0.1%)", e, b, "O(1)");
        t.memory(
            "memory, 16 TiB @ 64 KiB with 0.1% random",
            hb.heap_bytes() as u64,
            flat.bytes(),
            "(reported)",
        );
    }

    // 4. Clean runs of a fully dirty 16 TiB bitmap.
    if want("clean") {
        let mut hb = HBitmap::new(size16, 16);
        hb.set(0, size16);
        let mut flat = Flat::new(size16, 16);
        flat.words.fill(!0);
        let e = median(runs, |_| {
            let (mut n, mut pos) = (0u64, 0u64);
            while let Some(z) = hb.next_zero(pos, u64::MAX) {
                n += 1;
                pos = hb.next_dirty(z, u64::MAX).unwrap_or(size16);
            }
            assert_eq!(n, 0);
        });
        let b = median(runs, |_| {
            assert_eq!(flat.runs(false).0, 0);
        });
        t.time(
            "iterate clean runs, fully dirty 16 TiB @ 64 KiB",
            e,
            b,
            "≤ 1 ms",
        );
        let reps = 1000u32;
        let e = median(runs, |_| {
            for _ in 0..reps {
                black_box(black_box(&hb).count());
            }
        }) / reps;
        let b = median(3, |_| {
            black_box(flat.popcount());
        });
        t.time("count (fully dirty 16 TiB @ 64 KiB)", e, b, "O(1)");
    }

    // 5. Merge and SHA-256 of 512 MiB bitmaps (2 TiB at 512 B), random dense contents.
    if want("merge") {
        let size = 2 * TIB;
        let mut rng = Prng::new(4);
        let mut fdst = Flat::new(size, 9);
        let mut fsrc = Flat::new(size, 9);
        for w in fdst.words.iter_mut() {
            *w = rng.next_u64() & rng.next_u64();
        }
        for w in fsrc.words.iter_mut() {
            *w = rng.next_u64() & rng.next_u64();
        }
        let to_bytes =
            |f: &Flat| -> Vec<u8> { f.words.iter().flat_map(|w| w.to_le_bytes()).collect() };
        let mut dst = HBitmap::new(size, 9);
        let mut src = HBitmap::new(size, 9);
        {
            let b = to_bytes(&fdst);
            dst.deserialize_part(&b, 0, size);
            let b = to_bytes(&fsrc);
            src.deserialize_part(&b, 0, size);
            dst.deserialize_finish();
            src.deserialize_finish();
        }
        let dst0 = dst.clone();
        let fdst0 = fdst.words.clone();
        let e = median(5, |_| {
            dst.merge_from(black_box(&src));
        });
        let b = median(5, |_| {
            for (d, s) in fdst.words.iter_mut().zip(black_box(&fsrc.words)) {
                *d |= *s;
            }
        });
        assert_eq!(dst.dirty_granules(), fdst.popcount());
        t.time(
            "merge 512 MiB into 512 MiB (2 TiB @ 512 B, random ~25% dense)",
            e,
            b,
            "≤ 2× baseline",
        );
        t.memory(
            "memory, 512 MiB random dense bitmap",
            dst.heap_bytes() as u64,
            fdst.bytes(),
            "(reported)",
        );
        drop(dst0);
        drop(fdst0);
        // A sparse source (1 dirty granule in 1000 words) into the dense destination.
        let mut sparse = HBitmap::new(size, 9);
        let mut fsparse = Flat::new(size, 9);
        for _ in 0..fsparse.words.len() / 1000 {
            let k = rng.below(size >> 9);
            sparse.set(k << 9, 1);
            fsparse.set(k << 9, 1);
        }
        let e = median(5, |_| {
            dst.merge_from(black_box(&sparse));
        });
        let b = median(5, |_| {
            for (d, s) in fdst.words.iter_mut().zip(black_box(&fsparse.words)) {
                *d |= *s;
            }
        });
        t.time(
            "merge sparse 512 MiB source (1 bit per 1000 words)",
            e,
            b,
            "(reported)",
        );

        let bytes = to_bytes(&fdst);
        let e = median(3, |_| {
            black_box(dst.sha256_hex());
        });
        let b = median(3, |_| {
            black_box(Sha256::digest(black_box(&bytes)));
        });
        assert_eq!(
            dst.sha256_hex(),
            qdirty::bitmap::sha256::to_hex(&Sha256::digest(&bytes))
        );
        t.time("SHA-256 of 512 MiB (dense)", e, b, "≤ 1.2× baseline");
        let secs = b.as_secs_f64();
        eprintln!(
            "  (our Sha256 alone: {:.0} MB/s over the flat bytes)",
            bytes.len() as f64 / secs / 1e6
        );
        drop(bytes);
        // Sparse: mostly clean chunks hashed from static zero blocks.
        let bytes = to_bytes(&fsparse);
        let e = median(3, |_| {
            black_box(sparse.sha256_hex());
        });
        let b = median(3, |_| {
            black_box(Sha256::digest(black_box(&bytes)));
        });
        t.time(
            "SHA-256 of 512 MiB (sparse, 1 bit per 1000 words)",
            e,
            b,
            "≤ 1.2× baseline",
        );
    }

    t.print();
}
