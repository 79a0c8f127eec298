//! Durable mode's costs: `cargo bench --bench durable` (plain main, no harness); optional
//! section filter: `cargo bench --bench durable -- prepare writers backup manage`.
//!
//! * prepare: `qdirty_image_prepare_write` on covered zones through the C ABI, 1 and 4
//!   threads, and the write hook (`qdirty_image_set_dirty`) with and without durable mode, on a
//!   1 TiB image with one enabled persistent bitmap; random 4 KiB writes.
//! * writers: 4 threads doing random 4 KiB guest writes (prepare, a 4 KiB `pwrite` into a
//!   sparse raw data file, the hook) on a fresh 1 TiB image with 8 enabled bitmaps, durable
//!   against ordinary in the same run: while the zones fill (each first write into a zone
//!   writes and flushes the bitmaps) and once the touched zones are covered.
//! * backup: what the first incremental backup after a crash must read: 1% of a 1 TiB disk
//!   written in 1 MiB runs, clustered (sequential extents of 1-200 MiB at random places) and
//!   uniform, for zone sizes 1 MiB .. 256 MiB; the image is reopened after the "crash" (the
//!   process forgets the image without closing it) and the dirty bytes counted. QEMU leaves
//!   every bitmap in use after a crash: its next backup reads the whole disk.
//! * manage: management calls on a 1 TiB image with 8 enabled bitmaps holding 1% dirt,
//!   durable (each call is a store) against ordinary.

use std::ffi::CString;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::ptr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use qdirty::ffi::{
    qdirty_image, qdirty_image_add_bitmap, qdirty_image_close, qdirty_image_open,
    qdirty_image_open_durable, qdirty_image_prepare_write, qdirty_image_set_dirty,
    QDIRTY_BITMAP_PERSISTENT, QDIRTY_OPEN_RDWR,
};
use qdirty::{AddOptions, Image, OpenOptions};
use qdirty_testkit::{bench, Prng};

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
const TIB: u64 = 1 << 40;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn dir() -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("durable-bench-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

struct Img(*mut qdirty_image);
// SAFETY: a qdirty_image may be used from any thread.
unsafe impl Send for Img {}
unsafe impl Sync for Img {}

fn c_open(path: &Path, durable: bool, zone: u64) -> Img {
    let p = CString::new(path.to_str().unwrap()).unwrap();
    let mut err = ptr::null_mut();
    // SAFETY: valid arguments.
    let img = unsafe {
        if durable {
            qdirty_image_open_durable(p.as_ptr(), zone, &mut err)
        } else {
            qdirty_image_open(p.as_ptr(), QDIRTY_OPEN_RDWR, &mut err)
        }
    };
    assert!(!img.is_null(), "open failed");
    Img(img)
}

fn c_add(img: &Img, name: &str) {
    let n = CString::new(name).unwrap();
    let mut err = ptr::null_mut();
    // SAFETY: valid arguments.
    let b = unsafe {
        qdirty_image_add_bitmap(img.0, n.as_ptr(), 65536, QDIRTY_BITMAP_PERSISTENT, &mut err)
    };
    assert!(!b.is_null(), "add failed");
}

fn c_close(img: Img) {
    let mut err = ptr::null_mut();
    // SAFETY: valid arguments; the image is not used afterwards.
    assert_eq!(unsafe { qdirty_image_close(img.0, &mut err) }, 0);
}

fn prepare(img: &Img, off: u64, len: u64) {
    let mut err = ptr::null_mut();
    // SAFETY: valid arguments.
    let rc = unsafe { qdirty_image_prepare_write(img.0, off, len, &mut err) };
    assert_eq!(rc, 0, "prepare_write failed");
}

fn fresh(d: &Path, name: &str, size: u64) -> PathBuf {
    let p = d.join(name);
    let _ = std::fs::remove_file(&p);
    Image::create(&p, size, 0).unwrap();
    p
}

/// Random 4 KiB offsets within the first `span` bytes.
fn offsets(seed: u64, n: usize, span: u64) -> Vec<u64> {
    let mut r = Prng::new(seed);
    (0..n).map(|_| r.below(span / 4096) * 4096).collect()
}

fn section_prepare(d: &Path) {
    const N: usize = 2_000_000;
    const SPAN: u64 = 16 * GIB;
    println!("\n## prepare (1 TiB, 1 enabled bitmap, random 4 KiB writes in 16 GiB of covered zones; median of 5)\n");
    let pd = fresh(d, "prep-d.qcow2", TIB);
    let po = fresh(d, "prep-o.qcow2", TIB);
    let dimg = c_open(&pd, true, 16 * MIB);
    let oimg = c_open(&po, false, 0);
    c_add(&dimg, "a");
    c_add(&oimg, "a");
    // Cover the span: one prepare per zone.
    for z in 0..SPAN / (16 * MIB) {
        prepare(&dimg, z * 16 * MIB, 4096);
        // SAFETY: valid image.
        unsafe { qdirty_image_set_dirty(dimg.0, z * 16 * MIB, 4096) };
    }
    let offs = offsets(7, N, SPAN);
    let per = |f: &dyn Fn(u64)| {
        median(
            (0..5)
                .map(|_| {
                    let t = Instant::now();
                    for &o in &offs {
                        f(o);
                    }
                    t.elapsed().as_nanos() as f64 / N as f64
                })
                .collect(),
        )
    };
    // SAFETY (closures below): valid images.
    let hook_o = per(&|o| unsafe { qdirty_image_set_dirty(oimg.0, o, 4096) });
    let pair_d = per(&|o| {
        prepare(&dimg, o, 4096);
        unsafe { qdirty_image_set_dirty(dimg.0, o, 4096) }
    });
    let prep_d = per(&|o| prepare(&dimg, o, 4096));
    // The prepares above left writes in flight: complete them (the hook's durable side).
    for _ in 0..5 {
        for &o in &offs {
            // SAFETY: valid image.
            unsafe { qdirty_image_set_dirty(dimg.0, o, 4096) };
        }
    }
    // 4 threads, each its own offsets.
    let threads = |img: &Img, with_prepare: bool| {
        let done = AtomicU64::new(0);
        let t = Instant::now();
        std::thread::scope(|s| {
            for k in 0..4 {
                let (img, done) = (img, &done);
                s.spawn(move || {
                    let offs = offsets(100 + k, N / 4, SPAN);
                    for &o in &offs {
                        if with_prepare {
                            prepare(img, o, 4096);
                        }
                        // SAFETY: valid image.
                        unsafe { qdirty_image_set_dirty(img.0, o, 4096) };
                    }
                    done.fetch_add(offs.len() as u64, Ordering::Relaxed);
                });
            }
        });
        t.elapsed().as_nanos() as f64 / done.load(Ordering::Relaxed) as f64
    };
    let thr_o = median((0..5).map(|_| threads(&oimg, false)).collect());
    let thr_d = median((0..5).map(|_| threads(&dimg, true)).collect());
    // prepare_write alone from 4 threads (the writes stay in flight; completed below).
    let prep4 = median(
        (0..5)
            .map(|r| {
                let t = Instant::now();
                std::thread::scope(|s| {
                    for k in 0..4 {
                        let img = &dimg;
                        s.spawn(move || {
                            for &o in &offsets(200 + 10 * r + k, N / 4, SPAN) {
                                prepare(img, o, 4096);
                            }
                        });
                    }
                });
                t.elapsed().as_nanos() as f64 / N as f64
            })
            .collect(),
    );
    for r in 0..5u64 {
        for k in 0..4 {
            for &o in &offsets(200 + 10 * r + k, N / 4, SPAN) {
                // SAFETY: valid image.
                unsafe { qdirty_image_set_dirty(dimg.0, o, 4096) };
            }
        }
    }
    println!("| Case | ns per write |");
    println!("|---|---|");
    println!("| hook alone, ordinary mode, 1 thread | {hook_o:.1} |");
    println!("| prepare_write alone (covered zone), durable, 1 thread | {prep_d:.1} |");
    println!("| prepare_write + hook, durable, 1 thread | {pair_d:.1} |");
    println!("| hook alone, ordinary mode, 4 threads (wall time per write) | {thr_o:.1} |");
    println!("| prepare_write + hook, durable, 4 threads (wall time per write) | {thr_d:.1} |");
    println!("| prepare_write alone (covered zone), durable, 4 threads (wall time per call) | {prep4:.1} |");
    println!("\nprepare_write on a covered zone: {prep_d:.1} ns; durable pair against the ordinary hook: +{:.1} ns", pair_d - hook_o);
    c_close(dimg);
    c_close(oimg);
}

fn section_writers(d: &Path) {
    println!("\n## writers (fresh 1 TiB, 8 enabled bitmaps, 4 threads, random 4 KiB guest writes into a raw file)\n");
    let run = |durable: bool, span: u64, n: usize, seed: u64, img: &Img, data: &File| -> f64 {
        let t = Instant::now();
        std::thread::scope(|s| {
            for k in 0..4u64 {
                s.spawn(move || {
                    let buf = [0x5au8; 4096];
                    for &o in &offsets(seed + k, n / 4, span) {
                        if durable {
                            prepare(img, o, 4096);
                        }
                        data.write_all_at(&buf, o).unwrap();
                        // SAFETY: valid image.
                        unsafe { qdirty_image_set_dirty(img.0, o, 4096) };
                    }
                });
            }
        });
        n as f64 / t.elapsed().as_secs_f64()
    };
    // Both images open at once; the rounds alternate between them, so that a busy machine
    // slows both alike.
    let mut imgs = Vec::new();
    for durable in [false, true] {
        let p = fresh(d, if durable { "w-d.qcow2" } else { "w-o.qcow2" }, TIB);
        let data = File::create(d.join(if durable { "w-d.raw" } else { "w-o.raw" })).unwrap();
        data.set_len(TIB).unwrap();
        let img = c_open(&p, durable, 16 * MIB);
        for b in 0..8 {
            c_add(&img, &format!("b{b}"));
        }
        imgs.push((durable, img, data));
    }
    // Filling: random writes over the whole disk (almost every write meets a new zone).
    let fill_n = 8_000;
    let mut fill = Vec::new();
    for (durable, img, data) in &imgs {
        let t = Instant::now();
        let rate = run(*durable, TIB, fill_n, 1, img, data);
        fill.push((rate, t.elapsed().as_secs_f64()));
    }
    // Covered: writes in 16 GiB, covered by a first pass, then alternating rounds.
    let span = 16 * GIB;
    for (durable, img, data) in &imgs {
        run(*durable, span, 400_000, 2, img, data);
    }
    let mut covered = [Vec::new(), Vec::new()];
    let mut ratios = Vec::new();
    for r in 0..9 {
        let mut pair = [0.0; 2];
        // Each round in the other order, so that neither side is always second.
        let order: [usize; 2] = if r % 2 == 0 { [0, 1] } else { [1, 0] };
        for k in order {
            let (durable, img, data) = &imgs[k];
            // The offsets of the covering pass: the data file's pages exist already, so the
            // rounds measure the steady state, not the page cache growing.
            pair[k] = run(*durable, span, 200_000, 2, img, data);
            covered[k].push(pair[k]);
        }
        ratios.push(pair[1] / pair[0]);
    }
    let (co, cd) = (median(covered[0].clone()), median(covered[1].clone()));
    let ratio = median(ratios);
    for (_, img, _) in imgs {
        c_close(img);
    }
    println!("| Phase | ordinary (writes/s) | durable (writes/s) | durable/ordinary |");
    println!("|---|---|---|---|");
    println!(
        "| filling: {fill_n} writes over 1 TiB (each in a new 16 MiB zone: one write into the 8 bitmaps and a flush) | {:.0} | {:.0} | {:.3} |",
        fill[0].0,
        fill[1].0,
        fill[1].0 / fill[0].0
    );
    println!(
        "| covered: 200 000 writes in 16 GiB of covered zones (median of 9 alternating rounds; ratio: median of the per-round ratios) | {co:.0} | {cd:.0} | {ratio:.3} |"
    );
    println!(
        "\nzone commits per second while filling: about {:.0} (at most {fill_n} commits in {:.2} s, each one write per bitmap and a flush; threads that meet uncovered zones together share a commit)",
        fill_n as f64 / fill[1].1,
        fill[1].1
    );
}

fn section_backup(d: &Path) {
    println!("\n## backup after a crash (1 TiB, 1% written in 1 MiB runs, one bitmap at 64 KiB)\n");
    let runs_total = (TIB / 100 / MIB) as usize;
    let clustered = {
        let mut r = Prng::new(99);
        let mut v = Vec::new();
        while v.len() < runs_total {
            let start = r.below(TIB / MIB - 200);
            let n = 1 + r.below(200);
            for k in 0..n {
                v.push((start + k) * MIB);
            }
        }
        v.truncate(runs_total);
        v
    };
    let uniform: Vec<u64> = {
        let mut r = Prng::new(77);
        (0..runs_total).map(|_| r.below(TIB / MIB) * MIB).collect()
    };
    println!("| Zone size | clustered: read after crash | clustered: zone commits | uniform: read after crash | uniform: zone commits |");
    println!("|---|---|---|---|---|");
    for zone in [MIB, 4 * MIB, 16 * MIB, 64 * MIB, 256 * MIB] {
        let mut cells = Vec::new();
        for (k, runs) in [&clustered, &uniform].into_iter().enumerate() {
            let p = fresh(d, &format!("bk{k}.qcow2"), TIB);
            let mut img = OpenOptions::new()
                .read_write(true)
                .durable(true)
                .zone_bytes(zone)
                .open(&p)
                .unwrap();
            img.add_bitmap(
                b"inc",
                65536,
                AddOptions {
                    persistent: true,
                    ..AddOptions::default()
                },
            )
            .unwrap();
            for &o in runs {
                img.prepare_write(o, MIB).unwrap();
                img.set_dirty(o, MIB);
            }
            let commits = img.zone_tracker().unwrap().covered_zones();
            // The crash: the process forgets the image.
            std::mem::forget(img);
            let mut after = OpenOptions::new().force_share(true).open(&p).unwrap();
            let id = after.find_bitmap(b"inc").unwrap();
            let count = after.bitmap_current(id).unwrap().count();
            assert!(!after.bitmap(id).unwrap().inconsistent());
            cells.push(format!("{:.2}%", 100.0 * count as f64 / TIB as f64));
            cells.push(format!("{commits}"));
        }
        println!("| {} MiB | {} |", zone / MIB, cells.join(" | "));
    }
    println!("\nQEMU after a crash: every bitmap in use, the next backup reads 100% of the disk. Exact bits (no crash): 1.00%.");
}

fn section_manage(d: &Path) {
    println!("\n## manage (1 TiB, 8 enabled bitmaps with 1% dirt; median of 7 calls)\n");
    let mut rows = Vec::new();
    for durable in [false, true] {
        let p = fresh(d, if durable { "m-d.qcow2" } else { "m-o.qcow2" }, TIB);
        let mut img = OpenOptions::new()
            .read_write(true)
            .durable(durable)
            .open(&p)
            .unwrap();
        let opts = AddOptions {
            persistent: true,
            ..AddOptions::default()
        };
        for b in 0..8 {
            img.add_bitmap(format!("b{b}").as_bytes(), 65536, opts)
                .unwrap();
        }
        let mut r = Prng::new(5);
        for _ in 0..(TIB / 100 / MIB) {
            let o = r.below(TIB / MIB) * MIB;
            img.prepare_write(o, MIB).unwrap();
            img.set_dirty(o, MIB);
        }
        img.store_bitmaps().unwrap();
        let time = |img: &mut Image, f: &dyn Fn(&mut Image)| {
            median(
                (0..7)
                    .map(|_| {
                        let t = Instant::now();
                        f(img);
                        t.elapsed().as_secs_f64() * 1e3
                    })
                    .collect(),
            )
        };
        let disable_enable = time(&mut img, &|img| {
            let id = img.find_bitmap(b"b7").unwrap();
            img.bitmap_mut(id).unwrap().disable().unwrap();
            img.sync_durable().unwrap();
            img.bitmap_mut(id).unwrap().enable().unwrap();
            img.sync_durable().unwrap();
        }) / 2.0;
        let add_remove = time(&mut img, &|img| {
            img.add_bitmap(b"tmp", 65536, opts).unwrap();
            img.remove_bitmap(b"tmp").unwrap();
        }) / 2.0;
        let merge = time(&mut img, &|img| img.merge_bitmap(b"b6", b"b5").unwrap());
        let clear = time(&mut img, &|img| {
            let id = img.find_bitmap(b"b4").unwrap();
            img.bitmap_mut(id).unwrap().clear().unwrap();
            img.sync_durable().unwrap();
        });
        rows.push((disable_enable, add_remove, merge, clear));
        img.close().unwrap();
    }
    println!("| Call | ordinary (ms) | durable (ms, includes the store) |");
    println!("|---|---|---|");
    let (o, dd) = (rows[0], rows[1]);
    println!("| disable or enable | {:.3} | {:.3} |", o.0, dd.0);
    println!("| add or remove (persistent) | {:.3} | {:.3} |", o.1, dd.1);
    println!(
        "| merge (same bits: nothing to write) | {:.3} | {:.3} |",
        o.2, dd.2
    );
    println!("| clear | {:.3} | {:.3} |", o.3, dd.3);
}

fn main() {
    qdirty::warning::set_warning_handler(Some(Box::new(|_| {})));
    let sections = bench::sections();
    let want = |s: &str| bench::wants(&sections, s);
    let d = dir();
    println!("{}", bench::banner("durable"));
    let t = Instant::now();
    if want("prepare") {
        section_prepare(&d);
    }
    if want("writers") {
        section_writers(&d);
    }
    if want("backup") {
        section_backup(&d);
    }
    if want("manage") {
        section_manage(&d);
    }
    let _ = std::fs::remove_dir_all(&d);
    println!(
        "\n(total {:.1} s, load average at end: {})",
        t.elapsed().as_secs_f64(),
        bench::load_average()
    );
}
