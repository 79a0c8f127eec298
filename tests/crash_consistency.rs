//! Crash consistency by fault injection (docs/crash-safety.md, 'Crash enumeration'): every write
//! and flush of each operation is a crash point, with several fates for the writes not yet flushed
//! and 512-byte tearing of the write in progress (`qdirty::image::fault`). Every crash state must
//! reopen in qdirty (read-only and read-write), pass qdirty's check and `qemu-img check` (no
//! corruption; leaks only in clusters the operation allocated or freed, and `-r leaks` cleans
//! them), and every bitmap must have its old content, its new content, or be in_use: never wrong
//! bits that claim to be consistent. Expected contents are computed from the test's own model.
//!
//! `qemu-img check` runs on every state when QDIRTY_CRASH_FULL=1 (CI) and on a deterministic
//! subset (every 7th state, first and last) otherwise; qdirty's own checks run on all states.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashSet};

use common::*;
use qdirty::image::check::check_bitmaps;
use qdirty::image::fault::{Fault, FaultyStorage, Op, Unflushed, SECTOR};
use qdirty::image::storage::MemStorage;
use qdirty::{AddOptions, Image};

const MIB: u64 = 1 << 20;

fn quiet() {
    qdirty::warning::set_warning_handler(Some(Box::new(|_| {})));
}

fn full() -> bool {
    std::env::var("QDIRTY_CRASH_FULL").as_deref() == Ok("1")
}

/// What a bitmap must look like: consistent with this content and auto flag, or in_use.
#[derive(Clone, Debug, PartialEq, Eq)]
enum St {
    Consistent { sha: String, auto: bool },
    InUse,
}

type Expect = BTreeMap<String, St>;

/// A bitmap of the model: name, granularity, dirty ranges, enabled.
#[derive(Clone, Debug)]
struct Model {
    name: String,
    g: u64,
    ranges: Vec<(u64, u64)>,
    enabled: bool,
}

/// SHA-256 of the bits of a model bitmap, computed on a standalone (memory) bitmap.
fn model_sha(size: u64, m: &Model) -> String {
    let mut img = Image::new_memory(size);
    let id = img
        .add_bitmap(m.name.as_bytes(), m.g, AddOptions::default())
        .unwrap();
    let bm = img.bitmap_mut(id).unwrap();
    for &(o, l) in &m.ranges {
        bm.set_dirty(o, l).unwrap();
    }
    bm.sha256().unwrap()
}

fn expect(size: u64, models: &[Model], in_use: &[&str]) -> Expect {
    let mut e: Expect = models
        .iter()
        .map(|m| {
            (
                m.name.clone(),
                St::Consistent {
                    sha: model_sha(size, m),
                    auto: m.enabled,
                },
            )
        })
        .collect();
    for n in in_use {
        e.insert(n.to_string(), St::InUse);
    }
    e
}

/// One operation to crash: a base image and what is done to it after a read-write open (the
/// open and the final close are part of the operation).
/// The operation a scenario runs on the opened image.
type ScenarioOp = Box<dyn Fn(&mut Image) -> qdirty::Result<()>>;

struct Scenario {
    name: &'static str,
    base: Vec<u8>,
    /// Directory holding the backing file, if any (the crash images are written there).
    dir: TempDir,
    op: ScenarioOp,
    before: Expect,
    after: Expect,
    /// Further consistent snapshots the operation commits on the way (store_bitmaps).
    mids: Vec<Expect>,
    /// Check the reopened images' content too (slow for big images): always true here.
    heavy: bool,
}

fn run_op(s: &Scenario, storage: FaultyStorage) -> qdirty::Result<()> {
    let mut img = Image::open_storage(Box::new(storage), "crash", true)?;
    (s.op)(&mut img)?;
    img.close()
}

/// The bitmaps of an image as qdirty sees them (read-only open).
fn observe(bytes: &[u8]) -> Result<Expect, String> {
    let mut img = Image::open_storage(
        Box::new(MemStorage {
            data: bytes.to_vec(),
        }),
        "observe",
        false,
    )
    .map_err(|e| format!("read-only open failed: {e}"))?;
    Ok(img
        .bitmap_ids()
        .into_iter()
        .map(|id| img.bitmap_current(id).unwrap().clone())
        .map(|b| {
            let st = if b.inconsistent() {
                St::InUse
            } else {
                St::Consistent {
                    sha: b.sha256().unwrap(),
                    auto: b.enabled(),
                }
            };
            (bm_name(&b), st)
        })
        .collect())
}

/// Refcount of every cluster (simple reader: enough for the images of this test).
fn refcounts(img: &[u8]) -> Vec<u64> {
    let cb = be_u32(img, 20);
    let cs = 1usize << cb;
    let order = be_u32(img, 96);
    let bits = 1usize << order;
    let epb = cs * 8 / bits;
    let rt = be_u64(img, 48) as usize;
    let rtc = be_u32(img, 56) as usize;
    let nclusters = img.len().div_ceil(cs);
    let mut out = vec![0u64; nclusters];
    for i in 0..rtc * cs / 8 {
        let Some(b) = img.get(rt + i * 8..rt + i * 8 + 8) else {
            break;
        };
        let blk = (be_u64(b, 0) & !511) as usize;
        if blk == 0 || blk + cs > img.len() {
            continue;
        }
        for j in 0..epb {
            let c = i * epb + j;
            if c >= nclusters {
                break;
            }
            let bit = j * bits;
            let v = if bits >= 8 {
                let mut v = 0u64;
                for k in 0..bits / 8 {
                    v = (v << 8) | u64::from(img[blk + bit / 8 + k]);
                }
                v
            } else {
                (u64::from(img[blk + bit / 8]) >> (bit % 8)) & ((1 << bits) - 1)
            };
            out[c] = v;
        }
    }
    out
}

#[derive(Default)]
struct Stats {
    points: u64,
    states: u64,
    unique: u64,
    qemu_checked: u64,
    qemu_leaks: u64,
    leaky: u64,
}

/// Validates one crash state; returns a description of what is wrong.
fn validate(
    s: &Scenario,
    img: &[u8],
    touched: &HashSet<u64>,
    run_qemu: bool,
    stats: &mut Stats,
) -> Result<(), String> {
    // (c) contents: every bitmap old, new, or in_use; the name set is the old or the new one.
    let seen = observe(img)?;
    let names: BTreeSet<&String> = seen.keys().collect();
    let allowed: Vec<&Expect> = std::iter::once(&s.before)
        .chain(&s.mids)
        .chain(std::iter::once(&s.after))
        .collect();
    // A state where the bitmaps bit is clear has no bitmaps at all (every one inconsistent):
    // allowed, it only leaks.
    if !names.is_empty()
        && !allowed
            .iter()
            .any(|e| e.keys().collect::<BTreeSet<_>>() == names)
    {
        return Err(format!(
            "bitmaps {names:?}, expected the names of {allowed:?}"
        ));
    }
    for (n, st) in &seen {
        if let St::Consistent { .. } = st {
            let ok = allowed.iter().any(|e| e.get(n) == Some(st));
            if !ok {
                return Err(format!(
                    "bitmap {n} claims to be consistent with wrong content or flags: {st:?}; \
                     before {:?}, after {:?}",
                    s.before.get(n),
                    s.after.get(n)
                ));
            }
        }
    }
    // (b) qdirty's check on a file: no corruption; leaks only in clusters the operation
    // allocated or freed; repair leaves it clean and the bitmaps unchanged.
    let path = s.dir.join("crash.qcow2");
    std::fs::write(&path, img).unwrap();
    let rep = check_bitmaps(&path, false).map_err(|e| format!("qdirty check failed: {e}"))?;
    if rep.corruptions != 0 || rep.check_errors != 0 {
        return Err(format!(
            "qdirty check: corruptions {}: {:?}",
            rep.corruptions, rep.messages
        ));
    }
    for m in &rep.mismatches {
        // Clusters of a stale extension (bitmaps bit clear, as QEMU's in_use marking leaves
        // it for a moment) leak as a whole: QEMU's protocol, repaired by check -r.
        let stale = m.owner == qdirty::image::check::Owner::StaleBitmaps;
        if !m.is_leak() || !(stale || touched.contains(&m.cluster)) {
            return Err(format!(
                "leak in a cluster the operation did not touch: {m:?}"
            ));
        }
    }
    if rep.leaks > 0 {
        stats.leaky += 1;
    }
    if run_qemu {
        stats.qemu_checked += 1;
        let c = qemu_img_check(&path);
        if c.exit_code != 0 && c.exit_code != 3 || c.corruptions != 0 || c.check_errors != 0 {
            return Err(format!("QEMU: {c}"));
        }
        if c.leaks != rep.leaks {
            return Err(format!(
                "QEMU counts {} leaks, qdirty {}",
                c.leaks, rep.leaks
            ));
        }
        if c.leaks > 0 {
            stats.qemu_leaks += 1;
            let r = qemu_img_check_args(&path, &["-r", "leaks"]);
            if r.corruptions != 0 {
                return Err(format!("QEMU -r leaks: {r}"));
            }
            let c2 = qemu_img_check(&path);
            if !c2.clean() {
                return Err(format!("QEMU after -r leaks: {c2}"));
            }
            let after_repair = observe(&std::fs::read(&path).unwrap())?;
            if after_repair != seen {
                return Err("bitmaps changed by qemu-img check -r leaks".into());
            }
        }
    }
    if rep.leaks > 0 {
        let rep2 = check_bitmaps(&path, true).map_err(|e| format!("qdirty repair: {e}"))?;
        if rep2.leaks != 0 || rep2.corruptions != 0 {
            return Err(format!("qdirty repair left {rep2:?}"));
        }
    }
    // (a) reopen read-write, change nothing, close: must work and stay consistent.
    if s.heavy {
        let mut rw =
            Image::open_storage(Box::new(MemStorage { data: img.to_vec() }), "reopen", true)
                .map_err(|e| format!("read-write open failed: {e}"))?;
        rw.fold_writes();
        rw.close()
            .map_err(|e| format!("close after read-write open: {e}"))?;
    }
    Ok(())
}

/// Enumerates every crash point of the scenario and validates every distinct state.
fn enumerate(s: &Scenario) -> Stats {
    quiet();
    let mut stats = Stats::default();
    // The complete run: the op log and the final image.
    let (st, h) = FaultyStorage::new(s.base.clone());
    run_op(s, st).unwrap_or_else(|e| panic!("{}: the operation fails without fault: {e}", s.name));
    let log = h.log();
    let final_img = h.live_image();
    assert_eq!(
        observe(&final_img).unwrap(),
        s.after,
        "{}: final state",
        s.name
    );
    assert_eq!(
        observe(&s.base).unwrap(),
        s.before,
        "{}: base state",
        s.name
    );
    // Clusters the operation allocated, freed or wrote: the only ones allowed to leak.
    let cs = 1u64 << be_u32(&s.base, 20);
    let (rc_before, rc_after) = (refcounts(&s.base), refcounts(&final_img));
    let mut touched: HashSet<u64> = (0..rc_before.len().max(rc_after.len()) as u64)
        .filter(|&c| {
            rc_before.get(c as usize).copied().unwrap_or(0) == 0
                || rc_after.get(c as usize).copied().unwrap_or(0) == 0
        })
        .collect();
    for op in &log {
        if let Op::Write { offset, len } = op {
            touched.extend(offset / cs..(offset + len).div_ceil(cs));
        }
    }
    let qemu = have_tool("qemu-img") && require_qemu(s.name);
    // Crash points: op k for every k, and after the last op.
    let mut states: Vec<(String, Vec<u8>)> = Vec::new();
    for k in 0..=log.len() {
        stats.points += 1;
        let sectors = match log.get(k) {
            Some(Op::Write { offset, len }) => (offset + len).div_ceil(SECTOR) - offset / SECTOR,
            _ => 0,
        };
        let mut variants = vec![
            (Unflushed::Kept, 0),
            (Unflushed::Lost, 0),
            (Unflushed::Random(k as u64), 0),
        ];
        if sectors > 1 {
            variants.push((Unflushed::Kept, 1));
            variants.push((Unflushed::Lost, 1));
            variants.push((
                Unflushed::Random(k as u64 + 7),
                1 + (k as u64 % (sectors - 1)),
            ));
            variants.push((Unflushed::Kept, sectors - 1));
        }
        for (unflushed, torn) in variants {
            if k == log.len() {
                states.push((format!("k={k} (complete)"), final_img.clone()));
                break;
            }
            let (st, h) = FaultyStorage::new(s.base.clone());
            h.set_fault(Some(Fault::Crash {
                at: k as u64,
                unflushed,
                torn_sectors: torn,
            }));
            // A crash after the commit point may go unreported: the store stands, and failing
            // to free the old clusters afterwards only leaks them (a warning). The crashed image
            // is checked below either way.
            let _ = run_op(s, st);
            let img = h.crashed_image().expect("crashed");
            states.push((format!("k={k} {:?} {unflushed:?} torn {torn}", log[k]), img));
        }
    }
    let mut seen = HashSet::new();
    let mut unique: Vec<(String, Vec<u8>)> = Vec::new();
    for (d, img) in states {
        stats.states += 1;
        if seen.insert(img.clone()) {
            unique.push((d, img));
        }
    }
    stats.unique = unique.len() as u64;
    let n = unique.len();
    let mut bad = Vec::new();
    for (i, (d, img)) in unique.iter().enumerate() {
        let run_qemu = qemu && (full() || i % 7 == 0 || i == n - 1);
        if let Err(e) = validate(s, img, &touched, run_qemu, &mut stats) {
            bad.push(format!("{d}: {e}"));
        }
    }
    eprintln!(
        "{}: {} ops, {} crash points, {} crash states ({} distinct), {} with leaks, qemu-img \
         check on {} ({} with leaks, repaired)",
        s.name,
        log.len(),
        stats.points,
        stats.states,
        stats.unique,
        stats.leaky,
        stats.qemu_checked,
        stats.qemu_leaks
    );
    assert!(
        bad.is_empty(),
        "{}: {} bad crash states:\n{}",
        s.name,
        bad.len(),
        bad.join("\n")
    );
    stats
}

// ------------------------------------------------------------------------------------------
// Base images
// ------------------------------------------------------------------------------------------

/// A blank image made by qdirty.
fn blank(dir: &TempDir, size: u64, cs: u32) -> Vec<u8> {
    let p = dir.join("base.qcow2");
    let _ = std::fs::remove_file(&p);
    Image::create(&p, size, cs).unwrap();
    std::fs::read(&p).unwrap()
}

/// A blank image with a backing file, made by qemu-img (None without QEMU).
fn blank_with_backing(dir: &TempDir, size: u64, opts: &str) -> Option<Vec<u8>> {
    if !have_tool("qemu-img") {
        return None;
    }
    let back = dir.join("backing.qcow2");
    qemu_img_create(&back, size, opts, &[]);
    let p = dir.join("base.qcow2");
    run_ok(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            opts,
            "-b",
            "backing.qcow2",
            "-F",
            "qcow2",
            "base.qcow2",
        ],
        dir.path(),
    );
    Some(std::fs::read(p).unwrap())
}

/// Applies `models` to `base` with qdirty (adds them persistent, marks their ranges, closes);
/// the `in_use` bitmaps are added too and then left in_use, as a crash leaves them: a second
/// read-write open marks everything in_use, the in_use ones are dropped from memory (their
/// stored copies stay marked) and the close stores the others.
fn populate(base: Vec<u8>, models: &[Model], in_use: &[&str]) -> Vec<u8> {
    let (st, h) = FaultyStorage::new(base);
    let mut img = Image::open_storage(Box::new(st), "base", true).unwrap();
    for n in in_use {
        let id = qd_add(&mut img, n, 0, false);
        img.bitmap_mut(id).unwrap().set_dirty(0, 512).unwrap();
    }
    for m in models {
        let id = qd_add(&mut img, &m.name, m.g, !m.enabled);
        let bm = img.bitmap_mut(id).unwrap();
        for &(o, l) in &m.ranges {
            bm.set_dirty(o, l).unwrap();
        }
    }
    img.close().unwrap();
    let data = h.live_image();
    if in_use.is_empty() {
        return data;
    }
    let (st, h) = FaultyStorage::new(data);
    let mut img = Image::open_storage(Box::new(st), "base", true).unwrap();
    for n in in_use {
        let id = img.find_bitmap(n.as_bytes()).unwrap();
        img.release_bitmap(id).unwrap();
    }
    img.close().unwrap();
    h.live_image()
}

fn model(name: &str, g: u64, ranges: &[(u64, u64)], enabled: bool) -> Model {
    Model {
        name: name.into(),
        g,
        ranges: ranges.to_vec(),
        enabled,
    }
}

fn with_ranges(m: &Model, extra: &[(u64, u64)]) -> Model {
    let mut m = m.clone();
    if m.enabled {
        m.ranges.extend_from_slice(extra);
    }
    m
}

// ------------------------------------------------------------------------------------------
// Scenarios
// ------------------------------------------------------------------------------------------

const SIZE: u64 = 64 * MIB;

fn run(s: Scenario) {
    let _ = enumerate(&s);
}

/// Open read-write (in_use marking of 3 bitmaps) and close without changes: the store
/// rewrites every bitmap.
#[test]
fn crash_open_rw_and_close() {
    let dir = TempDir::new("crash_open");
    let ms = vec![
        model("b1", 65536, &[(0, 65536), (5 * MIB, 3 * MIB)], true),
        model("b2", 65536, &[(MIB, 4096)], false),
        model("b3", 4096, &[(40 * MIB, MIB)], true),
    ];
    let base = populate(blank(&dir, SIZE, 65536), &ms, &[]);
    run(Scenario {
        name: "open-rw+close",
        base,
        dir,
        op: Box::new(|_| Ok(())),
        before: expect(SIZE, &ms, &[]),
        mids: Vec::new(),
        after: expect(SIZE, &ms, &[]),
        heavy: true,
    });
}

/// Store on close with several bitmaps: enabled ones get new bits, a disabled one keeps its
/// own, one was left in_use by an earlier crash, one is new.
#[test]
fn crash_store_on_close() {
    let dir = TempDir::new("crash_store");
    let ms = vec![
        model("b1", 65536, &[(0, 65536)], true),
        model("b2", 65536, &[(MIB, 4096)], false),
    ];
    let base = populate(blank(&dir, SIZE, 65536), &ms, &["stale"]);
    let w = [(2 * MIB, 65536), (60 * MIB, 4 * MIB)];
    let mut after: Vec<Model> = ms.iter().map(|m| with_ranges(m, &w)).collect();
    after.push(model("b4", 65536, &[(3 * MIB, 1)], true));
    after.last_mut().unwrap().ranges.extend_from_slice(&w);
    run(Scenario {
        name: "store-on-close",
        base,
        dir,
        op: Box::new(move |img| {
            let id = img.add_bitmap(
                b"b4",
                65536,
                AddOptions {
                    persistent: true,
                    ..AddOptions::default()
                },
            )?;
            img.bitmap_mut(id).unwrap().set_dirty(3 * MIB, 1)?;
            for (o, l) in w {
                img.set_dirty(o, l);
            }
            Ok(())
        }),
        before: expect(SIZE, &ms, &["stale"]),
        mids: Vec::new(),
        after: expect(SIZE, &after, &["stale"]),
        heavy: true,
    });
}

/// The operation "add the model's bitmap, persistent, and set its ranges" (then the store on
/// close writes it).
fn add_persistent(m: &Model) -> ScenarioOp {
    let mm = m.clone();
    Box::new(move |img| {
        let id = img.add_bitmap(
            mm.name.as_bytes(),
            mm.g,
            AddOptions {
                persistent: true,
                ..AddOptions::default()
            },
        )?;
        for &(o, l) in &mm.ranges {
            img.bitmap_mut(id).unwrap().set_dirty(o, l)?;
        }
        Ok(())
    })
}

fn add_first(name: &'static str, dir: TempDir, base: Vec<u8>, size: u64) {
    let m = model("first", 65536, &[(0, MIB), (size - 65536, 65536)], true);
    run(Scenario {
        name,
        base,
        dir,
        op: add_persistent(&m),
        before: Expect::new(),
        mids: Vec::new(),
        after: expect(size, &[m], &[]),
        heavy: true,
    });
}

/// The first persistent bitmap: the extension appears (64 KiB clusters: header at 504, data
/// at 512; docs/crash-safety.md, 'Cluster-0 torn writes').
#[test]
fn crash_add_first_bitmap() {
    let dir = TempDir::new("crash_add");
    let base = blank(&dir, SIZE, 65536);
    add_first("add-first-64k", dir, base, SIZE);
}

/// The same with a backing file: the backing file name moves when the extension appears.
#[test]
fn crash_add_first_bitmap_backing() {
    let dir = TempDir::new("crash_add_b");
    let Some(base) = blank_with_backing(&dir, SIZE, "cluster_size=65536") else {
        return;
    };
    add_first("add-first-64k-backing", dir, base, SIZE);
}

fn remove(name: &'static str, dir: TempDir, base_blank: Vec<u8>, ms: Vec<Model>, which: &str) {
    let base = populate(base_blank, &ms, &[]);
    let after: Vec<Model> = ms.iter().filter(|m| m.name != which).cloned().collect();
    let which = which.to_string();
    run(Scenario {
        name,
        base,
        dir,
        op: Box::new(move |img| img.remove_bitmap(which.as_bytes())),
        before: expect(SIZE, &ms, &[]),
        mids: Vec::new(),
        after: expect(SIZE, &after, &[]),
        heavy: true,
    });
}

/// Removal of one of two bitmaps.
#[test]
fn crash_remove_one_of_two() {
    let dir = TempDir::new("crash_rm");
    let b = blank(&dir, SIZE, 65536);
    let ms = vec![
        model("keep", 65536, &[(0, MIB)], true),
        model("gone", 65536, &[(2 * MIB, MIB)], false),
    ];
    remove("remove-one-of-two", dir, b, ms, "gone");
}

/// Removal of the last bitmap: the extension disappears.
#[test]
fn crash_remove_last() {
    let dir = TempDir::new("crash_rm_last");
    let b = blank(&dir, SIZE, 65536);
    let ms = vec![model("only", 65536, &[(0, MIB), (9 * MIB, 1)], true)];
    remove("remove-last-64k", dir, b, ms, "only");
}

/// Removal of the last bitmap with a backing file.
#[test]
fn crash_remove_last_backing() {
    let dir = TempDir::new("crash_rm_lb");
    let Some(b) = blank_with_backing(&dir, SIZE, "cluster_size=65536") else {
        return;
    };
    let ms = vec![model("only", 65536, &[(0, MIB)], true)];
    remove("remove-last-64k-backing", dir, b, ms, "only");
}

/// Merge of one bitmap into another, then close.
#[test]
fn crash_merge_and_close() {
    let dir = TempDir::new("crash_merge");
    let ms = vec![
        model("dst", 65536, &[(0, MIB)], false),
        model("src", 4096, &[(8 * MIB, 12288), (30 * MIB, MIB)], false),
    ];
    let base = populate(blank(&dir, SIZE, 65536), &ms, &[]);
    let mut dst = ms[0].clone();
    dst.ranges.extend_from_slice(&ms[1].ranges);
    let after = vec![dst, ms[1].clone()];
    run(Scenario {
        name: "merge+close",
        base,
        dir,
        op: Box::new(|img| img.merge_bitmap(b"dst", b"src")),
        before: expect(SIZE, &ms, &[]),
        mids: Vec::new(),
        after: expect(SIZE, &after, &[]),
        heavy: true,
    });
}

/// 512-byte clusters and enough bitmap data to need new refcount blocks (one block covers
/// 256 clusters here).
#[test]
fn crash_refblock_creation() {
    let dir = TempDir::new("crash_refblk");
    let size = 1u64 << 30;
    let base = blank(&dir, size, 512);
    // One bit every 2 MiB with granularity 512: one data cluster per 2 MiB.
    let ranges: Vec<(u64, u64)> = (0..512).map(|i| (i * 2 * MIB, 512)).collect();
    let m = model("big", 512, &ranges, true);
    let s = Scenario {
        name: "refblock-creation-512",
        base,
        dir,
        op: add_persistent(&m),
        before: Expect::new(),
        mids: Vec::new(),
        after: expect(size, &[m], &[]),
        heavy: true,
    };
    // The operation really creates refcount blocks.
    let (st, h) = FaultyStorage::new(s.base.clone());
    run_op(&s, st).unwrap();
    let blocks = |img: &[u8]| {
        let (t, n) = (be_u64(img, 48) as usize, be_u32(img, 56) as usize * 512 / 8);
        (0..n).filter(|i| be_u64(img, t + i * 8) != 0).count()
    };
    let (b0, b1) = (blocks(&s.base), blocks(&h.live_image()));
    assert!(b1 >= b0 + 2, "refcount blocks {b0} -> {b1}");
    run(s);
}

/// 512-byte clusters with 64-bit refcounts (one table cluster covers 4096 clusters = 2 MiB):
/// guest data fills the file close to that, the bitmap store grows the refcount table.
#[test]
fn crash_reftable_growth() {
    let dir = TempDir::new("crash_reftable");
    if !require_qemu("crash_reftable_growth") {
        return;
    }
    let size = 1u64 << 30;
    let p = dir.join("base.qcow2");
    qemu_img_create(&p, size, "cluster_size=512,refcount_bits=64", &[]);
    qemu_io_write(&p, &[(0, 1600 * 1024)]);
    let base = std::fs::read(&p).unwrap();
    let ranges: Vec<(u64, u64)> = (0..512).map(|i| (i * 2 * MIB, 512)).collect();
    let m = model("grow", 512, &ranges, true);
    let before_tc = be_u32(&base, 56);
    let s = Scenario {
        name: "reftable-growth-512",
        base,
        dir,
        op: add_persistent(&m),
        before: Expect::new(),
        mids: Vec::new(),
        after: expect(size, &[m], &[]),
        heavy: true,
    };
    // The operation really grows the table.
    let (st, h) = FaultyStorage::new(s.base.clone());
    run_op(&s, st).unwrap();
    let fin = h.live_image();
    assert!(
        be_u64(&fin, 48) != be_u64(&s.base, 48) && be_u32(&fin, 56) > before_tc,
        "the refcount table did not grow"
    );
    run(s);
}

/// Store without closing (store_bitmaps, incremental when the store is), more writes, close.
#[test]
fn crash_store_bitmaps_then_close() {
    let dir = TempDir::new("crash_incr");
    let ms = vec![
        model("a", 65536, &[(0, MIB)], true),
        model("b", 65536, &[(7 * MIB, MIB)], true),
        model("c", 65536, &[(9 * MIB, 65536)], false),
    ];
    let base = populate(blank(&dir, SIZE, 65536), &ms, &[]);
    let w1 = [(20 * MIB, 65536)];
    let w2 = [(33 * MIB, 131072)];
    let after: Vec<Model> = ms
        .iter()
        .map(|m| with_ranges(&with_ranges(m, &w1), &w2))
        .collect();
    let mid: Vec<Model> = ms.iter().map(|m| with_ranges(m, &w1)).collect();
    run(Scenario {
        name: "store_bitmaps+close",
        base,
        dir,
        op: Box::new(move |img| {
            for (o, l) in w1 {
                img.set_dirty(o, l);
            }
            img.store_bitmaps()?;
            for (o, l) in w2 {
                img.set_dirty(o, l);
            }
            Ok(())
        }),
        before: expect(SIZE, &ms, &[]),
        mids: vec![expect(SIZE, &mid, &[])],
        after: expect(SIZE, &after, &[]),
        heavy: true,
    });
}
