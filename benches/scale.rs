//! Scale benchmark: costs that must not grow faster than the work asked for.
//! `cargo bench --bench scale` (plain main, no harness); optional section filter:
//! `cargo bench --bench scale -- bitmaps hook memory`.
//!
//! * bitmaps: 1 000 / 10 000 / 65 535 (QEMU's maximum) persistent bitmaps on a real qcow2 file,
//!   through the C ABI (what C and Python callers use): add all, walk the list, find each by
//!   name, remove all before any store, add all again and close (the first store), reopen,
//!   close unchanged, and removals of stored bitmaps. Each step should cost O(log n) or O(1)
//!   per bitmap, so the time of a whole pass grows about tenfold per tenfold of bitmaps: the
//!   table gives that growth factor (65 535 against 10 000 scaled to a tenfold).
//!   `QDIRTY_BENCH_SCALE_COUNTS=1000,10000` picks the counts.
//! * hook: one write over a whole 1 TiB disk with a 512-byte-granularity bitmap: the hook's
//!   time and the next call's (which absorbs the log and brings the bitmap up to date).
//! * memory: a transient 512-byte-granularity bitmap on a 64 TiB disk, 100 000 random 512-byte
//!   writes through the hook, then `clear`: resident memory (VmRSS) and the bitmap's own heap
//!   bytes after each step, in a child process per case.

use std::ffi::CString;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::ptr;
use std::time::{Duration, Instant};

use qdirty::ffi::{
    qdirty_bitmap_next, qdirty_image, qdirty_image_add_bitmap, qdirty_image_close,
    qdirty_image_find_bitmap, qdirty_image_first_bitmap, qdirty_image_open,
    qdirty_image_remove_bitmap, QDIRTY_BITMAP_PERSISTENT, QDIRTY_OPEN_RDWR,
};
use qdirty::Image;
use qdirty_testkit::bench;

const MIB: u64 = 1 << 20;
const TIB: u64 = 1 << 40;

/// Disk size of the bitmaps section: small, so that bitmap data is negligible (one 8-byte
/// table entry and no data cluster per bitmap).
const SCALE_DISK: u64 = 64 * MIB;
/// Granularity of the bitmaps section.
const SCALE_GRANULARITY: u32 = 64 << 10;
/// Stored bitmaps removed one by one in the bitmaps section (each removal rewrites the
/// directory, as QEMU's does).
const STORED_REMOVALS: usize = 100;
/// Runs per figure of the bitmaps section (the median is kept).
const SCALE_RUNS: usize = 3;

fn fmt_time(d: Duration) -> String {
    let ns = d.as_secs_f64() * 1e9;
    if ns < 1e3 {
        format!("{ns:.0} ns")
    } else if ns < 1e6 {
        format!("{:.1} µs", ns / 1e3)
    } else if ns < 1e9 {
        format!("{:.1} ms", ns / 1e6)
    } else {
        format!("{:.2} s", ns / 1e9)
    }
}

fn fmt_mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / MIB as f64)
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// Short names: the directory of 65 535 bitmaps must fit QEMU's 64 MiB limit (every name of
/// at most 8 bytes takes the minimum entry of 32 bytes: 2 MiB in all).
fn name(i: usize) -> CString {
    CString::new(i.to_string()).expect("no NUL")
}

fn c_path(p: &Path) -> CString {
    CString::new(p.to_str().expect("UTF-8 path")).expect("no NUL")
}

fn open(path: &Path) -> *mut qdirty_image {
    // SAFETY: a valid NUL-terminated path; NULL errp.
    let img =
        unsafe { qdirty_image_open(c_path(path).as_ptr(), QDIRTY_OPEN_RDWR, ptr::null_mut()) };
    assert!(!img.is_null(), "open {}", path.display());
    img
}

fn close(img: *mut qdirty_image) {
    // SAFETY: an open image, closed once.
    let r = unsafe { qdirty_image_close(img, ptr::null_mut()) };
    assert_eq!(r, 0, "close");
}

fn add_all(img: *mut qdirty_image, names: &[CString]) {
    for n in names {
        // SAFETY: an open image and a NUL-terminated name.
        let bm = unsafe {
            qdirty_image_add_bitmap(
                img,
                n.as_ptr(),
                SCALE_GRANULARITY,
                QDIRTY_BITMAP_PERSISTENT,
                ptr::null_mut(),
            )
        };
        assert!(!bm.is_null(), "add {n:?}");
    }
}

fn remove(img: *mut qdirty_image, n: &CString) {
    // SAFETY: an open image and a NUL-terminated name.
    let r = unsafe { qdirty_image_remove_bitmap(img, n.as_ptr(), ptr::null_mut()) };
    assert_eq!(r, 0, "remove {n:?}");
}

/// The timed steps of one pass over `n` bitmaps.
#[derive(Default, Clone)]
struct Pass {
    add: Duration,
    list: Duration,
    find: Duration,
    remove_unstored: Duration,
    first_close: Duration,
    reopen: Duration,
    close_unchanged: Duration,
    remove_stored: Duration,
}

const STEPS: [&str; 8] = [
    "add all (persistent, C ABI)",
    "walk the list (first/next)",
    "find each by name",
    "remove all (not stored yet)",
    "close: first store of all",
    "reopen read-write",
    "close unchanged",
    "remove one stored bitmap (directory rewritten)",
];

impl Pass {
    fn get(&self, k: usize) -> Duration {
        [
            self.add,
            self.list,
            self.find,
            self.remove_unstored,
            self.first_close,
            self.reopen,
            self.close_unchanged,
            self.remove_stored,
        ][k]
    }
}

fn pass(dir: &Path, n: usize, run: usize) -> Pass {
    let path = dir.join(format!("scale-{n}-{run}.qcow2"));
    let _ = std::fs::remove_file(&path);
    Image::create(&path, SCALE_DISK, 0).expect("create");
    let names: Vec<CString> = (0..n).map(name).collect();
    let mut p = Pass::default();

    let img = open(&path);
    let t = Instant::now();
    add_all(img, &names);
    p.add = t.elapsed();

    let t = Instant::now();
    // SAFETY: an open image; the handles it returns.
    let mut bm = unsafe { qdirty_image_first_bitmap(img) };
    let mut seen = 0;
    while !bm.is_null() {
        seen += 1;
        // SAFETY: a live bitmap handle.
        bm = unsafe { qdirty_bitmap_next(bm) };
    }
    p.list = t.elapsed();
    assert_eq!(seen, n);

    let t = Instant::now();
    for nm in &names {
        // SAFETY: an open image and a NUL-terminated name.
        assert!(!unsafe { qdirty_image_find_bitmap(img, nm.as_ptr()) }.is_null());
    }
    p.find = t.elapsed();

    let t = Instant::now();
    for nm in names.iter().rev() {
        remove(img, nm);
    }
    p.remove_unstored = t.elapsed();

    add_all(img, &names);
    let t = Instant::now();
    close(img);
    p.first_close = t.elapsed();

    let t = Instant::now();
    let img = open(&path);
    p.reopen = t.elapsed();
    let t = Instant::now();
    close(img);
    p.close_unchanged = t.elapsed();

    let img = open(&path);
    let k = STORED_REMOVALS.min(n);
    let t = Instant::now();
    for nm in names.iter().rev().take(k) {
        remove(img, nm);
    }
    p.remove_stored = t.elapsed() / k as u32;
    close(img);
    let _ = std::fs::remove_file(&path);
    p
}

/// Growth of `t` from `n0` to `n1` bitmaps, scaled to a tenfold: 10 for a linear cost, 100
/// for a quadratic one.
fn per_tenfold(t0: Duration, n0: usize, t1: Duration, n1: usize) -> f64 {
    let ratio = t1.as_secs_f64() / t0.as_secs_f64().max(1e-12);
    ratio.powf(1.0 / (n1 as f64 / n0 as f64).log10())
}

fn bench_bitmaps() {
    let counts: Vec<usize> = std::env::var("QDIRTY_BENCH_SCALE_COUNTS")
        .ok()
        .map(|s| {
            s.split(',')
                .map(|x| x.trim().parse().expect("count"))
                .collect()
        })
        .unwrap_or_else(|| vec![1000, 10_000, 65_535]);
    let dir =
        PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("scale-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("bench dir");
    println!(
        "## bitmaps: {} MiB disk, 64 KiB clusters, granularity {} KiB, median of {SCALE_RUNS}\n",
        SCALE_DISK / MIB,
        SCALE_GRANULARITY >> 10
    );
    let mut results: Vec<(usize, Pass)> = Vec::new();
    for &n in &counts {
        let runs: Vec<Pass> = (0..SCALE_RUNS).map(|r| pass(&dir, n, r)).collect();
        let mut m = Pass::default();
        let med = |k: usize| median(runs.iter().map(|p| p.get(k)).collect());
        m.add = med(0);
        m.list = med(1);
        m.find = med(2);
        m.remove_unstored = med(3);
        m.first_close = med(4);
        m.reopen = med(5);
        m.close_unchanged = med(6);
        m.remove_stored = med(7);
        eprintln!("{n} bitmaps done");
        results.push((n, m));
    }
    let _ = std::fs::remove_dir_all(&dir);

    let mut head = String::from("| Step |");
    let mut rule = String::from("|---|");
    for (n, _) in &results {
        head.push_str(&format!(" {n} |"));
        rule.push_str("---|");
    }
    for w in results.windows(2) {
        head.push_str(&format!(" growth {}→{} per tenfold |", w[0].0, w[1].0));
        rule.push_str("---|");
    }
    println!("{head}\n{rule}");
    for (k, step) in STEPS.iter().enumerate() {
        let mut row = format!("| {step} |");
        for (_, p) in &results {
            row.push_str(&format!(" {} |", fmt_time(p.get(k))));
        }
        for w in results.windows(2) {
            let g = per_tenfold(w[0].1.get(k), w[0].0, w[1].1.get(k), w[1].0);
            row.push_str(&format!(" {g:.1}× |"));
        }
        println!("{row}");
    }
    println!(
        "\n(\"remove one stored bitmap\": the mean of the first {STORED_REMOVALS} removals after a \
         reopen; the growth of a whole pass is per bitmap for the other rows, per removal here)\n"
    );
}

fn bench_hook() {
    println!("## hook: one write over a whole 1 TiB disk, 512-byte granularity\n");
    let size = TIB;
    let mut hook_t = Vec::new();
    let mut next_t = Vec::new();
    let mut memory = 0;
    for _ in 0..3 {
        let mut img = Image::new_memory(size);
        let id = img.bitmaps_mut().create(Some(b"b"), 512).expect("create");
        let hook = img.write_hook();
        let t = Instant::now();
        hook.set(0, size);
        hook_t.push(t.elapsed());
        memory = hook.memory();
        let t = Instant::now();
        let count = img.bitmap_current(id).expect("current").count();
        next_t.push(t.elapsed());
        assert_eq!(count, size);
    }
    println!("| Measure | Figure |\n|---|---|");
    println!(
        "| hook (`WriteLog::set(0, 1 TiB)`) | {} |",
        fmt_time(median(hook_t))
    );
    println!("| log memory after the hook | {} KiB |", memory >> 10);
    println!(
        "| next call (absorb + catch-up + count) | {} |\n",
        fmt_time(median(next_t))
    );
}

/// Resident memory of this process (VmRSS).
fn rss() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .expect("VmRSS")
        * 1024
}

/// The child side of the memory section: `every` > 0 makes a call (a count) after every
/// `every` writes, as a host that queries while the guest writes.
fn memory_child(every: u64) {
    let size = 64 * TIB;
    let mut img = Image::new_memory(size);
    let id = img.bitmaps_mut().create(Some(b"b"), 512).expect("create");
    let hook = img.write_hook();
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let t = Instant::now();
    for i in 0..100_000u64 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        hook.set((x % (size / 512)) * 512, 512);
        if every > 0 && i % every == every - 1 {
            img.bitmap_current(id).expect("current").count();
        }
    }
    let writes = t.elapsed();
    let after_writes = rss();
    let bm = img.bitmap_current(id).expect("current");
    assert!(bm.count() > 0);
    let heap_dirty = bm.memory();
    let after_count = rss();
    img.bitmap_mut(id).expect("bitmap").clear().expect("clear");
    let heap_clear = img.bitmap_current(id).expect("current").memory();
    let after_clear = rss();
    println!(
        "{} {} {} {} {} {}",
        writes.as_nanos(),
        after_writes,
        after_count,
        after_clear,
        heap_dirty,
        heap_clear
    );
}

fn bench_memory() {
    println!("## memory: 64 TiB disk, 512-byte granularity, 100 000 random 512-byte writes\n");
    println!("| Calls during the writes | writes | RSS after writes | RSS after the next call | RSS after clear | bitmap heap dirty / after clear |");
    println!("|---|---|---|---|---|---|");
    let exe = std::env::current_exe().expect("current exe");
    for every in [0u64, 100, 1] {
        let out = Command::new(&exe)
            .env("QDIRTY_BENCH_SCALE_MEMORY_CHILD", every.to_string())
            .output()
            .expect("child");
        assert!(
            out.status.success(),
            "child: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: Vec<u64> = String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .map(|x| x.parse().expect("number"))
            .collect();
        let what = match every {
            0 => "none (one call after)".to_string(),
            1 => "a count after every write".to_string(),
            e => format!("a count every {e} writes"),
        };
        println!(
            "| {what} | {} | {} | {} | {} | {} / {} KiB |",
            fmt_time(Duration::from_nanos(v[0])),
            fmt_mib(v[1]),
            fmt_mib(v[2]),
            fmt_mib(v[3]),
            fmt_mib(v[4]),
            v[5] >> 10
        );
    }
    println!();
}

fn main() {
    if let Ok(every) = std::env::var("QDIRTY_BENCH_SCALE_MEMORY_CHILD") {
        memory_child(every.parse().expect("cadence"));
        return;
    }
    let sections = bench::sections();
    let want = |s: &str| bench::wants(&sections, s);
    println!("{}\n", bench::banner("scale"));
    if want("bitmaps") {
        bench_bitmaps();
    }
    if want("hook") {
        bench_hook();
    }
    if want("memory") {
        bench_memory();
    }
}
