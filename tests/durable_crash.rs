//! Durable mode under crashes (README.md, 'Durable mode'): a workload of guest writes
//! (prepare_write, the write into an external raw data file, the hook) interleaved with
//! management calls, some of them while a prepared write has not completed, is crashed at
//! every write and flush of the image, with the unflushed writes kept, lost or kept at random
//! and the write in progress torn. Every crash state must be an image whose bitmaps are all
//! consistent and whose enabled bitmaps are dirty wherever the data file differs (sector by
//! sector) from the data at the bitmap's last clear; the disabled bitmap must hold exactly its
//! content; every management call that returned must show. qdirty judges every state; QEMU
//! (`qemu-img check`, `qemu-img info`, `qemu-nbd -B` + `nbdinfo --map`) judges every state
//! with QDIRTY_CRASH_FULL=1 (CI) and every 5th otherwise. It runs with qdirty's own allocator
//! and on the embedding path (a host allocator keeping the refcounts).

mod common;

use std::collections::BTreeMap;

use common::*;
use qdirty::image::fault::{Fault, FaultHandle, FaultyStorage, Unflushed};
use qdirty::image::storage::{ClusterAllocator, MemStorage, Storage};
use qdirty::image::Transaction;
use qdirty::{AddOptions, OpenOptions};

const MIB: u64 = 1 << 20;
const SIZE: u64 = 64 * MIB;
const ZONE: u64 = 4 * MIB;
const SECTOR: u64 = 512;

fn full() -> bool {
    std::env::var("QDIRTY_CRASH_FULL").as_deref() == Ok("1")
}

/// A guest write: offset, length, fill byte.
#[derive(Clone, Copy, Debug)]
struct W(u64, u64, u8);

/// One step of the workload.
#[derive(Clone, Debug)]
enum Step {
    Prepare(W),
    Issue(W),
    Complete(W),
    Add(&'static str, u64, bool),
    /// A backup of the bitmap was taken (the host flushed the data): clear it.
    Clear(&'static str),
    Merge(&'static str, &'static str),
    Enable(&'static str, bool),
    Remove(&'static str),
    /// A transaction: clear the first bitmap, add the second (64 KiB, enabled).
    TxnClearAdd(&'static str, &'static str),
    Store,
    Close,
}

fn workload() -> Vec<Step> {
    use Step::*;
    let w = |o, l, f| W(o, l, f);
    let (w1, w2, w3, w4) = (
        w(MIB, 64 << 10, 1),
        w(20 * MIB + 4096, 4096, 2),
        w(40 * MIB + 100, 8192, 3),
        w(41 * MIB, 4096, 4),
    );
    let (w5, w6, w7, w8) = (
        w(50 * MIB + 512, 1024, 5),
        w(9 * MIB, 16 << 10, 6),
        w(30 * MIB, 4096, 7),
        w(63 * MIB, MIB, 8),
    );
    let whole = |x| vec![Prepare(x), Issue(x), Complete(x)];
    let mut v = whole(w1);
    v.extend([Prepare(w2), Issue(w2), Add("c", 512, false), Complete(w2)]);
    v.extend(whole(w3));
    v.extend([Clear("a"), Prepare(w4), Issue(w4), Complete(w4)]);
    v.extend([Merge("d", "b"), Enable("b", false)]);
    v.extend(whole(w5));
    v.extend([Enable("b", true), Prepare(w6), Issue(w6)]);
    v.extend([TxnClearAdd("c", "e"), Complete(w6), Remove("d")]);
    v.extend([Prepare(w7), Issue(w7), Store, Complete(w7)]);
    v.extend(whole(w8));
    v.push(Close);
    v
}

/// The image before the workload: qcow2 (1 KiB or 64 KiB clusters) whose guest data lives in data.raw
/// (raw), with bitmaps made by QEMU: a (64 KiB), b (4 KiB), enabled; d (64 KiB) disabled
/// with one dirty extent written by QEMU.
fn base(dir: &TempDir, cluster_size: u64) -> Vec<u8> {
    let img = dir.path().join("img.qcow2");
    qemu_img_create(
        &img,
        SIZE,
        &format!("cluster_size={cluster_size},data_file=data.raw,data_file_raw=on"),
        &[],
    );
    qemu_img_bitmap_add(&img, "d", Some(65536), false);
    qemu_io_write(&img, &[(5 * MIB, 128 << 10)]);
    qemu_img_bitmap(&img, &["--disable"], "d");
    qemu_img_bitmap_add(&img, "a", Some(65536), false);
    qemu_img_bitmap_add(&img, "b", Some(4096), false);
    std::fs::read(&img).unwrap()
}

/// The data file when the workload starts: what qemu-io wrote for d.
fn base_data(dir: &TempDir) -> Vec<u8> {
    std::fs::read(dir.path().join("data.raw"))
        .map(|mut d| {
            d.resize(SIZE as usize, 0);
            d
        })
        .unwrap()
}

/// What the model knows at a crash point.
#[derive(Clone, Debug, Default)]
struct Truth {
    /// Per bitmap: whether it must exist (Some(true)), must not (Some(false)), or either (a
    /// call in progress).
    exists: BTreeMap<&'static str, Option<bool>>,
    /// Per bitmap: enabled (auto) when known.
    enabled: BTreeMap<&'static str, Option<bool>>,
    /// Per bitmap: the data it must be compared with (at its last clear, or add); two when a
    /// clear was in progress (either passes).
    refs: BTreeMap<&'static str, Vec<Vec<u8>>>,
    /// Ranges a bitmap need not cover (written while it was disabled).
    exempt: BTreeMap<&'static str, Vec<(u64, u64)>>,
}

/// Runs the workload against `storage` until the first error (a crash makes every later write
/// fail). Returns, per step, the image's op count before and after it, and the data file as
/// the guest writes left it (every write issued).
fn run(storage: Box<dyn Storage>, h: &FaultHandle, data0: &[u8]) -> (Vec<(u64, u64)>, Vec<u8>) {
    let mut spans = Vec::new();
    let mut data = data0.to_vec();
    let mut img = match OpenOptions::new()
        .read_write(true)
        .durable(true)
        .zone_bytes(ZONE)
        .open_storage(storage, "img.qcow2")
    {
        Ok(i) => Some(i),
        Err(_) => return (spans, data),
    };
    for step in workload() {
        let before = h.ops();
        let Some(i) = img.as_mut() else { break };
        let r: qdirty::Result<()> = match step {
            Step::Prepare(W(o, l, _)) => i.prepare_write(o, l),
            Step::Issue(W(o, l, f)) => {
                data[o as usize..(o + l) as usize].fill(f);
                Ok(())
            }
            Step::Complete(W(o, l, _)) => {
                i.set_dirty(o, l);
                Ok(())
            }
            Step::Add(n, g, disabled) => i
                .add_bitmap(
                    n.as_bytes(),
                    g,
                    AddOptions {
                        persistent: true,
                        disabled,
                        autoload: None,
                    },
                )
                .map(drop),
            Step::Clear(n) => {
                let id = i.find_bitmap(n.as_bytes()).unwrap();
                i.bitmap_mut(id)
                    .unwrap()
                    .clear()
                    .and_then(|()| i.sync_durable())
            }
            Step::Merge(t, s) => i.merge_bitmap(t.as_bytes(), s.as_bytes()),
            Step::Enable(n, on) => {
                let id = i.find_bitmap(n.as_bytes()).unwrap();
                let bm = i.bitmap_mut(id).unwrap();
                let r = if on { bm.enable() } else { bm.disable() };
                r.and_then(|()| i.sync_durable())
            }
            Step::Remove(n) => i.remove_bitmap(n.as_bytes()),
            Step::TxnClearAdd(c, e) => {
                let mut t = Transaction::new();
                let r = t.clear(i, c.as_bytes()).and_then(|()| {
                    t.add(
                        i,
                        e.as_bytes(),
                        65536,
                        AddOptions {
                            persistent: true,
                            ..AddOptions::default()
                        },
                    )
                    .map(drop)
                });
                match r {
                    Ok(()) => t.commit(&mut [i]),
                    Err(e) => {
                        let _ = t.abort(&mut [i]);
                        Err(e)
                    }
                }
            }
            Step::Store => i.store_bitmaps(),
            Step::Close => img.take().unwrap().close(),
        };
        spans.push((before, h.ops()));
        if r.is_err() {
            break;
        }
    }
    if let Some(i) = img {
        // The process dies here: nothing more is written.
        std::mem::forget(i);
    }
    (spans, data)
}

/// The model at crash point `k`: which steps returned before op k, which one was running.
fn truth(spans: &[(u64, u64)], k: u64, data0: &[u8]) -> (Truth, Vec<u8>) {
    let steps = workload();
    let mut t = Truth::default();
    for n in ["a", "b", "d"] {
        t.exists.insert(n, Some(true));
        t.refs.insert(n, vec![data0.to_vec()]);
    }
    t.enabled.insert("a", Some(true));
    t.enabled.insert("b", Some(true));
    t.enabled.insert("d", Some(false));
    let mut data = data0.to_vec();
    let mut in_flight: Vec<W> = Vec::new();
    // The data a bitmap added or cleared now is compared with: without the writes in flight,
    // which complete after it and so belong to it.
    let reference = |data: &[u8], in_flight: &[W]| {
        let mut r = data.to_vec();
        for &W(o, l, _) in in_flight {
            let range = o as usize..(o + l) as usize;
            r[range.clone()].copy_from_slice(&data0[range]);
        }
        r
    };
    for (step, &(before, after)) in steps.iter().zip(spans) {
        let done = after <= k;
        let running = !done && before <= k;
        if !done && !running {
            break;
        }
        let either = |x: bool| if done { Some(x) } else { None };
        match *step {
            Step::Prepare(w) => in_flight.push(w),
            Step::Issue(W(o, l, f)) => {
                if done {
                    data[o as usize..(o + l) as usize].fill(f);
                }
            }
            Step::Complete(w) => {
                if done {
                    in_flight.retain(|x| x.0 != w.0);
                }
            }
            Step::Add(n, _, disabled) => {
                t.exists.insert(n, either(true));
                t.enabled.insert(n, Some(!disabled));
                t.refs.insert(n, vec![reference(&data, &in_flight)]);
            }
            Step::Clear(n) => {
                let now = reference(&data, &in_flight);
                let r = t.refs.get_mut(n).unwrap();
                if done {
                    *r = vec![now];
                } else {
                    r.push(now);
                }
            }
            Step::Merge(_, _) | Step::Store | Step::Close => {}
            Step::Enable(n, on) => {
                t.enabled.insert(n, either(on));
            }
            Step::Remove(n) => {
                t.exists.insert(n, either(false));
            }
            Step::TxnClearAdd(c, e) => {
                t.exists.insert(e, either(true));
                t.enabled.insert(e, Some(true));
                let now = reference(&data, &in_flight);
                t.refs.insert(e, vec![now.clone()]);
                let r = t.refs.get_mut(c).unwrap();
                if done {
                    *r = vec![now];
                } else {
                    r.push(now);
                }
            }
        }
        if running {
            break;
        }
    }
    // W5 was written while b was disabled.
    t.exempt.insert("b", vec![(50 * MIB + 512, 1024)]);
    (t, data)
}

/// The granules (as byte ranges) that must be dirty in a bitmap of granularity `g` compared
/// with `reference`: those holding a sector that differs.
fn must_cover(data: &[u8], reference: &[u8], g: u64, exempt: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for s in 0..SIZE / SECTOR {
        let r = (s * SECTOR) as usize..((s + 1) * SECTOR) as usize;
        if data[r.clone()] == reference[r] {
            continue;
        }
        let off = s * SECTOR;
        if exempt.iter().any(|&(o, l)| off >= o && off < o + l) {
            continue;
        }
        let start = off - off % g;
        match out.last_mut() {
            Some(last) if last.0 + last.1 >= start => last.1 = last.1.max(start + g - last.0),
            _ => out.push((start, g)),
        }
    }
    out
}

fn covered(dirty: &[(u64, u64)], need: &[(u64, u64)]) -> bool {
    need.iter()
        .all(|&(o, l)| dirty.iter().any(|&(d, dl)| d <= o && o + l <= d + dl))
}

/// What an observer found: per bitmap, (auto, in_use, granularity, dirty runs).
type Seen = BTreeMap<String, (bool, bool, u64, Vec<(u64, u64)>)>;

fn seen_by_qdirty(image: &[u8]) -> Result<Seen, String> {
    let mut img = OpenOptions::new()
        .open_storage(
            Box::new(MemStorage {
                data: image.to_vec(),
            }),
            "crashed",
        )
        .map_err(|e| format!("qdirty cannot open: {e}"))?;
    let mut out = Seen::new();
    for id in img.bitmap_ids() {
        let (name, enabled, inconsistent, g) = {
            let b = img.bitmap(id).unwrap();
            (
                String::from_utf8_lossy(b.name().unwrap()).into_owned(),
                b.enabled(),
                b.inconsistent(),
                b.granularity(),
            )
        };
        let runs = if inconsistent {
            Vec::new()
        } else {
            qdirty_runs(img.bitmap_current(id).map_err(|e| e.to_string())?)
        };
        out.insert(name, (enabled, inconsistent, g, runs));
    }
    Ok(out)
}

fn seen_by_qemu(dir: &TempDir, image: &[u8], data: &[u8]) -> Result<Seen, String> {
    let img = dir.path().join("img.qcow2");
    std::fs::write(&img, image).unwrap();
    std::fs::write(dir.path().join("data.raw"), data).unwrap();
    let c = qemu_img_check(&img);
    if c.corruptions != 0 || c.check_errors != 0 {
        return Err(format!("qemu-img check: {c}"));
    }
    let mut out = Seen::new();
    for b in qemu_img_info_bitmaps(&img, false) {
        let runs = if b.in_use() {
            Vec::new()
        } else {
            nbd_dirty_extents(&img, &b.name)
        };
        out.insert(b.name.clone(), (b.auto(), b.in_use(), b.granularity, runs));
    }
    Ok(out)
}

/// Checks what an observer saw against the model.
fn judge(seen: &Seen, t: &Truth, data: &[u8], d_exact: &[Vec<(u64, u64)>]) -> Result<(), String> {
    for (name, exists) in &t.exists {
        let s = seen.get(*name);
        match (exists, s) {
            (Some(true), None) => return Err(format!("bitmap {name} is missing")),
            (Some(false), Some(_)) => return Err(format!("bitmap {name} should be gone")),
            _ => {}
        }
        let Some((auto, in_use, g, runs)) = s else {
            continue;
        };
        if *in_use {
            return Err(format!("bitmap {name} is in use"));
        }
        if let Some(Some(e)) = t.enabled.get(*name) {
            if e != auto {
                return Err(format!("bitmap {name}: auto is {auto}, expected {e}"));
            }
        }
        if *name == "d" {
            if !d_exact.iter().any(|x| x == runs) {
                return Err(format!(
                    "disabled bitmap d holds {runs:?}, expected one of {d_exact:?}"
                ));
            }
            continue;
        }
        let exempt = t.exempt.get(*name).cloned().unwrap_or_default();
        let refs = &t.refs[*name];
        if !refs
            .iter()
            .any(|r| covered(runs, &must_cover(data, r, *g, &exempt)))
        {
            let need = must_cover(data, &refs[0], *g, &exempt);
            return Err(format!(
                "bitmap {name} misses changed data: dirty {runs:?}, needs {need:?}"
            ));
        }
    }
    for name in seen.keys() {
        if !t.exists.contains_key(name.as_str()) {
            return Err(format!("unexpected bitmap {name}"));
        }
    }
    Ok(())
}

/// The host of the embedding path: the image's storage with the host's own cluster allocator,
/// which keeps the image's 16-bit refcounts itself (in refcount block 0, which covers the
/// whole file of these images) through the same storage, so that its writes are crash points
/// too.
struct HostAllocated {
    inner: FaultyStorage,
    refblock: u64,
    cluster_size: u64,
}

impl HostAllocated {
    fn new(inner: FaultyStorage, image: &[u8]) -> Self {
        let be64 = |at: usize| u64::from_be_bytes(image[at..at + 8].try_into().unwrap());
        let cluster_size = 1u64 << u32::from_be_bytes(image[20..24].try_into().unwrap());
        assert_eq!(
            u32::from_be_bytes(image[96..100].try_into().unwrap()),
            4,
            "16-bit refcounts"
        );
        let table = be64(48) as usize;
        HostAllocated {
            inner,
            refblock: u64::from_be_bytes(image[table..table + 8].try_into().unwrap()),
            cluster_size,
        }
    }

    fn refcount(&self, c: u64) -> std::io::Result<u16> {
        let mut b = [0u8; 2];
        self.inner.read_exact_at(&mut b, self.refblock + 2 * c)?;
        Ok(u16::from_be_bytes(b))
    }

    fn set_refcount(&mut self, c: u64, v: u16) -> std::io::Result<()> {
        assert!(
            2 * c < self.cluster_size,
            "the test's host covers refcount block 0 only"
        );
        self.inner
            .write_all_at(&v.to_be_bytes(), self.refblock + 2 * c)
    }
}

impl Storage for HostAllocated {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.inner.read_exact_at(buf, offset)
    }
    fn write_all_at(&mut self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.inner.write_all_at(buf, offset)
    }
    fn size(&self) -> std::io::Result<u64> {
        self.inner.size()
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
    fn allocator(&mut self) -> Option<&mut dyn ClusterAllocator> {
        Some(self)
    }
}

impl ClusterAllocator for HostAllocated {
    fn alloc(&mut self, n: u64, cluster_size: u64) -> std::io::Result<u64> {
        assert_eq!(cluster_size, self.cluster_size);
        // First fit above the clusters in use.
        let (mut start, mut len) = (1, 0);
        while len < n {
            if self.refcount(start + len)? != 0 {
                start += len + 1;
                len = 0;
            } else {
                len += 1;
            }
        }
        for c in start..start + n {
            self.set_refcount(c, 1)?;
        }
        Ok(start * cluster_size)
    }

    fn free(&mut self, offset: u64, n: u64, cluster_size: u64) -> std::io::Result<()> {
        for c in offset / cluster_size..offset / cluster_size + n {
            self.set_refcount(c, 0)?;
        }
        Ok(())
    }
}

/// The path API (qdirty's own allocator, 1 KiB clusters) or the embedding path (the host's
/// allocator, 64 KiB clusters).
#[derive(Clone, Copy, PartialEq)]
enum Path {
    Own,
    Host,
}

fn storage(path: Path, image: &[u8], fault: Option<Fault>) -> (Box<dyn Storage>, FaultHandle) {
    let (st, h) = FaultyStorage::new(image.to_vec());
    h.set_fault(fault);
    let st: Box<dyn Storage> = match path {
        Path::Own => Box::new(st),
        Path::Host => Box::new(HostAllocated::new(st, image)),
    };
    (st, h)
}

fn enumerate(test: &str, path: Path) {
    if !require_qemu(test) {
        return;
    }
    qdirty::warning::set_warning_handler(Some(Box::new(|_| {})));
    let dir = TempDir::new("durable-crash");
    let image0 = base(&dir, if path == Path::Own { 1024 } else { 65536 });
    let data0 = base_data(&dir);
    // d's exact content: QEMU's write (5 MiB, 128 KiB) and, after the merge, b's bits then.
    let d0 = vec![(5 * MIB, 128 << 10)];
    let mut d1 = d0.clone();
    for (o, l) in [
        (MIB, 64 << 10),
        (20 * MIB, 64 << 10),
        (40 * MIB, 64 << 10),
        (41 * MIB, 64 << 10),
    ] {
        d1.push((o, l));
    }
    d1.sort();
    let d1 = merge_runs(d1);
    let d_exact = vec![d0, d1];
    // The complete run: op count per step.
    let (st, h) = storage(path, &image0, None);
    let (spans, _) = run(st, &h, &data0);
    assert_eq!(
        spans.len(),
        workload().len(),
        "{test}: the workload fails without fault"
    );
    let total = h.ops();
    let every = 5;
    let mut states = 0;
    let mut qemu_states = 0;
    for k in 0..=total {
        let fates: &[(Unflushed, u64)] = &[
            (Unflushed::Kept, 0),
            (Unflushed::Lost, 0),
            (Unflushed::Random(k), 1),
        ];
        for (f, &(unflushed, torn)) in fates.iter().enumerate() {
            let fault = Fault::Crash {
                at: k,
                unflushed,
                torn_sectors: torn,
            };
            let (st, h) = storage(path, &image0, Some(fault));
            let (_, _) = run(st, &h, &data0);
            let crashed = h.crashed_image().unwrap_or_else(|| h.live_image());
            let (t, data) = truth(&spans, k, &data0);
            let ctx = format!("{test}: crash at op {k} of {total} ({unflushed:?}, torn {torn})");
            let seen = seen_by_qdirty(&crashed).unwrap_or_else(|e| panic!("{ctx}: {e}"));
            judge(&seen, &t, &data, &d_exact).unwrap_or_else(|e| panic!("{ctx}: qdirty: {e}"));
            if full() || (f == 0 && (k % every == 0 || k == total)) {
                let seen =
                    seen_by_qemu(&dir, &crashed, &data).unwrap_or_else(|e| panic!("{ctx}: {e}"));
                judge(&seen, &t, &data, &d_exact).unwrap_or_else(|e| panic!("{ctx}: QEMU: {e}"));
                qemu_states += 1;
            }
            states += 1;
        }
    }
    eprintln!("{test}: {states} crash states (QEMU judged {qemu_states}), {total} ops");
    assert!(
        total > 20,
        "{test}: the workload wrote too little to test anything: {total} ops"
    );
}

#[test]
fn durable_mode_survives_a_crash_at_every_write_and_flush() {
    enumerate(
        "durable_mode_survives_a_crash_at_every_write_and_flush",
        Path::Own,
    );
}

#[test]
fn durable_mode_with_a_host_allocator_survives_a_crash_at_every_write_and_flush() {
    enumerate(
        "durable_mode_with_a_host_allocator_survives_a_crash_at_every_write_and_flush",
        Path::Host,
    );
}
