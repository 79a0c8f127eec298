//! Write-hook benchmark (not a test): `cargo bench --bench write_hook`.
//!
//! 1. The C benchmark benches/c/write_hook.c, compiled here against include/qdirty.h and the
//!    libqdirty.so of this build (the bench profile: release, as installed), -O2, run with 1
//!    and with 1000 enabled bitmaps: ns per `qdirty_image_set_dirty` call (random 4 KiB writes
//!    over 1 TiB, 64 KiB granularity), the fold that applies them, 2 threads vs 1, and, in the
//!    same process, interleaved round by round, two C baselines for one bitmap: a flat array
//!    with an atomic fetch_or per write (the floor for a lock-free hook) and a flat array
//!    behind a mutex. Figures are medians over rounds; the ratios are per round, then median.
//!    Then the steady state with management calls: the same writes on 1 thread with a
//!    `qdirty_bitmap_count` after every K writes, K calibrated to 1 ms and to 10 ms of the
//!    mutex baseline's writes, against the baselines with the same cadence (their call: the
//!    mutex taken and released; one atomic load), the calls timed apart; and with the calls
//!    made by a second thread every 1 ms and 10 ms of wall time.
//! 2. The same through the Rust API ([`Image::write_hook`]), with a `Mutex<Vec<u64>>` baseline.
//! 3. Memory of the write log ([`WriteLog::memory`](qdirty::bitmap::WriteLog::memory)):
//!    16 000 random 4 KiB writes over 1 TiB with one enabled bitmap at 512 B, 4 KiB and 64 KiB
//!    granularity, while logging and after the next call (which absorbs the log), through the
//!    Rust API (the C ABI's hook is the same log). Deterministic: no timing.
//! 4. QEMU: `qemu-io -t unsafe` doing the same number of random `write -z OFF 4k` on a 1 TiB
//!    qcow2 image with 0 and with 1000 enabled persistent bitmaps, CPU time (user + sys of the
//!    child) of the writes: each run ends with `sigraise 9` (no store on close) and the same run
//!    without writes is subtracted. Skipped when qemu-io/qemu-img are missing.
//!
//! Environment: QDIRTY_BENCH_WRITES (1-bitmap writes per thread, default 4000000),
//! QDIRTY_BENCH_WRITES_1000 (default 100000), QDIRTY_BENCH_ROUNDS (C rounds, default 7),
//! QDIRTY_BENCH_QEMU_WRITES (default 20000), QDIRTY_BENCH_NO_QEMU=1 skips QEMU.

use clib::{lib_dir, root};
use qdirty_testkit::clib;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::Instant;

use qdirty::image::AddOptions;
use qdirty::Image;

const DISK: u64 = 1 << 40;
const GRAN: u64 = 65536;
const WRITE: u64 = 4096;

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// `n` random 4 KiB-aligned write offsets: the generator of benches/c/write_hook.c, so that the C
/// and the Rust measurements write the same offsets for the same seed.
fn offsets(n: u64, seed: u64) -> Vec<u64> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % (DISK / WRITE)) * WRITE
        })
        .collect()
}

/// Compiles the C benchmark; returns the executable.
fn build_c() -> PathBuf {
    let libdir = lib_dir();
    let exe = libdir.join(format!("qdirty_bench_write_hook-{}", std::process::id()));
    let tool = clib::compiler_with(false, 2);
    let out = tool
        .to_command()
        .args(["-std=c11", "-Wall", "-Wextra", "-Werror", "-pthread"])
        .arg("-I")
        .arg(root().join("include"))
        .arg(root().join("benches/c/write_hook.c"))
        .arg("-o")
        .arg(&exe)
        .arg(format!("-L{}", libdir.display()))
        .arg("-lqdirty")
        .arg(format!("-Wl,-rpath,{}", libdir.display()))
        .arg("-Wl,--disable-new-dtags")
        .output()
        .expect("C compiler");
    assert!(
        out.status.success(),
        "compiling benches/c/write_hook.c failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The soname libqdirty.so.N must resolve to this build's library.
    if let Ok(o) = Command::new("readelf")
        .arg("-d")
        .arg(libdir.join("libqdirty.so"))
        .output()
    {
        let d = String::from_utf8_lossy(&o.stdout);
        if let Some(l) = d.lines().find(|l| l.contains("(SONAME)")) {
            if let (Some(a), Some(b)) = (l.find('['), l.rfind(']')) {
                let so = &l[a + 1..b];
                if so != "libqdirty.so" {
                    let tmp = libdir.join(format!("{so}.tmp-{}", std::process::id()));
                    let _ = std::fs::remove_file(&tmp);
                    std::os::unix::fs::symlink("libqdirty.so", &tmp).unwrap();
                    std::fs::rename(&tmp, libdir.join(so)).unwrap();
                }
            }
        }
    }
    exe
}

/// Runs the C benchmark; returns its "key value" lines.
fn run_c(exe: &Path, bitmaps: u32, writes: u64, rounds: u64) -> Vec<(String, String)> {
    let out = Command::new(exe)
        .arg(bitmaps.to_string())
        .arg(writes.to_string())
        .arg(rounds.to_string())
        .output()
        .expect("run the C benchmark");
    assert!(
        out.status.success(),
        "C benchmark failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_once(' '))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

fn get(kv: &[(String, String)], key: &str) -> f64 {
    kv.iter()
        .find(|(k, _)| k == key)
        .and_then(|(_, v)| v.split(' ').next()?.parse().ok())
        .unwrap_or(f64::NAN)
}

/// Rust API: ns per hook call and per write of the fold.
fn rust_hook(bitmaps: u32, n: u64) -> (f64, f64) {
    let mut img = Image::new_memory(DISK);
    for i in 0..bitmaps {
        img.add_bitmap(format!("b{i}").as_bytes(), GRAN, AddOptions::default())
            .unwrap();
    }
    let hook = img.write_hook();
    for &o in &offsets(n, 3) {
        hook.set(o, WRITE);
    }
    img.fold_writes();
    let offs = offsets(n, 1);
    let t = Instant::now();
    for &o in &offs {
        hook.set(std::hint::black_box(o), WRITE);
    }
    let hook_ns = t.elapsed().as_nanos() as f64 / n as f64;
    let t = Instant::now();
    img.fold_writes();
    let fold_ns = t.elapsed().as_nanos() as f64 / n as f64;
    (hook_ns, fold_ns)
}

/// Writes of the log-memory figures.
const MEMORY_WRITES: u64 = 16_000;

/// Log memory with one bitmap at `granularity` after [`MEMORY_WRITES`] random 4 KiB writes
/// over 1 TiB, and after the next call absorbs them.
fn log_memory(granularity: u64) -> (usize, usize) {
    let mut img = Image::new_memory(DISK);
    img.add_bitmap(b"m", granularity, AddOptions::default())
        .unwrap();
    let hook = img.write_hook();
    for o in offsets(MEMORY_WRITES, 5) {
        hook.set(o, WRITE);
    }
    let logging = hook.memory();
    img.fold_writes();
    (logging, hook.memory())
}

/// Baseline: a flat Vec<u64> behind a Mutex, same sets for one bitmap.
fn baseline_mutex(n: u64) -> f64 {
    let flat = Mutex::new(vec![0u64; (DISK / GRAN / 64) as usize]);
    let set = |o: u64| {
        let mut f = flat.lock().unwrap();
        for g in o / GRAN..=(o + WRITE - 1) / GRAN {
            f[(g / 64) as usize] |= 1 << (g % 64);
        }
    };
    offsets(n, 3).into_iter().for_each(set);
    let offs = offsets(n, 1);
    let t = Instant::now();
    for &o in &offs {
        set(std::hint::black_box(o));
    }
    t.elapsed().as_nanos() as f64 / n as f64
}

/// User + sys CPU seconds of the terminated children so far.
fn children_cpu() -> f64 {
    // SAFETY: getrusage only writes the struct it is given.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// CPU seconds of one qemu-io run doing `writes` random write -z, killed at the end.
fn qemu_io_cpu(image: &Path, writes: u64) -> f64 {
    let mut script = String::new();
    for o in offsets(writes, 1) {
        script.push_str(&format!("write -z {o} 4k\n"));
    }
    script.push_str("sigraise 9\n");
    let before = children_cpu();
    let mut child = Command::new("qemu-io")
        .args(["-t", "unsafe", "-f", "qcow2"])
        .arg(image)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("qemu-io");
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        let _ = stdin.write_all(script.as_bytes());
    }
    let _ = child.wait();
    children_cpu() - before
}

/// QEMU's CPU per write with 1000 enabled persistent bitmaps minus with 0, in ns.
fn qemu(writes: u64) -> Option<(f64, f64)> {
    let dir = std::env::temp_dir().join(format!("qdirty-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).ok()?;
    let mut per_write = Vec::new();
    for bitmaps in [0u32, 1000] {
        let img = dir.join(format!("b{bitmaps}.qcow2"));
        let ok = Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&img)
            .arg("1T")
            .status()
            .ok()?
            .success();
        if !ok {
            return None;
        }
        let mut image = Image::open(&img, true).ok()?;
        let opts = AddOptions {
            persistent: true,
            ..AddOptions::default()
        };
        for i in 0..bitmaps {
            image
                .add_bitmap(format!("b{i}").as_bytes(), GRAN, opts)
                .ok()?;
        }
        image.close().ok()?;
        // Each run is killed with the bitmaps marked in_use: run on a fresh copy, else the
        // next open would load them inconsistent (not recording).
        let run = dir.join("run.qcow2");
        std::fs::copy(&img, &run).ok()?;
        let idle = qemu_io_cpu(&run, 0);
        std::fs::copy(&img, &run).ok()?;
        let busy = qemu_io_cpu(&run, writes);
        let ns = (busy - idle) * 1e9 / writes as f64;
        println!("  qemu-io, {bitmaps:>4} enabled persistent bitmaps: {ns:>10.0} ns CPU per write (open: {idle:.2} s)");
        per_write.push(ns);
    }
    let _ = std::fs::remove_dir_all(&dir);
    Some((per_write[0], per_write[1]))
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let n1 = env_u64("QDIRTY_BENCH_WRITES", 4_000_000);
    let n1000 = env_u64("QDIRTY_BENCH_WRITES_1000", 100_000);
    let qn = env_u64("QDIRTY_BENCH_QEMU_WRITES", 20_000);
    let rounds = env_u64("QDIRTY_BENCH_ROUNDS", 7);

    println!(
        "write log memory: {MEMORY_WRITES} random 4 KiB writes over 1 TiB, one enabled bitmap"
    );
    let mib = |b: usize| b as f64 / (1 << 20) as f64;
    let mut memory_512 = (0, 0);
    for g in [512u64, 4096, 65536] {
        let (logging, after) = log_memory(g);
        println!(
            "  granularity {g:>5} B: {:>7.2} MiB while logging, {:>7.3} MiB after the next call",
            mib(logging),
            mib(after)
        );
        if g == 512 {
            memory_512 = (logging, after);
        }
    }

    println!("write hook: random 4 KiB writes over 1 TiB, 64 KiB granularity");
    let exe = build_c();
    let c1 = run_c(&exe, 1, n1, rounds);
    // Each round with 1000 bitmaps folds for seconds: fewer rounds.
    let c1000 = run_c(&exe, 1000, n1000, rounds.min(3));
    let _ = std::fs::remove_file(&exe);
    println!("C ABI (qdirty_image_set_dirty), {n1} writes per thread, 1 enabled bitmap:");
    for (k, v) in &c1 {
        println!("  {k} {v}");
    }
    println!("C ABI, {n1000} writes per thread, 1000 enabled bitmaps:");
    for (k, v) in c1000.iter().filter(|(k, _)| !k.ends_with("_rounds")) {
        println!("  {k} {v}");
    }

    let (h1, f1) = rust_hook(1, n1);
    let (h1000, f1000) = rust_hook(1000, n1000);
    let base = baseline_mutex(n1);
    println!("Rust API (Image::write_hook):");
    println!("  1 bitmap:     hook {h1:.2} ns/call, fold {f1:.2} ns/write");
    println!("  1000 bitmaps: hook {h1000:.2} ns/call, fold {f1000:.2} ns/write");
    println!("  baseline Mutex<Vec<u64>>: {base:.2} ns/call");

    let mut cadence = Vec::new();
    let c_hook_1 = get(&c1, "hook_ns_1thread");
    let c_ratio = get(&c1, "rate_ratio_2threads");
    let c_atomic = get(&c1, "baseline_atomic_flat_ns_1thread");
    let c_over_atomic = get(&c1, "hook_over_atomic_flat_1thread");
    let c_mutex = get(&c1, "baseline_mutex_flat_ns_1thread");
    let c_over_mutex = get(&c1, "hook_over_mutex_flat_1thread");
    let c_atomic_ratio = get(&c1, "baseline_atomic_flat_rate_ratio_2threads");
    for p in ["1ms", "10ms"] {
        let k = get(&c1, &format!("cadence_{p}_writes_between_calls"));
        let hook = get(&c1, &format!("cadence_{p}_hook_ns_per_write"));
        let call = get(&c1, &format!("cadence_{p}_hook_us_per_call"));
        let mutex = get(&c1, &format!("cadence_{p}_mutex_flat_ns_per_write"));
        let atomic = get(&c1, &format!("cadence_{p}_atomic_flat_ns_per_write"));
        let over = get(&c1, &format!("cadence_{p}_hook_over_mutex_flat"));
        cadence.push(format!(
            "  a call every {p} ({k:.0} writes), hook <= 1.5x mutex flat per round: hook \
             {hook:.2} ns/write ({over:.2}x: {}), its call {call:.0} us; mutex flat {mutex:.2} \
             ns, atomic flat {atomic:.2} ns",
            if over <= 1.5 { "met" } else { "NOT met" }
        ));
        let hook = get(&c1, &format!("caller_thread_{p}_hook_ns_per_write"));
        let call = get(&c1, &format!("caller_thread_{p}_hook_us_per_call"));
        let over = get(&c1, &format!("caller_thread_{p}_hook_over_mutex_flat"));
        cadence.push(format!(
            "  calls from a second thread every {p}: hook {hook:.2} ns/write ({over:.2}x mutex \
             flat), its call {call:.0} us"
        ));
    }
    let c_hook_1000 = get(&c1000, "hook_ns_1thread");
    let c_full_1000 = get(&c1000, "hook_plus_fold_ns_1thread");
    let c_all_1000 = get(&c1000, "hook_plus_fold_all_ns_1thread");
    println!("targets:");
    println!(
        "  1 bitmap from C <= 25 ns/call: {c_hook_1:.2} ns ({}); same run: atomic flat array \
         {c_atomic:.2} ns (hook/it {c_over_atomic:.2}x), mutex + flat array {c_mutex:.2} ns \
         (hook/it {c_over_mutex:.2}x)",
        if c_hook_1 <= 25.0 { "met" } else { "NOT met" }
    );
    println!(
        "  2 threads >= 1.6x one: {c_ratio:.2}x ({}); same run: atomic flat array {c_atomic_ratio:.2}x",
        if c_ratio >= 1.6 { "met" } else { "NOT met" }
    );
    for line in &cadence {
        println!("{line}");
    }
    println!(
        "  1000 bitmaps <= 1 us/call: hook {c_hook_1000:.2} ns ({}); hook + fold (next call, \
         reads one bitmap) {c_full_1000:.0} ns ({}); hook + every bitmap read {c_all_1000:.0} ns ({})",
        if c_hook_1000 <= 1000.0 { "met" } else { "NOT met" },
        if c_full_1000 <= 1000.0 { "met" } else { "NOT met" },
        if c_all_1000 <= 1000.0 { "met" } else { "NOT met" }
    );

    println!(
        "  log memory at 512 B, {MEMORY_WRITES} writes: <= 16 MiB while logging: {:.2} MiB ({}); \
         <= 1 MiB after the next call: {:.3} MiB ({})",
        mib(memory_512.0),
        if memory_512.0 <= 16 << 20 {
            "met"
        } else {
            "NOT met"
        },
        mib(memory_512.1),
        if memory_512.1 <= 1 << 20 {
            "met"
        } else {
            "NOT met"
        }
    );

    if std::env::var_os("QDIRTY_BENCH_NO_QEMU").is_some() {
        return;
    }
    println!("QEMU, {qn} random write -z 4k:");
    match qemu(qn) {
        Some((q0, q1000)) => {
            let d = q1000 - q0;
            println!("  QEMU cost of 1000 enabled bitmaps: {d:.0} ns CPU per write");
            let ours_hook = c_hook_1000 - get(&c1, "hook_ns_1thread");
            println!(
                "  qdirty/QEMU, 1000 bitmaps: hook {c_hook_1000:.1} ns / {d:.0} ns = {:.5}; hook + fold {c_full_1000:.0} ns / {d:.0} ns = {:.4}; hook + every bitmap read {c_all_1000:.0} ns / {d:.0} ns = {:.4}",
                c_hook_1000 / d,
                c_full_1000 / d,
                c_all_1000 / d
            );
            println!("  (qdirty hook, 1000 bitmaps minus 1 bitmap: {ours_hook:.1} ns)");
        }
        None => println!("  skipped (qemu-img/qemu-io unavailable or failed)"),
    }
}
