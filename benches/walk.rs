//! Walk benchmark: reading every dirty extent of a large, sparsely dirty bitmap through the C
//! ABI, against a naive scan of a flat bit array in the same run.
//! `cargo bench --bench walk` (plain main, no harness); optional filter of the walks:
//! `cargo bench --bench walk -- extents area zero iter python`.
//!
//! A standalone image of 16 TiB with one 64 KiB-granularity bitmap (2^28 granules), 0.1% of its
//! granules dirty at random positions (written through the lock-free hook,
//! `qdirty_image_set_dirty`). The same granules are set in a flat `Vec<u64>`. Each walk finds
//! every maximal dirty run; the median of `RUNS` walks is kept:
//!
//! * flat scan: every word of the flat array, runs joined across words (the naive reader);
//! * `qdirty_bitmap_dirty_extents` with a buffer of `EXTENTS_BUF` extents;
//! * `qdirty_bitmap_next_dirty_area` called again at the end of each run;
//! * `qdirty_bitmap_next_dirty` then `qdirty_bitmap_next_zero` per run;
//! * `qdirty_iter_next` per dirty granule.
//!
//! Every walk's runs are checked against the flat scan's (count, bytes, a checksum).
//!
//! Python section (filter `python`; `PYTHON` picks the interpreter, default `python3`): the
//! package's `Bitmap.dirty_extents()` over the same bitmap, rebuilt by benches/walk.py in a child
//! process (same granules, checked against this side's runs), against the C batch walk above and
//! a pure Python generator yielding as many tuples. The rounds alternate: one C walk here, then
//! one Python walk and one tuple loop there; medians of `RUNS` rounds. The figure is
//! (Python - tuples) / C: what the package adds to the C walk, beyond building the tuples any
//! Python iterator of runs builds, in C walks.

use std::hint::black_box;
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::ptr;
use std::time::{Duration, Instant};

use qdirty_testkit::bench;
use qdirty_testkit::clib::{lib_dir, root};

use qdirty::ffi::{
    qdirty_bitmap, qdirty_bitmap_dirty_extents, qdirty_bitmap_iter_new, qdirty_bitmap_next_dirty,
    qdirty_bitmap_next_dirty_area, qdirty_bitmap_next_zero, qdirty_extent, qdirty_image_add_bitmap,
    qdirty_image_close, qdirty_image_new_memory, qdirty_image_set_dirty, qdirty_iter_free,
    qdirty_iter_next,
};

const TIB: u64 = 1 << 40;
/// Disk size.
const SIZE: u64 = 16 * TIB;
/// Granularity of the bitmap.
const GRANULARITY: u64 = 64 << 10;
/// One granule in this many is dirty (0.1%).
const DIRTY_ONE_IN: u64 = 1000;
/// Extents per `qdirty_bitmap_dirty_extents` call.
const EXTENTS_BUF: usize = 1024;
/// Walks per figure (the median is kept); `QDIRTY_BENCH_WALK_RUNS` changes it (more walks for a
/// profile).
const RUNS: usize = 7;

/// What a walk found: the runs, their bytes and an order-sensitive checksum of their bounds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Found {
    runs: u64,
    bytes: u64,
    sum: u64,
}

impl Found {
    #[inline]
    fn add(&mut self, offset: u64, length: u64) {
        self.runs += 1;
        self.bytes += length;
        self.sum = self
            .sum
            .rotate_left(7)
            .wrapping_add(offset ^ length.wrapping_mul(0x9e37_79b9_7f4a_7c15));
    }
}

/// One timed walk: what it found and how many C calls it made.
struct Walk {
    found: Found,
    calls: u64,
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// The naive reader: every word of the flat array, runs joined across words.
fn flat_scan(words: &[u64]) -> Walk {
    let mut found = Found::default();
    let mut open: Option<(u64, u64)> = None;
    for (i, &x) in words.iter().enumerate() {
        let mut x = x;
        let base = (i as u64) << 6;
        while x != 0 {
            let s = x.trailing_zeros();
            let rest = !x & (!0u64 << s);
            let e = if rest == 0 { 64 } else { rest.trailing_zeros() };
            let (rs, re) = (base + u64::from(s), base + u64::from(e));
            open = match open {
                Some((os, oe)) if oe == rs => Some((os, re)),
                Some((os, oe)) => {
                    found.add(os * GRANULARITY, (oe - os) * GRANULARITY);
                    Some((rs, re))
                }
                None => Some((rs, re)),
            };
            x = if e == 64 { 0 } else { x & (!0u64 << e) };
        }
    }
    if let Some((os, oe)) = open {
        found.add(os * GRANULARITY, (oe - os) * GRANULARITY);
    }
    Walk {
        found,
        calls: words.len() as u64,
    }
}

fn walk_extents(bm: *mut qdirty_bitmap) -> Walk {
    let mut found = Found::default();
    let mut buf = vec![qdirty_extent::default(); EXTENTS_BUF];
    let mut start = 0u64;
    let mut calls = 0u64;
    loop {
        let mut n = 0usize;
        // SAFETY: a live bitmap, a buffer of EXTENTS_BUF extents, NULL errp.
        let r = unsafe {
            qdirty_bitmap_dirty_extents(
                bm,
                start,
                SIZE,
                buf.as_mut_ptr(),
                EXTENTS_BUF,
                &mut n,
                ptr::null_mut(),
            )
        };
        calls += 1;
        assert_eq!(r, 0, "dirty_extents");
        for e in &buf[..n] {
            found.add(e.offset, e.length);
        }
        if n < EXTENTS_BUF {
            break;
        }
        start = buf[n - 1].offset + buf[n - 1].length;
    }
    Walk { found, calls }
}

/// A run may come in pieces (a buffer boundary does not split runs, but a caller-side join is
/// kept for the per-call walks anyway): joins adjacent pieces into maximal runs.
struct Joiner {
    found: Found,
    open: Option<(u64, u64)>,
}

impl Joiner {
    fn new() -> Self {
        Joiner {
            found: Found::default(),
            open: None,
        }
    }
    #[inline]
    fn add(&mut self, s: u64, e: u64) {
        self.open = match self.open {
            Some((os, oe)) if oe == s => Some((os, e)),
            Some((os, oe)) => {
                self.found.add(os, oe - os);
                Some((s, e))
            }
            None => Some((s, e)),
        };
    }
    fn finish(mut self) -> Found {
        if let Some((os, oe)) = self.open {
            self.found.add(os, oe - os);
        }
        self.found
    }
}

fn walk_next_dirty_area(bm: *mut qdirty_bitmap) -> Walk {
    let mut j = Joiner::new();
    let mut start = 0u64;
    let mut calls = 0u64;
    loop {
        let (mut s, mut c) = (0u64, 0u64);
        // SAFETY: a live bitmap and two writable outputs.
        let found =
            unsafe { qdirty_bitmap_next_dirty_area(bm, start, SIZE, u64::MAX, &mut s, &mut c) };
        calls += 1;
        if !found {
            break;
        }
        j.add(s, s + c);
        start = s + c;
    }
    Walk {
        found: j.finish(),
        calls,
    }
}

fn walk_next_dirty_zero(bm: *mut qdirty_bitmap) -> Walk {
    let mut j = Joiner::new();
    let mut off = 0u64;
    let mut calls = 0u64;
    while off < SIZE {
        // SAFETY: a live bitmap.
        let d = unsafe { qdirty_bitmap_next_dirty(bm, off, SIZE - off) };
        calls += 1;
        if d < 0 {
            break;
        }
        let d = d as u64;
        // SAFETY: as above.
        let z = unsafe { qdirty_bitmap_next_zero(bm, d, SIZE - d) };
        calls += 1;
        let end = if z < 0 { SIZE } else { z as u64 };
        j.add(d, end);
        off = end;
    }
    Walk {
        found: j.finish(),
        calls,
    }
}

fn walk_iter(bm: *mut qdirty_bitmap) -> Walk {
    // SAFETY: a live bitmap, NULL errp.
    let it = unsafe { qdirty_bitmap_iter_new(bm, ptr::null_mut()) };
    assert!(!it.is_null(), "iter_new");
    let mut j = Joiner::new();
    let mut calls = 0u64;
    loop {
        // SAFETY: a live iterator whose image is open.
        let g = unsafe { qdirty_iter_next(it) };
        calls += 1;
        if g == -1 {
            break;
        }
        assert!(g >= 0, "iter_next: {g}");
        let g = g as u64;
        j.add(g, (g + GRANULARITY).min(SIZE));
    }
    // SAFETY: freed once, before the image is closed.
    unsafe { qdirty_iter_free(it) };
    Walk {
        found: j.finish(),
        calls,
    }
}

/// The section filter's name of each walk (`cargo bench --bench walk -- area iter`); the
/// flat scan always runs (the ratios are to it).
const WALK_KEYS: [&str; 5] = ["flat", "extents", "area", "zero", "iter"];

fn main() {
    let sections = bench::sections();
    let want = |s: &str| bench::wants(&sections, s);
    println!("{}\n", bench::banner("walk"));

    let granules = SIZE / GRANULARITY;
    // SAFETY: NULL errp.
    let img = unsafe { qdirty_image_new_memory(SIZE, ptr::null_mut()) };
    assert!(!img.is_null(), "new_memory");
    // SAFETY: an open image, a NUL-terminated name, NULL errp.
    let bm = unsafe {
        qdirty_image_add_bitmap(
            img,
            c"walk".as_ptr(),
            GRANULARITY as u32,
            0,
            ptr::null_mut(),
        )
    };
    assert!(!bm.is_null(), "add_bitmap");
    let mut flat = vec![0u64; (granules / 64) as usize];
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut dirty = 0u64;
    let target = granules / DIRTY_ONE_IN;
    while dirty < target {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let g = x % granules;
        let (w, b) = ((g >> 6) as usize, 1u64 << (g & 63));
        if flat[w] & b == 0 {
            flat[w] |= b;
            dirty += 1;
            // SAFETY: an open image.
            unsafe { qdirty_image_set_dirty(img, g * GRANULARITY, GRANULARITY) };
        }
    }

    // The reference, and a first walk of each kind to absorb the hook's writes and warm up.
    let reference = flat_scan(&flat).found;
    type WalkFn<'a> = Box<dyn Fn() -> Walk + 'a>;
    let walks: Vec<(&str, &str, WalkFn)> = vec![
        (
            "naive flat scan (Vec<u64> word scan)",
            "word",
            Box::new(|| flat_scan(black_box(&flat))),
        ),
        (
            "`qdirty_bitmap_dirty_extents` (1,024-extent buffer)",
            "call",
            Box::new(|| walk_extents(bm)),
        ),
        (
            "`qdirty_bitmap_next_dirty_area` loop",
            "call",
            Box::new(|| walk_next_dirty_area(bm)),
        ),
        (
            "`qdirty_bitmap_next_dirty` + `qdirty_bitmap_next_zero` loop",
            "call",
            Box::new(|| walk_next_dirty_zero(bm)),
        ),
        (
            "`qdirty_iter_next` per dirty granule",
            "call",
            Box::new(|| walk_iter(bm)),
        ),
    ];
    let runs = std::env::var("QDIRTY_BENCH_WALK_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(RUNS);
    println!(
        "16 TiB standalone image, 64 KiB granularity ({granules} granules), {dirty} dirty granules \
         at random ({} runs); median of {runs} walks\n",
        reference.runs
    );
    let mut results = Vec::new();
    for (k, (name, unit, f)) in walks.iter().enumerate() {
        if k > 0 && !want(WALK_KEYS[k]) {
            continue;
        }
        let first = f();
        assert_eq!(first.found, reference, "{name}: first walk");
        let mut times = Vec::with_capacity(runs);
        let mut calls = 0;
        for _ in 0..runs {
            let t = Instant::now();
            let w = black_box(f());
            times.push(t.elapsed());
            assert_eq!(w.found, reference, "{name}");
            calls = w.calls;
        }
        results.push((*name, *unit, median(times), calls));
    }
    let flat_t = results[0].2;
    println!("| Walk | ms per walk | calls (or words) per walk | ns per call | vs flat scan |");
    println!("|---|---|---|---|---|");
    for (name, unit, t, calls) in &results {
        println!(
            "| {name} | {:.2} | {calls} {unit}s | {:.1} | {:.2}× |",
            t.as_secs_f64() * 1e3,
            t.as_secs_f64() * 1e9 / *calls as f64,
            t.as_secs_f64() / flat_t.as_secs_f64()
        );
    }
    println!();
    if want("python") {
        python_walks(bm, reference, runs);
    }
    // SAFETY: an open image, closed once (no iterator left).
    let r = unsafe { qdirty_image_close(img, ptr::null_mut()) };
    assert_eq!(r, 0, "close");
}

/// The Python section: benches/walk.py in a child process, rounds alternating with C walks.
fn python_walks(bm: *mut qdirty_bitmap, reference: Found, runs: usize) {
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    let spawned = Command::new(&python)
        .arg(root().join("benches/walk.py"))
        .args(
            [
                SIZE,
                GRANULARITY,
                DIRTY_ONE_IN,
                reference.runs,
                reference.bytes,
                reference.sum,
            ]
            .map(|v| v.to_string()),
        )
        .env("QDIRTY_LIB", lib_dir().join("libqdirty.so"))
        .env("PYTHONPATH", root().join("python"))
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn();
    let mut child = match spawned {
        Ok(c) => c,
        Err(e) => {
            println!("Python section skipped: cannot run {python} ({e}); set PYTHON\n");
            return;
        }
    };
    let mut to = child.stdin.take().unwrap();
    let mut from = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    from.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "ready", "benches/walk.py did not start");
    let (mut c, mut py, mut tuples) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..runs {
        let t = Instant::now();
        let w = black_box(walk_extents(bm));
        c.push(t.elapsed());
        assert_eq!(w.found, reference, "C walk");
        writeln!(to, "walk").unwrap();
        to.flush().unwrap();
        line.clear();
        from.read_line(&mut line).unwrap();
        let ns: Vec<u64> = line
            .split_whitespace()
            .map(|v| v.parse().unwrap())
            .collect();
        assert_eq!(ns.len(), 2, "benches/walk.py answered {line:?}");
        py.push(Duration::from_nanos(ns[0]));
        tuples.push(Duration::from_nanos(ns[1]));
    }
    drop(to);
    assert!(child.wait().unwrap().success(), "benches/walk.py failed");
    let (c, py, tuples) = (median(c), median(py), median(tuples));
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let per_run = |d: Duration| d.as_secs_f64() * 1e9 / reference.runs as f64;
    println!("Python (`{python}`), rounds alternating with the C walk; median of {runs} rounds\n");
    println!("| Walk | ms per walk | ns per run |");
    println!("|---|---|---|");
    for (name, t) in [
        (
            "`qdirty_bitmap_dirty_extents` from Rust (1,024-extent buffer)",
            c,
        ),
        (
            "Python `Bitmap.dirty_extents()` (default batch of 1,024)",
            py,
        ),
        (
            "pure Python generator of as many `(offset, length)` tuples",
            tuples,
        ),
    ] {
        println!("| {name} | {:.2} | {:.1} |", ms(t), per_run(t));
    }
    println!(
        "\n(Python - tuples) / C = {:.2} (Python / C = {:.1})\n",
        (py.as_secs_f64() - tuples.as_secs_f64()) / c.as_secs_f64(),
        py.as_secs_f64() / c.as_secs_f64()
    );
}
