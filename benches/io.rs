//! I/O benchmark (not a test): `cargo bench --bench io`. qdirty and QEMU's tools on the same
//! images, in the same run, alternately (BENCHMARKS.md, I/O).
//!
//! Images (built in a temporary directory next to the build, sparse, deleted at the end):
//! - (a) 16 TiB virtual, 8 enabled bitmaps at 64 KiB, 1% dirty in random 1 MiB extents: made
//!   by `qemu-img create`, `qemu-img bitmap --add` and one `qemu-io -t unsafe` reading the
//!   `discard OFF 1M` lines (so all 8 bitmaps hold the same bits);
//! - (b) 2 TiB with one fully dirty 512 MiB bitmap at 512 B: filled and stored by qdirty
//!   (QEMU takes 9-14 s with discards), checked once with `qemu-img check`;
//! - (c) 100 GiB with 1000 enabled bitmaps at 64 KiB, each with its own 0.1% of random 1 MiB
//!   extents: added and filled by qdirty in one session, checked once with `qemu-img check`.
//!
//! Every measured operation is a child process, qdirty's and QEMU's alike: wall time and, from
//! `wait4`, that child's peak RSS (ru_maxrss) and bytes it sent to storage (ru_oublock × 512,
//! Linux's write_bytes, counted when a clean page cache page is dirtied: the page cache is
//! synced before each run). qdirty runs as the `qdirty` command (target/release/qdirty, built
//! first) or, where the command has no such operation, as this program re-executed in a child
//! mode (`--io-child OP ...`) that uses the library the same way. QEMU's tools run with their
//! default cache mode (writeback + flushes; qdirty fdatasyncs its commits too).
//!
//! Environment: QDIRTY_BENCH_RUNS (runs per side, default 5), QDIRTY_BENCH_A_SIZE (16T),
//! QDIRTY_BENCH_B_SIZE (2T), QDIRTY_BENCH_C_SIZE (100G), QDIRTY_BENCH_C_BITMAPS (1000),
//! QDIRTY_BENCH_DIR (where the images go; default target/io-bench-PID; QDIRTY_BENCH_KEEP=1
//! leaves them there afterwards, for profiling), QDIRTY_BENCH_ONLY
//! (comma-separated section names: info, load, noop, dirt, ops, bandwidth, many),
//! QDIRTY_BENCH_SETTLE_S (bandwidth: seconds to wait between freeing the page cache and each
//! timed write, default 0; 5 lets a VM's free page reporting hand the freed memory back to the
//! host first, so that both writes fill page-cache memory the guest no longer holds).

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use qdirty::image::AddOptions;
use qdirty::Image;
use qdirty_testkit::Prng;

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
const TIB: u64 = 1 << 40;

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| parse_size(&v))
        .unwrap_or(default)
}

fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let (num, mult) = match s.chars().last()? {
        'k' | 'K' => (&s[..s.len() - 1], 1u64 << 10),
        'm' | 'M' => (&s[..s.len() - 1], MIB),
        'g' | 'G' => (&s[..s.len() - 1], GIB),
        't' | 'T' => (&s[..s.len() - 1], TIB),
        _ => (s, 1),
    };
    num.parse::<u64>().ok().map(|n| n * mult)
}

/// Random 1 MiB extents (MiB-aligned offsets) covering `ppm` parts per million of the disk,
/// inside `[window_start, window_start + window)`.
fn extents(disk: u64, ppm: u64, window_ppm: u64, seed: u64) -> Vec<u64> {
    // Deterministic: both sides get the same extents.
    let mut r = Prng::new(seed);
    let slots = disk / MIB;
    let wslots = (slots * window_ppm / 1_000_000).max(1);
    let wstart = if wslots < slots {
        r.next_u64() % (slots - wslots)
    } else {
        0
    };
    let n = (slots * ppm / 1_000_000).max(1);
    (0..n)
        .map(|_| (wstart + r.next_u64() % wslots) * MIB)
        .collect()
}

// ------------------------------------------------------------------------------------------
// Child processes

#[derive(Clone, Debug, Default)]
struct Run {
    wall: f64,
    rss_kib: u64,
    written: u64,
    out: String,
}

/// Runs a command to completion through the launcher: wall time, and from wait4 its own peak
/// RSS and bytes written.
fn measure(cmd: &mut Command, stdin: Option<&Path>) -> Run {
    LAUNCHER.with(|l| l.borrow_mut().as_mut().expect("launcher").run(cmd, stdin))
}

thread_local! {
    static LAUNCHER: std::cell::RefCell<Option<Launcher>> = const { std::cell::RefCell::new(None) };
}

/// A small process, started before this one grows, that spawns the measured commands. Linux
/// accounts the peak RSS of the process that exec()s into the exec'd program's ru_maxrss, and
/// a vfork()ed child shares its parent's memory: spawning straight from this (bigger) process
/// would put a floor of this process's peak under every figure. The launcher's own floor is
/// measured and printed (`/bin/true`).
struct Launcher {
    child: std::process::Child,
    to: std::process::ChildStdin,
    from: std::io::BufReader<std::process::ChildStdout>,
    dir: PathBuf,
}

impl Launcher {
    fn start(me: &Path, dir: &Path) -> Launcher {
        let mut child = Command::new(me)
            .arg("--io-launcher")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("launcher");
        let to = child.stdin.take().unwrap();
        let from = std::io::BufReader::new(child.stdout.take().unwrap());
        Launcher {
            child,
            to,
            from,
            dir: dir.to_path_buf(),
        }
    }

    fn run(&mut self, cmd: &Command, stdin: Option<&Path>) -> Run {
        use std::io::BufRead;
        let (o, e) = (self.dir.join("run.out"), self.dir.join("run.err"));
        let mut line = vec![
            stdin.map_or("-".to_string(), |p| p.display().to_string()),
            o.display().to_string(),
            e.display().to_string(),
            cmd.get_program().to_string_lossy().into_owned(),
        ];
        line.extend(cmd.get_args().map(|a| a.to_string_lossy().into_owned()));
        writeln!(self.to, "{}", line.join("\t")).unwrap();
        self.to.flush().unwrap();
        let mut reply = String::new();
        self.from.read_line(&mut reply).unwrap();
        let f: Vec<f64> = reply
            .split_whitespace()
            .map(|x| x.parse().unwrap())
            .collect();
        let out = std::fs::read_to_string(&o).unwrap_or_default();
        let err = std::fs::read_to_string(&e).unwrap_or_default();
        assert!(
            f[0] == 0.0,
            "{cmd:?} failed (status {}):\n{out}\n{err}",
            f[0]
        );
        if !err.trim().is_empty() {
            eprintln!("  [{}] stderr: {}", prog(cmd), err.trim());
        }
        Run {
            wall: f[1],
            rss_kib: f[2] as u64,
            written: f[3] as u64 * 512,
            out,
        }
    }
}

impl Drop for Launcher {
    fn drop(&mut self) {
        let _ = writeln!(self.to);
        let _ = self.child.wait();
    }
}

/// The launcher's loop: one command per line (stdin file or "-", stdout file, stderr file,
/// program, arguments; tab-separated); replies "exit_status wall_s maxrss_kib oublock".
fn launcher_main() {
    let stdin = std::io::stdin();
    let mut out = std::io::stdout();
    let mut line = String::new();
    loop {
        line.clear();
        if stdin.read_line(&mut line).unwrap() == 0 || line.trim().is_empty() {
            return;
        }
        let f: Vec<&str> = line.trim_end_matches('\n').split('\t').collect();
        let mut cmd = Command::new(f[3]);
        cmd.args(&f[4..]);
        match f[0] {
            "-" => cmd.stdin(Stdio::null()),
            p => cmd.stdin(std::fs::File::open(p).unwrap()),
        };
        cmd.stdout(std::fs::File::create(f[1]).unwrap());
        cmd.stderr(std::fs::File::create(f[2]).unwrap());
        // Start each run from a clean page cache state (not timed): write_bytes counts pages
        // that become dirty, so pages left dirty by the previous run would not count again.
        // SAFETY: sync has no preconditions.
        unsafe { libc::sync() };
        let t = Instant::now();
        // Reaped by wait4, which returns the child's own rusage (Child::wait does not).
        #[allow(clippy::zombie_processes)]
        let child = cmd.spawn().unwrap();
        let mut status = 0;
        // SAFETY: rusage is plain data written by wait4; the pid is our unreaped child.
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        let r = unsafe { libc::wait4(child.id() as i32, &mut status, 0, &mut ru) };
        let wall = t.elapsed().as_secs_f64();
        assert!(r > 0, "wait4 failed");
        let code = if libc::WIFEXITED(status) {
            libc::WEXITSTATUS(status)
        } else {
            128 + libc::WTERMSIG(status)
        };
        writeln!(out, "{code} {wall:.9} {} {}", ru.ru_maxrss, ru.ru_oublock).unwrap();
        out.flush().unwrap();
    }
}

fn prog(cmd: &Command) -> String {
    Path::new(cmd.get_program())
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned()
}

fn sh(cmd: &mut Command) {
    let st = cmd
        .stdout(Stdio::null())
        .status()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(st.success(), "{cmd:?} failed");
}

struct Tools {
    qdirty: PathBuf,
    me: PathBuf,
}

impl Tools {
    fn qdirty(&self, args: &[&str]) -> Command {
        let mut c = Command::new(&self.qdirty);
        c.args(args);
        c
    }
    fn child(&self, args: &[&str]) -> Command {
        let mut c = Command::new(&self.me);
        c.arg("--io-child").args(args);
        c
    }
}

fn qemu(prog: &str, args: &[&str]) -> Command {
    let mut c = Command::new(prog);
    c.args(args);
    c
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// The child modes: the library used the way a host uses it, one operation per process.
fn child_main(args: &[String]) {
    let t = Instant::now();
    let op = args[0].as_str();
    let img = &args[1];
    match op {
        // Read-write open and close, no change.
        // Prints the bytes passed to write system calls (/proc/self/io wchar: what the library
        // wrote, unlike ru_oublock, which counts whole page-cache folios dirtied).
        "rw-noop" => {
            Image::open(img, true).unwrap().close().unwrap();
            println!("wchar {}", proc_wchar());
        }
        // Read-only open only (1000 bitmaps: the directory, no data).
        "ro-open" => {
            let i = Image::open(img, false).unwrap();
            let dt = t.elapsed().as_secs_f64();
            println!("bitmaps {} open_s {dt:.9}", i.bitmap_ids().len());
        }
        // Read-only open and load of every bitmap; prints the in-process time.
        "load" => {
            let mut i = Image::open(img, false).unwrap();
            i.load_all_bitmaps().unwrap();
            let mut n = 0;
            for id in i.bitmap_ids() {
                n += i.bitmap_current(id).unwrap().count();
            }
            let dt = t.elapsed().as_secs_f64();
            println!("dirty {n} load_s {dt:.9}");
        }
        // The plain baselines of the bandwidth section, timed in a process started the same
        // way as the library's side: a sequential read of the file's first bytes, or a new
        // file written.
        "plain-read" => {
            let bytes: u64 = args[2].parse().unwrap();
            println!("read_s {:.9}", plain_read(Path::new(img), bytes));
        }
        "plain-write" => {
            let bytes: u64 = args[2].parse().unwrap();
            println!("write_s {:.9}", plain_write(Path::new(img), bytes));
        }
        // Read-write open, the guest's writes (extents from the arguments), close.
        "rw-dirt" => {
            let a: Vec<u64> = args[2..].iter().map(|s| s.parse().unwrap()).collect();
            let mut i = Image::open(img, true).unwrap();
            let size = i.size();
            for o in extents(size, a[0], a[1], a[2]) {
                i.set_dirty(o, MIB);
            }
            i.close().unwrap();
        }
        // Store of a whole new, fully dirty bitmap replacing `full`; prints the close time.
        "store" => {
            let gran: u64 = args[2].parse().unwrap();
            let mut i = Image::open(img, true).unwrap();
            i.remove_bitmap(b"full").unwrap();
            let opts = AddOptions {
                persistent: true,
                ..AddOptions::default()
            };
            let id = i.add_bitmap(b"full", gran, opts).unwrap();
            let size = i.size();
            i.bitmap_mut(id).unwrap().set_dirty(0, size).unwrap();
            let t = Instant::now();
            i.close().unwrap();
            println!("store_s {:.9}", t.elapsed().as_secs_f64());
        }
        _ => panic!("unknown child op {op}"),
    }
}

// ------------------------------------------------------------------------------------------
// Images

struct Images {
    a: PathBuf,
    b: PathBuf,
    c: PathBuf,
    a_size: u64,
    b_size: u64,
    c_size: u64,
    c_bitmaps: u32,
}

fn qemu_check(img: &Path) {
    let t = Instant::now();
    let out = Command::new("qemu-img")
        .args(["check", "-f", "qcow2", p(img)])
        .output()
        .unwrap();
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "qemu-img check {}: {s}{}",
        img.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    println!(
        "  qemu-img check {}: clean ({:.1} s)",
        img.file_name().unwrap().to_string_lossy(),
        t.elapsed().as_secs_f64()
    );
}

fn build_images(dir: &Path) -> Images {
    let im = Images {
        a: dir.join("a-16T-8x64k.qcow2"),
        b: dir.join("b-2T-full512.qcow2"),
        c: dir.join("c-100G-1000.qcow2"),
        a_size: env_u64("QDIRTY_BENCH_A_SIZE", 16 * TIB),
        b_size: env_u64("QDIRTY_BENCH_B_SIZE", 2 * TIB),
        c_size: env_u64("QDIRTY_BENCH_C_SIZE", 100 * GIB),
        c_bitmaps: env_u64("QDIRTY_BENCH_C_BITMAPS", 1000) as u32,
    };
    // (a) with QEMU's tools only.
    let t = Instant::now();
    sh(qemu("qemu-img", &["create", "-q", "-f", "qcow2", p(&im.a)]).arg(im.a_size.to_string()));
    for i in 0..8 {
        sh(&mut qemu(
            "qemu-img",
            &["bitmap", "--add", "-g", "64k", p(&im.a), &format!("b{i}")],
        ));
    }
    let script = dir.join("a-fill.qemu-io");
    write_discards(&script, &extents(im.a_size, 10_000, 1_000_000, 1));
    sh(qemu("qemu-io", &["-t", "unsafe", "-f", "qcow2", p(&im.a)])
        .stdin(std::fs::File::open(&script).unwrap()));
    let _ = std::fs::remove_file(&script);
    println!(
        "  (a) {} virtual, 8 bitmaps @ 64 KiB, 1% dirty: built with qemu-img/qemu-io in {:.1} s",
        human(im.a_size),
        t.elapsed().as_secs_f64()
    );
    qemu_check(&im.a);

    // (b) with qdirty: one fully dirty bitmap at 512 B.
    let t = Instant::now();
    Image::create(&im.b, im.b_size, 65536).unwrap();
    let mut i = Image::open(&im.b, true).unwrap();
    let opts = AddOptions {
        persistent: true,
        ..AddOptions::default()
    };
    let id = i.add_bitmap(b"full", 512, opts).unwrap();
    i.bitmap_mut(id).unwrap().set_dirty(0, im.b_size).unwrap();
    i.close().unwrap();
    println!(
        "  (b) {} virtual, one full {} bitmap @ 512 B: built with qdirty in {:.1} s",
        human(im.b_size),
        human(im.b_size / 512 / 8),
        t.elapsed().as_secs_f64()
    );
    qemu_check(&im.b);

    // (c) with qdirty: N bitmaps added in one session, each with its own 0.1%.
    let t = Instant::now();
    Image::create(&im.c, im.c_size, 65536).unwrap();
    let mut i = Image::open(&im.c, true).unwrap();
    for n in 0..im.c_bitmaps {
        let id = i
            .add_bitmap(format!("b{n}").as_bytes(), 65536, opts)
            .unwrap();
        let bm = i.bitmap_mut(id).unwrap();
        for o in extents(im.c_size, 1000, 1_000_000, 1000 + u64::from(n)) {
            bm.set_dirty(o, MIB).unwrap();
        }
    }
    i.close().unwrap();
    println!(
        "  (c) {} virtual, {} bitmaps @ 64 KiB, 0.1% dirty each: built with qdirty in {:.1} s",
        human(im.c_size),
        im.c_bitmaps,
        t.elapsed().as_secs_f64()
    );
    qemu_check(&im.c);
    for f in [&im.a, &im.b, &im.c] {
        let m = std::fs::metadata(f).unwrap();
        use std::os::unix::fs::MetadataExt;
        println!(
            "  {}: {} apparent, {} allocated",
            f.file_name().unwrap().to_string_lossy(),
            human(m.len()),
            human(m.blocks() * 512)
        );
    }
    im
}

fn write_discards(path: &Path, offs: &[u64]) {
    let mut s = String::with_capacity(offs.len() * 32);
    for o in offs {
        s.push_str(&format!("discard {o} 1M\n"));
    }
    std::fs::write(path, s).unwrap();
}

fn human(b: u64) -> String {
    let units = [(TIB, "TiB"), (GIB, "GiB"), (MIB, "MiB"), (1024, "KiB")];
    for (u, n) in units {
        if b >= u {
            let v = b as f64 / u as f64;
            return if v.fract() == 0.0 {
                format!("{v:.0} {n}")
            } else {
                format!("{v:.1} {n}")
            };
        }
    }
    format!("{b} B")
}

// ------------------------------------------------------------------------------------------
// Comparisons

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

#[derive(Default)]
struct Stat {
    wall: f64,
    rss_kib: u64,
    written: f64,
}

fn stat(runs: &[Run]) -> Stat {
    Stat {
        wall: median(runs.iter().map(|r| r.wall).collect()),
        rss_kib: runs.iter().map(|r| r.rss_kib).max().unwrap_or(0),
        written: median(runs.iter().map(|r| r.written as f64).collect()),
    }
}

/// One row of the final table.
struct Row {
    op: String,
    image: String,
    ours: Stat,
    theirs: Option<Stat>,
    target: String,
    verdict: String,
}

struct Bench {
    runs: usize,
    rows: Vec<Row>,
}

/// Runs `ours(k)` and `theirs(k)` alternately `runs` times (k = run index).
fn alternate(
    runs: usize,
    mut ours: impl FnMut(usize) -> Run,
    mut theirs: impl FnMut(usize) -> Run,
) -> (Vec<Run>, Vec<Run>) {
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for k in 0..runs {
        a.push(ours(k));
        b.push(theirs(k));
    }
    (a, b)
}

fn fmt_t(s: f64) -> String {
    if s < 0.001 {
        format!("{:.0} µs", s * 1e6)
    } else if s < 1.0 {
        format!("{:.1} ms", s * 1e3)
    } else {
        format!("{s:.2} s")
    }
}

fn fmt_rss(k: u64) -> String {
    if k >= 10240 {
        format!("{:.0} MiB", k as f64 / 1024.0)
    } else {
        format!("{:.1} MiB", k as f64 / 1024.0)
    }
}

fn fmt_bytes(b: f64) -> String {
    human(b as u64)
}

impl Bench {
    /// Records a comparison; `speedup` and `rss_frac` are the targets (None: not a target).
    #[allow(clippy::too_many_arguments)]
    fn compare(
        &mut self,
        op: &str,
        image: &str,
        ours: &[Run],
        theirs: &[Run],
        speedup: Option<f64>,
        rss_frac: Option<f64>,
        extra_target: Option<(String, bool)>,
    ) {
        let (o, t) = (stat(ours), stat(theirs));
        let ratio = t.wall / o.wall;
        let rss_ratio = o.rss_kib as f64 / t.rss_kib as f64;
        let mut target = Vec::new();
        let mut met = Vec::new();
        if let Some(s) = speedup {
            target.push(format!("≥ {s}× faster"));
            met.push(ratio >= s);
        }
        if let Some(f) = rss_frac {
            target.push(format!("≤ 1/{:.0} RSS", 1.0 / f));
            met.push(rss_ratio <= f);
        }
        if let Some((t, m)) = extra_target {
            target.push(t);
            met.push(m);
        }
        let verdict = if met.is_empty() {
            "(reported)".to_string()
        } else if met.iter().all(|&m| m) {
            "met".to_string()
        } else {
            "**not met**".to_string()
        };
        println!(
            "  {op} [{image}]: qdirty {} ({} RSS, {} written) | QEMU {} ({} RSS, {} written) | {ratio:.1}× faster, RSS ×{rss_ratio:.3} | {}",
            fmt_t(o.wall),
            fmt_rss(o.rss_kib),
            fmt_bytes(o.written),
            fmt_t(t.wall),
            fmt_rss(t.rss_kib),
            fmt_bytes(t.written),
            verdict
        );
        self.rows.push(Row {
            op: op.into(),
            image: image.into(),
            ours: o,
            theirs: Some(t),
            target: target.join(", "),
            verdict,
        });
    }

    fn single(&mut self, op: &str, image: &str, ours: Stat, target: &str, verdict: String) {
        self.rows.push(Row {
            op: op.into(),
            image: image.into(),
            ours,
            theirs: None,
            target: target.into(),
            verdict,
        });
    }

    fn table(&self) {
        println!();
        println!("| Operation | Image | qdirty (median wall, peak RSS, written) | QEMU (median wall, peak RSS, written) | Speed-up | RSS ratio | Target | |");
        println!("|---|---|---|---|---|---|---|---|");
        for r in &self.rows {
            let ours = format!(
                "{}, {}, {}",
                fmt_t(r.ours.wall),
                fmt_rss(r.ours.rss_kib),
                fmt_bytes(r.ours.written)
            );
            let (theirs, sp, rr) = match &r.theirs {
                Some(t) => (
                    format!(
                        "{}, {}, {}",
                        fmt_t(t.wall),
                        fmt_rss(t.rss_kib),
                        fmt_bytes(t.written)
                    ),
                    format!("{:.1}×", t.wall / r.ours.wall),
                    format!("{:.3}", r.ours.rss_kib as f64 / t.rss_kib as f64),
                ),
                None => (String::new(), String::new(), String::new()),
            };
            println!(
                "| {} | {} | {ours} | {theirs} | {sp} | {rr} | {} | {} |",
                r.op, r.image, r.target, r.verdict
            );
        }
    }
}

fn enabled(section: &str) -> bool {
    match std::env::var("QDIRTY_BENCH_ONLY") {
        Ok(s) if !s.is_empty() => s.split(',').any(|x| x.trim() == section),
        _ => true,
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--io-launcher") {
        launcher_main();
        return;
    }
    if let Some(i) = args.iter().position(|a| a == "--io-child") {
        child_main(&args[i + 1..]);
        return;
    }
    if args.iter().any(|a| a == "--list") {
        return;
    }
    let runs = env_u64("QDIRTY_BENCH_RUNS", 5) as usize;
    let me = std::env::current_exe().unwrap();
    // target/release/deps/io-HASH -> target/release
    let release = me.parent().unwrap().parent().unwrap().to_path_buf();
    let dir = std::env::var_os("QDIRTY_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            release
                .parent()
                .unwrap()
                .join(format!("io-bench-{}", std::process::id()))
        });
    std::fs::create_dir_all(&dir).unwrap();
    LAUNCHER.with(|l| *l.borrow_mut() = Some(Launcher::start(&me, &dir)));
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let st = Command::new(&cargo)
        .args(["build", "--release", "-q", "-p", "qdirty-cli"])
        .current_dir(&root)
        .env(
            "CARGO_TARGET_DIR",
            release.parent().unwrap(), // the same target dir as this benchmark
        )
        .status()
        .expect("cargo build --release -p qdirty-cli");
    assert!(st.success(), "building the qdirty command failed");
    let tools = Tools {
        qdirty: release.join("qdirty"),
        me: me.clone(),
    };
    assert!(tools.qdirty.exists(), "{} missing", tools.qdirty.display());

    println!(
        "I/O benchmark: {runs} runs per side, alternating; images in {}",
        dir.display()
    );
    let floor = measure(&mut Command::new("/bin/true"), None);
    println!(
        "  floor of the peak RSS figures (/bin/true through the launcher): {}",
        fmt_rss(floor.rss_kib)
    );
    let t0 = Instant::now();
    let im = build_images(&dir);
    let mut b = Bench {
        runs,
        rows: Vec::new(),
    };
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        sections(&mut b, &tools, &im, &dir);
    }));
    LAUNCHER.with(|l| l.borrow_mut().take());
    if env_u64("QDIRTY_BENCH_KEEP", 0) == 0 {
        let _ = std::fs::remove_dir_all(&dir);
    }
    if let Err(e) = result {
        std::panic::resume_unwind(e);
    }
    b.table();
    println!("\n(total {:.0} s)", t0.elapsed().as_secs_f64());
}

fn sections(b: &mut Bench, tools: &Tools, im: &Images, dir: &Path) {
    let n = b.runs;
    let names = [("(a)", &im.a), ("(b)", &im.b), ("(c)", &im.c)];
    let bitmap_bytes_a = 8 * (im.a_size / 65536).div_ceil(8);

    if enabled("info") {
        println!("list/info: qdirty info vs qemu-img info");
        for (name, img) in names {
            let (o, t) = alternate(
                n,
                |_| measure(&mut tools.qdirty(&["info", p(img)]), None),
                |_| {
                    measure(
                        &mut qemu("qemu-img", &["info", "-f", "qcow2", p(img)]),
                        None,
                    )
                },
            );
            b.compare("list/info", name, &o, &t, Some(20.0), Some(0.05), None);
        }
    }
    if enabled("load") {
        println!(
            "read-only open + load of every bitmap: qdirty info --count vs qemu-io -r -c quit"
        );
        // The floor of every whole-process figure: starting each program and nothing else.
        let (o, t) = alternate(
            n,
            |_| measure(&mut tools.qdirty(&["--version"]), None),
            |_| measure(&mut qemu("qemu-io", &["--version"]), None),
        );
        println!(
            "  process floor: qdirty --version {}, qemu-io --version {}",
            fmt_t(stat(&o).wall),
            fmt_t(stat(&t).wall)
        );
        for (name, img) in names {
            let (o, t) = alternate(
                n,
                |_| measure(&mut tools.qdirty(&["info", "--count", p(img)]), None),
                |_| {
                    measure(
                        &mut qemu("qemu-io", &["-r", "-f", "qcow2", "-c", "quit", p(img)]),
                        None,
                    )
                },
            );
            // (a), 8 bitmaps of 64 KiB granularity with 1% of dirt spread over the disk: ≥ 6×.
            let target = if name == "(a)" { 6.0 } else { 3.0 };
            b.compare("RO open + load all", name, &o, &t, Some(target), None, None);
        }
    }
    if enabled("noop") {
        println!("read-write open + close, no change: library child vs qemu-io -c quit");
        for (name, img) in names {
            let cluster = 65536.0;
            let (o, t) = alternate(
                n,
                |_| measure(&mut tools.child(&["rw-noop", p(img)]), None),
                |_| {
                    measure(
                        &mut qemu("qemu-io", &["-f", "qcow2", "-c", "quit", p(img)]),
                        None,
                    )
                },
            );
            let w = stat(&o).written;
            let wchar = median(o.iter().map(|r| field(&r.out, "wchar")).collect());
            println!(
                "  [{name}] qdirty's write system calls: {} (ru_oublock counts {}: whole page-cache folios)",
                fmt_bytes(wchar),
                fmt_bytes(w)
            );
            let w = wchar;
            b.compare(
                "RW open + close, no change",
                name,
                &o,
                &t,
                Some(20.0),
                None,
                Some(("writes ≤ a few (4) clusters".into(), w <= 4.0 * cluster)),
            );
        }
    }
    if enabled("dirt") {
        // 1% more dirt on (a): spread over the whole disk (every bitmap cluster changes), and
        // localized (random 1 MiB extents in a random window of 2% of the disk).
        for (label, window) in [("spread", 1_000_000u64), ("localized in 2%", 20_000)] {
            println!("read-write open + 1% more dirt ({label}) + close on (a)");
            let (o, t) = alternate(
                n,
                |k| {
                    let seed = (100 + 2 * k as u64).to_string();
                    measure(
                        &mut tools.child(&[
                            "rw-dirt",
                            p(&im.a),
                            "10000",
                            &window.to_string(),
                            &seed,
                        ]),
                        None,
                    )
                },
                |k| {
                    let script = dir.join("dirt.qemu-io");
                    write_discards(
                        &script,
                        &extents(im.a_size, 10_000, window, 101 + 2 * k as u64),
                    );
                    measure(
                        &mut qemu("qemu-io", &["-f", "qcow2", p(&im.a)]),
                        Some(&script),
                    )
                },
            );
            let w = stat(&o).written;
            let frac = w / bitmap_bytes_a as f64;
            println!(
                "  qdirty wrote {:.2}% of the {} of bitmap data",
                frac * 100.0,
                human(bitmap_bytes_a)
            );
            b.compare(
                &format!("RW open + 1% more dirt ({label}) + close"),
                "(a)",
                &o,
                &t,
                Some(5.0),
                None,
                Some((
                    format!("writes ≤ 3% of bitmap bytes ({:.1}%)", frac * 100.0),
                    frac <= 0.03,
                )),
            );
        }
    }
    if enabled("ops") {
        for (name, img, count) in [("(c)", &im.c, im.c_bitmaps as usize), ("(a)", &im.a, 8)] {
            println!("merge / add / remove on {name}: qdirty bitmap vs qemu-img bitmap");
            // merge: a fresh source/target pair per run and side, so every merge changes bits
            // (on (a) all bitmaps hold the same bits: the merge changes nothing).
            let pair = |k: usize, side: usize| {
                let i = (4 * k + 2 * side) % count;
                (format!("b{i}"), format!("b{}", (i + 1) % count))
            };
            let (o, t) = alternate(
                n,
                |k| {
                    let (s, d) = pair(k, 0);
                    measure(
                        &mut tools.qdirty(&["bitmap", "--merge", &s, p(img), &d]),
                        None,
                    )
                },
                |k| {
                    let (s, d) = pair(k, 1);
                    measure(
                        &mut qemu(
                            "qemu-img",
                            &["bitmap", "--merge", &s, "-f", "qcow2", p(img), &d],
                        ),
                        None,
                    )
                },
            );
            // On (a) QEMU loads and rewrites all 8 bitmaps, qdirty reads the two it merges: ≥ 20×.
            let target = if name == "(a)" { 20.0 } else { 5.0 };
            b.compare("bitmap --merge", name, &o, &t, Some(target), None, None);
            let (mut oa, mut ta, mut or, mut tr) = (vec![], vec![], vec![], vec![]);
            for _ in 0..n {
                oa.push(measure(
                    &mut tools.qdirty(&["bitmap", "--add", p(img), "new-q"]),
                    None,
                ));
                ta.push(measure(
                    &mut qemu(
                        "qemu-img",
                        &["bitmap", "--add", "-f", "qcow2", p(img), "new-e"],
                    ),
                    None,
                ));
                or.push(measure(
                    &mut tools.qdirty(&["bitmap", "--remove", p(img), "new-q"]),
                    None,
                ));
                tr.push(measure(
                    &mut qemu(
                        "qemu-img",
                        &["bitmap", "--remove", "-f", "qcow2", p(img), "new-e"],
                    ),
                    None,
                ));
            }
            b.compare("bitmap --add", name, &oa, &ta, Some(10.0), None, None);
            b.compare("bitmap --remove", name, &or, &tr, Some(10.0), None, None);
        }
        qemu_check(&im.c);
        qemu_check(&im.a);
    }
    if enabled("bandwidth") {
        let bytes = im.b_size / 512 / 8;
        println!(
            "bandwidth on (b): {} bitmap load/store vs plain sequential read / write + fdatasync \
             (page cache released {} s before each timed write)",
            human(bytes),
            env_u64("QDIRTY_BENCH_SETTLE_S", 0)
        );
        let plain = dir.join("plain.bin");
        // Every timed side runs in a child process started the same way (a fresh process
        // reads the same warm file ≈ 10% slower than this long-running one).
        // Cold: the file was dropped from the page cache first (posix_fadvise DONTNEED, after
        // a sync); warm: read again after, so on both sides the page cache holds pages that
        // the same kind of sequential read brought in.
        // Both timed writes (plain and store) start right after `release_cache` gave back the
        // same amount of page cache (the plain file, read then dropped): both write into
        // page-cache memory in the same state. (Otherwise the plain write reuses the pages of
        // the file it has just deleted while the store gets pages freed seconds before, which
        // this VM's free page reporting has returned to the host: ≈ 2× slower to fill.)
        plain_write(&plain, bytes);
        let (mut rd, mut rdc, mut wr) = (vec![], vec![], vec![]);
        let (mut ld, mut ldc, mut stv) = (vec![], vec![], vec![]);
        let (mut ld_runs, mut st_runs) = (vec![], vec![]);
        let (mut qro, mut qroc, mut qrw) = (vec![], vec![], vec![]);
        for _ in 0..n {
            let child = |args: &[&str]| measure(&mut tools.child(args), None);
            release_cache(&plain, bytes);
            let n_bytes = bytes.to_string();
            wr.push(field(
                &child(&["plain-write", p(&plain), &n_bytes]).out,
                "write_s",
            ));
            release_cache(&plain, bytes);
            let r = child(&["store", p(&im.b), "512"]);
            stv.push(field(&r.out, "store_s"));
            st_runs.push(r);
            // The read baseline reads the image file itself, its first `bytes` (the store
            // puts the bitmap's data in the first free clusters, right after the header:
            // QEMU's rewrite below moved the previous copy to the end), so that both
            // sides read the same disk blocks and page-cache pages. Cold reads of this VM's
            // disk depend on what the host still caches (the same blocks read again soon
            // after come back several times faster): each side reads cold twice, in the order
            // plain, load, load, plain, then warm in the same order.
            for warm in [false, true] {
                for load in [false, true, true, false] {
                    if !warm {
                        drop_cache(&im.b);
                    }
                    if load {
                        let r = child(&["load", p(&im.b)]);
                        let t = field(&r.out, "load_s");
                        if warm {
                            ld.push(t);
                            ld_runs.push(r);
                        } else {
                            ldc.push(t);
                        }
                    } else {
                        let t = field(&child(&["plain-read", p(&im.b), &n_bytes]).out, "read_s");
                        if warm {
                            rd.push(t)
                        } else {
                            rdc.push(t)
                        }
                    }
                }
            }
            // QEMU in the same run: read-only open = load; read-write open + close minus the
            // read-only open = store.
            drop_cache(&im.b);
            qroc.push(measure(
                &mut qemu("qemu-io", &["-r", "-f", "qcow2", "-c", "quit", p(&im.b)]),
                None,
            ));
            qro.push(measure(
                &mut qemu("qemu-io", &["-r", "-f", "qcow2", "-c", "quit", p(&im.b)]),
                None,
            ));
            qrw.push(measure(
                &mut qemu("qemu-io", &["-f", "qcow2", "-c", "quit", p(&im.b)]),
                None,
            ));
        }
        let _ = std::fs::remove_file(&plain);
        let bw = |t: f64| bytes as f64 / t / 1e6;
        let (rd, rdc, wr) = (median(rd), median(rdc), median(wr));
        let (ld, ldc, stv) = (median(ld), median(ldc), median(stv));
        let qro_t = stat(&qro).wall;
        let qroc_t = stat(&qroc).wall;
        let qst_t = stat(&qrw).wall - qro_t;
        println!(
            "  plain read warm {:.0} MB/s, cold {:.0} MB/s, plain write+fdatasync {:.0} MB/s",
            bw(rd),
            bw(rdc),
            bw(wr)
        );
        println!(
            "  qdirty: load warm {:.0} MB/s ({:.0}%), cold {:.0} MB/s ({:.0}%), store {:.0} MB/s ({:.0}%)",
            bw(ld), 100.0 * rd / ld, bw(ldc), 100.0 * rdc / ldc, bw(stv), 100.0 * wr / stv
        );
        println!(
            "  QEMU (whole qemu-io): load warm {:.0} MB/s ({:.0}%), cold {:.0} MB/s ({:.0}%), store ≈ {:.0} MB/s ({:.0}%)",
            bw(qro_t), 100.0 * rd / qro_t, bw(qroc_t), 100.0 * rdc / qroc_t, bw(qst_t), 100.0 * wr / qst_t
        );
        let ls = stat(&ld_runs);
        for (label, plain_t, ours, q) in [("warm", rd, ld, qro_t), ("cold", rdc, ldc, qroc_t)] {
            b.single(
                &format!(
                    "load of a full {} bitmap, page cache {label} (open + count, in-process) vs plain read {} ({:.0} MB/s); QEMU RO open {} = {:.0}%",
                    human(bytes), fmt_t(plain_t), bw(plain_t), fmt_t(q), 100.0 * plain_t / q
                ),
                "(b)",
                Stat { wall: ours, ..ls },
                "≥ 70% of plain read",
                format!(
                    "{:.0}% {}",
                    100.0 * plain_t / ours,
                    if plain_t / ours >= 0.7 { "met" } else { "**not met**" }
                ),
            );
        }
        let ss = stat(&st_runs);
        b.single(
            &format!(
                "store of a full {} bitmap (close, in-process) vs plain write+fdatasync {} ({:.0} MB/s); QEMU RW − RO open {} = {:.0}%",
                human(bytes), fmt_t(wr), bw(wr), fmt_t(qst_t), 100.0 * wr / qst_t
            ),
            "(b)",
            Stat { wall: stv, ..ss },
            "≥ 50% of plain write",
            format!(
                "{:.0}% {}",
                100.0 * wr / stv,
                if wr / stv >= 0.5 { "met" } else { "**not met**" }
            ),
        );
        qemu_check(&im.b);
    }
    if enabled("many") {
        println!(
            "{} bitmaps on (c): read-only open and listing",
            im.c_bitmaps
        );
        let (mut open, mut open_runs, mut list) = (vec![], vec![], vec![]);
        for _ in 0..n.max(5) {
            let r = measure(&mut tools.child(&["ro-open", p(&im.c)]), None);
            open.push(field(&r.out, "open_s"));
            open_runs.push(r);
            list.push(measure(&mut tools.qdirty(&["info", p(&im.c)]), None));
        }
        let o = median(open);
        let os = stat(&open_runs);
        println!(
            "  RO open in-process {} (process {}), listing (qdirty info, whole process) {}",
            fmt_t(o),
            fmt_t(os.wall),
            fmt_t(stat(&list).wall)
        );
        b.single(
            &format!(
                "{} bitmaps: RO open (Image::open, in-process; whole process {})",
                im.c_bitmaps,
                fmt_t(os.wall)
            ),
            "(c)",
            Stat { wall: o, ..os },
            "≤ 10 ms",
            (if o <= 0.010 { "met" } else { "**not met**" }).into(),
        );
        let ls = stat(&list);
        let met = ls.wall <= 0.010;
        b.single(
            &format!(
                "{} bitmaps: listing (qdirty info, whole process)",
                im.c_bitmaps
            ),
            "(c)",
            ls,
            "≤ 10 ms",
            (if met { "met" } else { "**not met**" }).into(),
        );
    }
}

fn field(out: &str, key: &str) -> f64 {
    let mut it = out.split_whitespace();
    while let Some(k) = it.next() {
        if k == key {
            return it.next().unwrap().parse().unwrap();
        }
    }
    panic!("no {key} in {out:?}")
}

/// Bytes this process passed to write system calls so far (/proc/self/io `wchar`).
fn proc_wchar() -> u64 {
    std::fs::read_to_string("/proc/self/io")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("wchar:").map(|v| v.trim().parse().ok()))
                .flatten()
        })
        .unwrap_or(0)
}

/// Drops a file's clean pages from the page cache (after writing back the dirty ones).
fn drop_cache(path: &Path) {
    use std::os::unix::io::AsRawFd;
    let f = std::fs::File::open(path).unwrap();
    f.sync_all().unwrap();
    // SAFETY: a valid fd; fadvise only changes caching.
    unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
}

/// Reads the file into the page cache, then drops it again: `bytes` of page cache just freed,
/// the state both timed writes of the bandwidth section start from.
fn release_cache(path: &Path, bytes: u64) {
    plain_read(path, bytes);
    drop_cache(path);
    let settle = env_u64("QDIRTY_BENCH_SETTLE_S", 0);
    if settle > 0 {
        std::thread::sleep(std::time::Duration::from_secs(settle));
    }
}

/// Sequential write of `bytes` in 1 MiB writes to a new file, then fdatasync: seconds.
fn plain_write(path: &Path, bytes: u64) -> f64 {
    let _ = std::fs::remove_file(path);
    // SAFETY: sync has no preconditions.
    unsafe { libc::sync() };
    let buf = vec![0xffu8; MIB as usize];
    let t = Instant::now();
    let mut f = std::fs::File::create(path).unwrap();
    let mut left = bytes;
    while left > 0 {
        let n = left.min(MIB) as usize;
        f.write_all(&buf[..n]).unwrap();
        left -= n as u64;
    }
    f.sync_data().unwrap();
    drop(f);
    t.elapsed().as_secs_f64()
}

/// Sequential read of the file in 1 MiB reads (page cache warm, as for the bitmap): seconds.
fn plain_read(path: &Path, bytes: u64) -> f64 {
    let mut buf = vec![0u8; MIB as usize];
    let t = Instant::now();
    let mut f = std::fs::File::open(path).unwrap();
    let mut got = 0;
    while got < bytes {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        got += n as u64;
    }
    std::hint::black_box(&buf);
    t.elapsed().as_secs_f64()
}
