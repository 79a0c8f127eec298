//! The I/O path (docs/design.md, 'Lazy loading' and 'The incremental store'): lazy loading gives
//! the same bits as eager loading and as QEMU; incremental stores write only what changed and keep
//! `qemu-img check` clean over hundreds of random sessions; a full filesystem (injected ENOSPC, and
//! a small tmpfs) during store leaves the old bitmaps readable by QEMU and the in-memory ones
//! intact.

mod common;

use std::collections::BTreeMap;
use std::io;
use std::path::Path;
use std::sync::{Arc, Mutex};

use common::storage::{check_storage, Subject};
use common::*;
use qdirty::image::storage::{FileStorage, Storage};
use qdirty::{AddOptions, Image, OpenOptions};

const MIB: u64 = 1 << 20;

/// Storage wrapper that records writes and can refuse to grow the file (ENOSPC).
struct Probe {
    inner: FileStorage,
    log: Arc<Mutex<ProbeState>>,
}

#[derive(Default)]
struct ProbeState {
    writes: Vec<(u64, u64)>,
    /// Writes ending beyond this length fail with ENOSPC.
    limit: Option<u64>,
}

impl Storage for Probe {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.inner.read_exact_at(buf, offset)
    }
    fn write_all_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut st = self.log.lock().unwrap();
        if let Some(limit) = st.limit {
            if offset + buf.len() as u64 > limit.max(self.inner.size()?) {
                return Err(io::Error::from_raw_os_error(libc::ENOSPC));
            }
        }
        st.writes.push((offset, buf.len() as u64));
        self.inner.write_all_at(buf, offset)
    }
    fn size(&self) -> io::Result<u64> {
        self.inner.size()
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// The probe keeps the storage contract (the test kit's conformance suite), so that what the
/// tests below see through it is what the file backend does.
#[test]
fn probe_storage_conforms() {
    let dir = TempDir::new("io-probe-storage");
    check_storage("io_path's Probe", |bytes| {
        let p = dir.join(&format!("probe{}", unique_number()));
        std::fs::write(&p, bytes).expect("write the file");
        let st = Probe {
            inner: FileStorage::open(&p, true).expect("open"),
            log: Arc::default(),
        };
        Subject::with_durable(Conformance(st), move || {
            std::fs::read(&p).expect("read the file")
        })
    });
}

fn open_probe(img: &Path) -> (Image, Arc<Mutex<ProbeState>>) {
    let log = Arc::new(Mutex::new(ProbeState::default()));
    let st = Probe {
        inner: FileStorage::open(img, true).unwrap(),
        log: Arc::clone(&log),
    };
    let image = OpenOptions::new()
        .read_write(true)
        .open_storage(Box::new(st), &img.display().to_string())
        .unwrap();
    (image, log)
}

fn sha_of(img: &mut Image, name: &str) -> String {
    qd_bm(img, name).sha256().unwrap()
}

#[test]
fn lazy_and_eager_loads_match_qemu() {
    if !require_qemu("lazy_and_eager_loads_match_qemu") {
        return;
    }
    let tmp = TempDir::new("io-lazy");
    // (cluster size option, disk size, bitmaps (name, granularity, disabled))
    let shapes: Shapes = &[
        (
            "cluster_size=512",
            8 * MIB + 512,
            &[("a", 512, false), ("b", 65536, true)],
        ),
        (
            "cluster_size=4096",
            100 * MIB,
            &[("f", 512, false), ("m", 4096, true), ("c", 2 * MIB, false)],
        ),
        (
            "cluster_size=65536",
            300 * MIB + 4096,
            &[("x", 65536, false), ("y", 512, true)],
        ),
    ];
    for (k, &(opts, size, bms)) in shapes.iter().enumerate() {
        let img = tmp.join(&format!("s{k}.qcow2"));
        qemu_img_create(&img, size, opts, &[]);
        let mut rng = Prng::new(k as u64 + 7);
        for &(name, g, _) in bms {
            qemu_img_bitmap_add(&img, name, Some(g), false);
            let ranges = random_ranges(&mut rng, 40, size, 3 * MIB, 512);
            qemu_io_write(&img, &ranges);
        }
        for &(name, _, disabled) in bms {
            if disabled {
                qemu_img_bitmap(&img, &["--disable"], name);
            }
        }
        let names: Vec<String> = bms.iter().map(|b| b.0.to_string()).collect();
        let qemu = qemu_sha256s(&img, &names, &tmp);
        // Lazy: loaded by the first read through &self.
        let mut lazy = qd_open(&img, false);
        for id in lazy.bitmap_ids() {
            let state = lazy.bitmap(id).unwrap();
            assert!(!state.is_loaded(), "open must not read bitmap data");
        }
        // Eager: everything loaded at once.
        let mut eager = qd_open(&img, false);
        eager.load_all_bitmaps().unwrap();
        for n in &names {
            assert_eq!(sha_of(&mut lazy, n), qemu[n], "{opts}: lazy load of '{n}'");
            assert_eq!(
                sha_of(&mut eager, n),
                qemu[n],
                "{opts}: eager load of '{n}'"
            );
            assert_eq!(qdirty_runs(qd_bm(&mut lazy, n)), nbd_dirty_extents(&img, n));
        }
    }
}

/// A disabled bitmap nobody touches is never loaded; an enabled one collects writes while on
/// disk and has them when loaded, also after a store that kept it on disk.
#[test]
fn unloaded_bitmaps_keep_writes_and_are_not_rewritten() {
    if !require_qemu("unloaded_bitmaps_keep_writes_and_are_not_rewritten") {
        return;
    }
    let tmp = TempDir::new("io-unloaded");
    let img = tmp.join("u.qcow2");
    let size = 256 * MIB;
    qemu_img_create(&img, size, "cluster_size=4096", &[]);
    qemu_img_bitmap_add(&img, "on", Some(512), false);
    qemu_img_bitmap_add(&img, "off", Some(512), true);
    // Every data cluster of both bitmaps non-zero (one cluster covers 16 MiB here).
    let ranges: Vec<(u64, u64)> = (0..16).map(|i| (i * 16 * MIB + 4096, 4096)).collect();
    qemu_img_bitmap(&img, &["--enable"], "off");
    qemu_io_write(&img, &ranges);
    qemu_img_bitmap(&img, &["--disable"], "off");
    let before_off = nbd_dirty_extents(&img, "off");

    let (mut im, log) = open_probe(&img);
    let open_writes = log.lock().unwrap().writes.len();
    assert!(
        open_writes <= 4,
        "in_use marking in place: {open_writes} writes"
    );
    im.write_hook().set(100 * MIB, 512);
    im.set_dirty(200 * MIB, 1024);
    log.lock().unwrap().writes.clear();
    let space = im.store_space_needed().unwrap();
    assert!(
        space.clusters <= 4,
        "two changed data clusters, a table, a directory: {space:?}"
    );
    im.store_bitmaps().unwrap();
    let written: u64 = log.lock().unwrap().writes.iter().map(|w| w.1).sum();
    // Full rewrite would be 32 data clusters; here: 2 data clusters, table, directory,
    // refcount block, headers.
    assert!(
        written <= 12 * 4096,
        "incremental store wrote {written} bytes"
    );
    // The unchanged, disabled bitmap was never loaded (the changed one was, to be rewritten).
    let off = im.find_bitmap(b"off").unwrap();
    assert!(!im.bitmap(off).unwrap().is_loaded(), "'off' was loaded");
    im.close().unwrap();
    assert_check_clean(&img, "after incremental store");
    let mut want_on = union_runs(&ranges, &[(100 * MIB, 512), (200 * MIB, 1024)]);
    want_on = merge_runs(want_on);
    assert_eq!(nbd_dirty_extents(&img, "on"), want_on);
    assert_eq!(nbd_dirty_extents(&img, "off"), before_off);

    // No change at all: only the in_use flags are cleared, in place; no data cluster written.
    let (im, log) = open_probe(&img);
    log.lock().unwrap().writes.clear();
    im.close().unwrap();
    let w = log.lock().unwrap().writes.clone();
    assert!(w.len() <= 4, "close without changes wrote {w:?}");
    assert_check_clean(&img, "after unchanged close");
    assert_eq!(nbd_dirty_extents(&img, "on"), want_on);
}

/// Image shapes: (qemu-img options, disk size, bitmaps (name, granularity, disabled)).
type Shapes<'a> = &'a [(&'a str, u64, &'a [(&'a str, u64, bool)])];

/// Model of one bitmap: granularity, enabled, dirty runs.
type Model = BTreeMap<String, (u64, bool, Vec<(u64, u64)>)>;

#[test]
fn random_sessions_stay_clean() {
    if !require_qemu("random_sessions_stay_clean") {
        return;
    }
    let tmp = TempDir::new("io-cycles");
    let img = tmp.join("c.qcow2");
    let size = 24 * MIB + 512;
    qemu_img_create(&img, size, "cluster_size=512", &[]);
    let grans = [512u64, 4096, 65536, MIB];
    let mut model: Model = BTreeMap::new();
    let mut rng = Prng::new(42);
    let mut next = 0;
    for cycle in 0..200 {
        let mut im = qd_open(&img, true);
        for _ in 0..1 + rng.below(4) {
            match rng.below(10) {
                0 if model.len() < 6 => {
                    let name = format!("b{next}");
                    next += 1;
                    let g = grans[rng.below(4) as usize];
                    let disabled = rng.below(3) == 0;
                    im.add_bitmap(
                        name.as_bytes(),
                        g,
                        AddOptions {
                            persistent: true,
                            disabled,
                            autoload: None,
                        },
                    )
                    .unwrap();
                    model.insert(name, (g, !disabled, Vec::new()));
                }
                1 if !model.is_empty() => {
                    let name = model
                        .keys()
                        .nth(rng.below(model.len() as u64) as usize)
                        .unwrap()
                        .clone();
                    im.remove_bitmap(name.as_bytes()).unwrap();
                    model.remove(&name);
                }
                2 if !model.is_empty() => {
                    let name = model
                        .keys()
                        .nth(rng.below(model.len() as u64) as usize)
                        .unwrap()
                        .clone();
                    let m = model.get_mut(&name).unwrap();
                    let bm = qd_bm_mut(&mut im, &name);
                    if m.1 {
                        bm.disable().unwrap()
                    } else {
                        bm.enable().unwrap()
                    }
                    m.1 = !m.1;
                }
                3 if model.len() >= 2 => {
                    let names: Vec<String> = model.keys().cloned().collect();
                    let t = names[rng.below(names.len() as u64) as usize].clone();
                    let s = names[rng.below(names.len() as u64) as usize].clone();
                    im.merge_bitmap(t.as_bytes(), s.as_bytes()).unwrap();
                    let src = model[&s].2.clone();
                    let m = model.get_mut(&t).unwrap();
                    m.2 = merge_runs(union_runs(&m.2, &regranulate(&src, m.0, size)));
                }
                4 if !model.is_empty() && rng.below(3) == 0 => {
                    let name = model
                        .keys()
                        .nth(rng.below(model.len() as u64) as usize)
                        .unwrap()
                        .clone();
                    qd_bm_mut(&mut im, &name).clear().unwrap();
                    model.get_mut(&name).unwrap().2.clear();
                }
                _ => {
                    let n = 1 + rng.below(5) as usize;
                    let ranges = random_ranges(&mut rng, n, size, 2 * MIB, 1);
                    let hook = im.write_hook();
                    for &(o, l) in &ranges {
                        if rng.below(2) == 0 {
                            hook.set(o, l)
                        } else {
                            im.set_dirty(o, l)
                        }
                    }
                    for m in model.values_mut() {
                        if m.1 {
                            m.2 = merge_runs(union_runs(&m.2, &expected_runs(&ranges, m.0, size)));
                        }
                    }
                }
            }
        }
        if cycle % 3 == 0 {
            // Read some bitmaps (loads them) before closing.
            for n in model.keys() {
                let _ = qd_bm(&mut im, n).count();
            }
        }
        im.close().unwrap();
        if cycle % 20 == 19 {
            let c = qemu_img_check(&img);
            assert!(c.clean() && c.leaks == 0, "cycle {cycle}: {c}");
        }
        // Reopen and compare with the model.
        // (Retried briefly: a child forked by a parallel test may hold a copy of our
        // descriptor, and its lock, until it execs.)
        let mut tries = 0;
        let mut im = loop {
            match Image::open(&img, false) {
                Ok(im) => break im,
                Err(e) if tries < 50 && e.to_string().contains("lock") => {
                    tries += 1;
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(e) => panic!("cycle {cycle}: {e}"),
            }
        };
        for (n, (_, enabled, runs)) in &model {
            let bm = qd_bm(&mut im, n);
            assert_eq!(bm.enabled(), *enabled, "cycle {cycle}: '{n}' state");
            assert_eq!(&qdirty_runs(bm), runs, "cycle {cycle}: '{n}' bits");
        }
        assert_eq!(qd_bitmaps(&mut im).len(), model.len(), "cycle {cycle}");
    }
    let c = qemu_img_check(&img);
    assert!(c.clean() && c.leaks == 0, "end: {c}");
    for (n, (_, _, runs)) in &model {
        assert_eq!(&nbd_dirty_extents(&img, n), runs, "QEMU's view of '{n}'");
    }
}

/// What QEMU sees of the bitmaps: name → (flags, dirty runs for consistent ones).
fn qemu_view(img: &Path) -> Vec<(String, Vec<String>)> {
    qemu_img_info_bitmaps(img, true)
        .into_iter()
        .map(|b| (b.name.clone(), b.flags.clone()))
        .collect()
}

#[test]
fn enospc_injected_during_store() {
    if !require_qemu("enospc_injected_during_store") {
        return;
    }
    let tmp = TempDir::new("io-enospc");
    let img = tmp.join("e.qcow2");
    let size = 64 * MIB;
    qemu_img_create(&img, size, "cluster_size=4096", &[]);
    qemu_img_bitmap_add(&img, "old", Some(512), false);
    qemu_io_write(&img, &[(MIB, 4096), (40 * MIB, 8192)]);
    let old_runs = nbd_dirty_extents(&img, "old");

    let (mut im, log) = open_probe(&img);
    im.set_dirty(20 * MIB, 64 * 1024);
    qd_add(&mut im, "new", 512, false);
    let q = im.find_bitmap(b"new").unwrap();
    im.bitmap_mut(q).unwrap().set_dirty(0, 32 * MIB).unwrap();
    let shas: Vec<String> = ["old", "new"].iter().map(|n| sha_of(&mut im, n)).collect();
    let view_before = qemu_view(&img);
    log.lock().unwrap().limit = Some(0); // the file cannot grow any more
    let err = im.store_bitmaps().unwrap_err();
    assert_eq!(err.errno(), libc::ENOSPC, "{err}");
    // On disk: as before (old is in_use, as it was while open); QEMU sees no corruption.
    let c = qemu_img_check(&img);
    assert!(c.corruptions == 0 && c.check_errors == 0, "{c}");
    assert_eq!(qemu_view(&img), view_before);
    // In memory: intact.
    let after: Vec<String> = ["old", "new"].iter().map(|n| sha_of(&mut im, n)).collect();
    assert_eq!(after, shas);
    let im = match im.try_close() {
        Ok(()) => panic!("close must fail while the disk is full"),
        Err((im, e)) => {
            assert_eq!(e.errno(), libc::ENOSPC);
            *im
        }
    };
    assert_eq!(qemu_view(&img), view_before);
    log.lock().unwrap().limit = None; // space freed
    im.try_close().map_err(|(_, e)| e).unwrap();
    assert_check_clean(&img, "after the retried close");
    assert_eq!(
        nbd_dirty_extents(&img, "old"),
        merge_runs(union_runs(&old_runs, &[(20 * MIB, 64 * 1024)]))
    );
    assert_eq!(nbd_dirty_extents(&img, "new"), vec![(0, 32 * MIB)]);
    // And with the image closed before the failure: QEMU reads the old bitmap.
    let _ = old_runs;
}

#[test]
fn enospc_on_a_full_tmpfs() {
    let tmp = TempDir::new("io-tmpfs");
    let mnt = tmp.join("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    let st = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=4m", "tmpfs"])
        .arg(&mnt)
        .status();
    if !matches!(st, Ok(s) if s.success()) {
        assert!(
            std::env::var("QDIRTY_REQUIRE_QEMU").as_deref() != Ok("1"),
            "cannot mount a tmpfs"
        );
        eprintln!("SKIPPED enospc_on_a_full_tmpfs: cannot mount a tmpfs (not root?)");
        return;
    }
    struct Umount(std::path::PathBuf);
    impl Drop for Umount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(&self.0).status();
        }
    }
    let _guard = Umount(mnt.clone());
    if !require_qemu("enospc_on_a_full_tmpfs") {
        return;
    }
    let img = mnt.join("t.qcow2");
    // 2 TiB at 512 B granularity would be 512 MiB of bitmap: use 1 GiB at 512 → 256 KiB.
    qemu_img_create(&img, 1 << 30, "cluster_size=65536", &[]);
    qemu_img_bitmap_add(&img, "old", Some(512), false);
    qemu_io_write(&img, &[(0, 65536)]);
    let old_runs = nbd_dirty_extents(&img, "old");
    // Fill the filesystem.
    let filler = mnt.join("filler");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&filler).unwrap();
        let block = vec![0xAAu8; 65536];
        while f.write_all(&block).is_ok() {}
        let _ = f.sync_all();
    }
    let mut im = qd_open(&img, true);
    let id = qd_add(&mut im, "new", 512, false);
    im.bitmap_mut(id).unwrap().set_dirty(0, 1 << 30).unwrap();
    im.set_dirty(512 * MIB, MIB);
    let shas: Vec<String> = ["old", "new"].iter().map(|n| sha_of(&mut im, n)).collect();
    let mut im = match im.try_close() {
        Ok(()) => panic!("the store must fail on a full filesystem"),
        Err((im, e)) => {
            assert_eq!(e.errno(), libc::ENOSPC, "{e}");
            *im
        }
    };
    let c = qemu_img_check_args(&img, &["-U"]);
    assert!(c.corruptions == 0 && c.check_errors == 0, "{c}");
    let view = qemu_img_info_bitmaps(&img, true);
    assert_eq!(view.len(), 1);
    assert_eq!(view[0].name, "old");
    assert!(view[0].flags.iter().any(|f| f == "in-use"));
    let after: Vec<String> = ["old", "new"].iter().map(|n| sha_of(&mut im, n)).collect();
    assert_eq!(after, shas);
    std::fs::remove_file(&filler).unwrap();
    im.try_close().map_err(|(_, e)| e).unwrap();
    assert_check_clean(&img, "after the retried close");
    assert_eq!(
        nbd_dirty_extents(&img, "old"),
        merge_runs(union_runs(&old_runs, &[(512 * MIB, MIB)]))
    );
    assert_eq!(nbd_dirty_extents(&img, "new"), vec![(0, 1 << 30)]);
}
