//! The in-memory mirror against QEMU as the oracle: qemu-storage-daemon runs QMP bitmap commands
//! (add, merge, clear, enable, disable, remove and `transaction`, including failing transactions
//! that QEMU aborts) on one copy of an image while qdirty does the same on another copy; guest
//! writes go to QEMU through a writable NBD export and to qdirty through its write hook. After
//! every step QEMU's `x-debug-block-dirty-bitmap-sha256` and `query-named-block-nodes` bitmap list
//! must equal qdirty's. At the end both store their bitmaps and QEMU's tools must see identical
//! images. A second test covers reopen read-write -> read-only -> read-write.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use qdirty::image::Transaction;
use qdirty::{AddOptions, Error, Image};

const MIB: u64 = 1 << 20;
const SIZE: u64 = 40 * MIB + 512;

// ------------------------------------------------------------------------------------------
// The two sides
// ------------------------------------------------------------------------------------------

struct Mirror {
    q: Qsd,
    d: Image,
    nbd_sock: PathBuf,
    cwd: PathBuf,
    rng: Prng,
    writes: usize,
}

/// One line of QEMU's or qdirty's bitmap list: name, granularity, recording, count, busy,
/// persistent, inconsistent.
type Line = (Option<String>, u64, bool, u64, bool, bool, bool);

impl Mirror {
    fn qemu_list(&mut self) -> Vec<Line> {
        let nodes = self.q.exec_ok("query-named-block-nodes", "{\"flat\":true}");
        let node = nodes
            .as_array()
            .expect("node list")
            .iter()
            .find(|n| n.get("node-name").and_then(Json::as_str) == Some("fmt0"))
            .expect("node fmt0")
            .clone();
        let Some(list) = node.get("dirty-bitmaps").and_then(Json::as_array) else {
            return Vec::new();
        };
        list.iter()
            .map(|b| {
                let flag = |k: &str| b.get(k).and_then(Json::as_bool).unwrap_or(false);
                (
                    b.get("name").and_then(Json::as_str).map(str::to_string),
                    b.get("granularity").and_then(Json::as_u64).expect("gran"),
                    flag("recording"),
                    b.get("count").and_then(Json::as_u64).expect("count"),
                    flag("busy"),
                    flag("persistent"),
                    flag("inconsistent"),
                )
            })
            .collect()
    }

    fn qdirty_list(&mut self) -> Vec<Line> {
        self.d
            .query()
            .expect("query")
            .into_iter()
            .map(|i| {
                (
                    i.name.map(|n| String::from_utf8_lossy(&n).into_owned()),
                    i.granularity,
                    i.recording,
                    i.count,
                    i.busy,
                    i.persistent,
                    i.inconsistent,
                )
            })
            .collect()
    }

    /// QEMU's and qdirty's bitmap lists and every named bitmap's sha256 are equal.
    fn compare(&mut self, ctx: &str) {
        let ql = self.qemu_list();
        let dl = self.qdirty_list();
        assert_eq!(
            ql, dl,
            "{ctx}: query-named-block-nodes dirty-bitmaps (QEMU left, qdirty right)"
        );
        for (name, ..) in &ql {
            let Some(name) = name else { continue };
            let qs = self.q.sha256(name);
            let ds = qd_bm(&mut self.d, name).sha256().unwrap();
            assert_eq!(
                qs, ds,
                "{ctx}: sha256 of '{name}' (QEMU left, qdirty right)"
            );
        }
    }

    /// Random 512-aligned guest writes on both sides.
    fn write(&mut self, n: usize, ctx: &str) {
        let ranges = random_ranges(&mut self.rng, n, SIZE, 600_000, 512);
        let uri = format!("nbd+unix:///fmt0?socket={}", self.nbd_sock.display());
        let cmds: Vec<String> = ranges
            .iter()
            .map(|(o, l)| {
                self.writes += 1;
                format!("write -P 0x{:02x} {o} {l}", self.writes % 250 + 1)
            })
            .collect();
        let mut args: Vec<&str> = vec!["-f", "raw"];
        for c in &cmds {
            args.push("-c");
            args.push(c);
        }
        args.push(&uri);
        let out = run_ok("qemu-io", &args, &self.cwd);
        assert!(!out.contains("failed"), "{ctx}: qemu-io over NBD: {out}");
        for &(o, l) in &ranges {
            self.d.set_dirty(o, l);
        }
        self.compare(ctx);
    }

    fn qmp_add(&mut self, name: &str, g: Option<u64>, persistent: bool, disabled: bool) {
        self.q.bitmap_add(name, g, persistent, disabled);
        self.d
            .add_bitmap(
                name.as_bytes(),
                g.unwrap_or(0),
                AddOptions {
                    persistent,
                    disabled,
                    autoload: None,
                },
            )
            .unwrap_or_else(|e| panic!("qdirty add {name}: {e}"));
        self.compare(&format!("add {name}"));
    }

    fn qmp_merge(&mut self, target: &str, sources: &[&str]) {
        let list: Vec<String> = sources.iter().map(|s| json_str(s)).collect();
        self.q.exec_ok(
            "block-dirty-bitmap-merge",
            &format!(
                "{{\"node\":\"fmt0\",\"target\":{},\"bitmaps\":[{}]}}",
                json_str(target),
                list.join(",")
            ),
        );
        for s in sources {
            self.d
                .merge_bitmap(target.as_bytes(), s.as_bytes())
                .unwrap_or_else(|e| panic!("qdirty merge {target} <- {s}: {e}"));
        }
        self.compare(&format!("merge {target} <- {sources:?}"));
    }

    fn qmp_simple(&mut self, cmd: &str, name: &str) {
        self.q.exec_ok(
            &format!("block-dirty-bitmap-{cmd}"),
            &format!("{{\"node\":\"fmt0\",\"name\":{}}}", json_str(name)),
        );
        let id = self
            .d
            .find_bitmap(name.as_bytes())
            .unwrap_or_else(|| panic!("qdirty has no {name}"));
        let r = match cmd {
            "clear" => self.d.bitmap_mut(id).unwrap().clear(),
            "enable" => self.d.bitmap_mut(id).unwrap().enable(),
            "disable" => self.d.bitmap_mut(id).unwrap().disable(),
            "remove" => self.d.remove_bitmap(name.as_bytes()),
            _ => unreachable!(),
        };
        r.unwrap_or_else(|e| panic!("qdirty {cmd} {name}: {e}"));
        self.compare(&format!("{cmd} {name}"));
    }
}

/// One action of a transaction, for both sides.
enum Act<'a> {
    Add(&'a str, u64, bool),
    Clear(&'a str),
    Enable(&'a str),
    Disable(&'a str),
    Merge(&'a str, &'a [&'a str]),
    Remove(&'a str),
}

fn qmp_action(a: &Act) -> String {
    let bm = |n: &str| format!("\"node\":\"fmt0\",\"name\":{}", json_str(n));
    let (t, data) = match a {
        Act::Add(n, g, p) => (
            "add",
            format!("{},\"granularity\":{g},\"persistent\":{p}", bm(n)),
        ),
        Act::Clear(n) => ("clear", bm(n)),
        Act::Enable(n) => ("enable", bm(n)),
        Act::Disable(n) => ("disable", bm(n)),
        Act::Remove(n) => ("remove", bm(n)),
        Act::Merge(t, s) => {
            let list: Vec<String> = s.iter().map(|x| json_str(x)).collect();
            (
                "merge",
                format!(
                    "\"node\":\"fmt0\",\"target\":{},\"bitmaps\":[{}]",
                    json_str(t),
                    list.join(",")
                ),
            )
        }
    };
    format!("{{\"type\":\"block-dirty-bitmap-{t}\",\"data\":{{{data}}}}}")
}

/// Prepares one action on qdirty's side (a merge of several sources is several merges).
fn prepare(t: &mut Transaction, img: &mut Image, a: &Act) -> qdirty::Result<()> {
    match a {
        Act::Add(n, g, p) => t
            .add(
                img,
                n.as_bytes(),
                *g,
                AddOptions {
                    persistent: *p,
                    ..AddOptions::default()
                },
            )
            .map(drop),
        Act::Clear(n) => t.clear(img, n.as_bytes()),
        Act::Enable(n) => t.enable(img, n.as_bytes()),
        Act::Disable(n) => t.disable(img, n.as_bytes()),
        Act::Remove(n) => t.remove(img, n.as_bytes()),
        Act::Merge(tg, srcs) => {
            for s in srcs.iter() {
                t.merge(img, tg.as_bytes(), None, s.as_bytes())?;
            }
            Ok(())
        }
    }
}

impl Mirror {
    /// Runs a QMP transaction and the same on qdirty. `fails`: QEMU must refuse it and qdirty's
    /// preparation must fail with the same message, after which qdirty aborts.
    fn transaction(&mut self, acts: &[Act], fails: bool, ctx: &str) {
        let list: Vec<String> = acts.iter().map(qmp_action).collect();
        let r = self.q.execute(
            "transaction",
            Some(&format!("{{\"actions\":[{}]}}", list.join(","))),
        );
        let mut t = Transaction::new();
        let mut err: Option<Error> = None;
        for a in acts {
            if let Err(e) = prepare(&mut t, &mut self.d, a) {
                err = Some(e);
                break;
            }
        }
        match (r, err) {
            (Ok(_), None) => {
                assert!(
                    !fails,
                    "{ctx}: QEMU accepted a transaction expected to fail"
                );
                t.commit(&mut [&mut self.d]).expect("commit");
            }
            (Err(qe), Some(de)) => {
                assert!(fails, "{ctx}: QEMU refused: {qe}");
                assert_eq!(
                    qe,
                    de.to_string(),
                    "{ctx}: error message (QEMU left, qdirty right)"
                );
                t.abort(&mut [&mut self.d]).expect("abort");
            }
            (q, d) => panic!("{ctx}: QEMU {q:?} but qdirty {d:?}"),
        }
        self.compare(ctx);
    }
}

// ------------------------------------------------------------------------------------------
// The sequence
// ------------------------------------------------------------------------------------------

fn make_base(img: &Path) {
    qemu_img_create(img, SIZE, "cluster_size=65536", &[]);
    qemu_img_bitmap_add(img, "pre", Some(4096), false);
    qemu_img_bitmap_add(img, "pre-dis", Some(65536), false);
    let mut rng = Prng::new(0x5eed);
    qemu_io_write(img, &random_ranges(&mut rng, 12, SIZE, 800_000, 1));
    qemu_img_bitmap(img, &["--disable"], "pre-dis");
    qemu_io_write(img, &random_ranges(&mut rng, 12, SIZE, 800_000, 1));
    assert_check_clean(img, "base image");
}

fn same_images(q: &Path, d: &Path) {
    assert_check_clean(q, "QEMU's copy after quit");
    assert_check_clean(d, "qdirty's copy after close");
    let key = |p: &Path| {
        let mut v: Vec<(String, u64, Vec<String>)> = qemu_img_info_bitmaps(p, false)
            .into_iter()
            .map(|b| {
                let mut f = b.flags;
                f.sort();
                (b.name, b.granularity, f)
            })
            .collect();
        v.sort();
        v
    };
    let qk = key(q);
    let dk = key(d);
    assert_eq!(
        qk, dk,
        "stored bitmaps (QEMU's copy left, qdirty's copy right)"
    );
    for (name, ..) in &qk {
        let qr = nbd_dirty_extents(q, name);
        let dr = nbd_dirty_extents(d, name);
        assert!(
            qr == dr,
            "stored runs of '{name}' differ: {}",
            diff_runs(&qr, &dr)
        );
    }
}

#[test]
fn qmp_sequence_and_transactions_match_qemu() {
    if !require_qemu("qmp_sequence_and_transactions_match_qemu") {
        return;
    }
    let tmp = TempDir::new("imirror");
    let base = tmp.join("base.qcow2");
    let qimg = tmp.join("q.qcow2");
    let dimg = tmp.join("d.qcow2");
    make_base(&base);
    copy(&base, &qimg);
    copy(&base, &dimg);

    let mut q = Qsd::start(&qimg, false, &tmp);
    let nbd_sock = tmp.join("nbd.sock");
    q.exec_ok(
        "nbd-server-start",
        &format!(
            "{{\"addr\":{{\"type\":\"unix\",\"data\":{{\"path\":{}}}}}}}",
            json_str(&nbd_sock.display().to_string())
        ),
    );
    q.exec_ok(
        "block-export-add",
        "{\"type\":\"nbd\",\"id\":\"exp0\",\"node-name\":\"fmt0\",\"writable\":true}",
    );
    let d = qd_open(&dimg, true);
    let mut m = Mirror {
        q,
        d,
        nbd_sock,
        cwd: tmp.path().to_path_buf(),
        rng: Prng::new(42),
        writes: 0,
    };
    m.compare("open");

    // block-dirty-bitmap-add: granularities, default granularity, disabled, transient.
    m.qmp_add("a", Some(512), true, false);
    m.qmp_add("b", Some(65536), true, true);
    m.qmp_add("c", None, false, false);
    m.qmp_add("d", Some(MIB), true, false);
    // A duplicate name: same refusal.
    let qe =
        m.q.execute(
            "block-dirty-bitmap-add",
            Some("{\"node\":\"fmt0\",\"name\":\"c\"}"),
        )
        .expect_err("duplicate add");
    let de =
        m.d.add_bitmap(b"c", 0, AddOptions::default())
            .expect_err("duplicate add");
    assert_eq!(qe, de.to_string(), "duplicate add message");
    m.write(10, "writes 1");

    // Merges: several sources, across granularities, from a disabled source, target as source.
    m.qmp_merge("b", &["pre", "a"]);
    m.qmp_merge("a", &["d"]);
    m.qmp_merge("c", &["pre-dis"]);
    m.qmp_merge("b", &["b", "c"]);

    // enable / disable / clear, with writes in between.
    m.qmp_simple("disable", "a");
    m.write(6, "writes 2 (a disabled)");
    m.qmp_simple("enable", "b");
    m.qmp_simple("enable", "b"); // idempotent
    m.write(6, "writes 3 (b enabled)");
    m.qmp_simple("clear", "pre");
    m.write(4, "writes 4");

    // A bitmap exported over NBD is busy (QEMU: bdrv_dirty_bitmap_set_busy); qdirty mirrors it
    // with set_busy. Clear of it and merge from it are refused with the same message.
    m.q.exec_ok(
        "block-export-add",
        "{\"type\":\"nbd\",\"id\":\"exp1\",\"node-name\":\"fmt0\",\"name\":\"ro\",\
         \"writable\":false,\"bitmaps\":[\"pre-dis\"]}",
    );
    qd_bm_mut(&mut m.d, "pre-dis").set_busy(true);
    m.compare("pre-dis exported (busy)");
    let qe =
        m.q.execute(
            "block-dirty-bitmap-clear",
            Some("{\"node\":\"fmt0\",\"name\":\"pre-dis\"}"),
        )
        .expect_err("clear of a busy bitmap");
    let de = qd_bm_mut(&mut m.d, "pre-dis")
        .clear()
        .expect_err("clear of a busy bitmap");
    assert_eq!(qe, de.to_string(), "clear of a busy bitmap");
    let qe =
        m.q.execute(
            "block-dirty-bitmap-merge",
            Some("{\"node\":\"fmt0\",\"target\":\"b\",\"bitmaps\":[\"pre-dis\"]}"),
        )
        .expect_err("merge from a busy bitmap");
    let de = m.d.merge_bitmap(b"b", b"pre-dis").expect_err("busy source");
    assert_eq!(qe, de.to_string(), "merge from a busy bitmap");
    m.transaction(
        &[Act::Clear("b"), Act::Disable("pre-dis")],
        true,
        "transaction 0 (busy bitmap, aborted)",
    );
    m.q.exec_ok("block-export-del", "{\"id\":\"exp1\"}");
    // The export goes away asynchronously; wait until QEMU reports the bitmap free again.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while m
        .qemu_list()
        .iter()
        .any(|l| l.0.as_deref() == Some("pre-dis") && l.4)
    {
        assert!(
            std::time::Instant::now() < deadline,
            "export of pre-dis not released"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    qd_bm_mut(&mut m.d, "pre-dis").set_busy(false);
    m.compare("pre-dis export deleted");

    // A transaction that succeeds.
    m.transaction(
        &[
            Act::Add("t1", 4096, true),
            Act::Merge("t1", &["pre-dis", "a"]),
            Act::Clear("c"),
            Act::Disable("pre"),
            Act::Enable("a"),
        ],
        false,
        "transaction 1 (commit)",
    );
    m.write(6, "writes 5");

    // A transaction with a failing last action: QEMU aborts everything (including the removal
    // of a stored persistent bitmap and a new bitmap).
    m.transaction(
        &[
            Act::Clear("a"),
            Act::Enable("pre"),
            Act::Disable("b"),
            Act::Merge("d", &["a"]),
            Act::Remove("pre-dis"),
            Act::Add("t2", 512, true),
            Act::Merge("t2", &["missing"]),
        ],
        true,
        "transaction 2 (missing source, aborted)",
    );
    m.write(4, "writes 6");

    // A transaction that fails on a bitmap its own remove made busy.
    m.transaction(
        &[Act::Clear("d"), Act::Remove("t1"), Act::Merge("a", &["t1"])],
        true,
        "transaction 3 (busy source, aborted)",
    );
    // A transaction that fails on the first action. (Not an enable or disable of a missing
    // bitmap: QEMU 10.0's abort of that action dereferences the NULL bitmap and segfaults.)
    m.transaction(
        &[Act::Clear("nope"), Act::Enable("a")],
        true,
        "transaction 4 (first action fails)",
    );

    // A transaction with removes that commits.
    m.transaction(
        &[
            Act::Remove("c"),
            Act::Remove("t1"),
            Act::Clear("b"),
            Act::Merge("d", &["pre"]),
            Act::Add("t3", 65536, true),
            Act::Disable("t3"),
        ],
        false,
        "transaction 5 (removes, commit)",
    );
    m.qmp_simple("remove", "d");
    m.write(5, "writes 7");
    m.qmp_merge("t3", &["pre-dis", "b", "a"]);

    let Mirror { q, d, .. } = m;
    q.quit();
    d.close().expect("qdirty close");
    same_images(&qimg, &dimg);
    let names: Vec<String> = qemu_img_info_bitmaps(&qimg, false)
        .into_iter()
        .map(|b| b.name)
        .collect();
    let mut sorted = names.clone();
    sorted.sort();
    assert_eq!(
        sorted,
        vec!["a", "b", "pre", "pre-dis", "t3"],
        "the aborted removal of pre-dis was stored again by both"
    );
    assert_sha256_match(&dimg, &tmp, "qdirty's copy after close");
}

// ------------------------------------------------------------------------------------------
// Reopen read-write -> read-only -> read-write
// ------------------------------------------------------------------------------------------

#[test]
fn reopen_ro_and_rw_match_qemu() {
    if !require_qemu("reopen_ro_and_rw_match_qemu") {
        return;
    }
    let tmp = TempDir::new("imirror-reopen");
    let img = tmp.join("r.qcow2");
    let size = 16 * MIB;
    qemu_img_create(&img, size, "cluster_size=65536", &[]);
    qemu_img_bitmap_add(&img, "r", Some(4096), false);
    qemu_img_bitmap_add(&img, "r2", Some(65536), true);
    let mut rng = Prng::new(7);
    let w0 = random_ranges(&mut rng, 8, size, 500_000, 1);
    qemu_io_write(&img, &w0);

    let mut d = qd_open(&img, true);
    let in_use = |force: bool| -> Vec<(String, bool, bool)> {
        let mut v: Vec<(String, bool, bool)> = qemu_img_info_bitmaps(&img, force)
            .into_iter()
            .map(|b| (b.name.clone(), b.in_use(), b.auto()))
            .collect();
        v.sort();
        v
    };
    assert_eq!(
        in_use(true),
        vec![("r".into(), true, true), ("r2".into(), true, false)],
        "open read-write marks the bitmaps in_use"
    );
    let w1 = random_ranges(&mut rng, 6, size, 300_000, 1);
    for &(o, l) in &w1 {
        d.set_dirty(o, l);
    }
    let runs_r = qdirty_runs(qd_bm(&mut d, "r"));
    let sha_r = qd_bm(&mut d, "r").sha256().unwrap();
    let sha_r2 = qd_bm(&mut d, "r2").sha256().unwrap();
    assert_eq!(
        runs_r,
        expected_runs(&[w0.clone(), w1.clone()].concat(), 4096, size)
    );

    // To read-only: stored, readonly, no in_use while still open.
    d.reopen(false).expect("reopen read-only");
    assert!(d.read_only());
    for n in ["r", "r2"] {
        assert!(
            qd_bm(&mut d, n).readonly(),
            "'{n}' readonly after reopen(false)"
        );
    }
    assert!(d.bitmaps().has_readonly());
    assert_eq!(
        in_use(true),
        vec![("r".into(), false, true), ("r2".into(), false, false)],
        "reopen(false) stored the bitmaps (no in-use while open)"
    );
    assert_check_clean(&img, "after reopen(false), image still open");
    assert_eq!(
        nbd_dirty_extents(&img, "r"),
        runs_r,
        "QEMU sees the stored bits"
    );
    // Writes are refused.
    d.set_dirty(0, size);
    assert_eq!(
        qd_bm(&mut d, "r").sha256().unwrap(),
        sha_r,
        "write hook skips readonly"
    );
    assert_eq!(qd_bm(&mut d, "r2").sha256().unwrap(), sha_r2);
    let e = qd_bm_mut(&mut d, "r")
        .set_dirty(0, 1)
        .expect_err("readonly");
    assert_eq!(
        e.to_string(),
        "Bitmap 'r' is readonly and cannot be modified"
    );
    assert!(matches!(
        qd_bm_mut(&mut d, "r").clear(),
        Err(Error::ReadOnlyBitmap { .. })
    ));
    assert!(matches!(
        d.remove_bitmap(b"r"),
        Err(Error::ReadOnlyBitmap { .. })
    ));
    let e = d
        .add_bitmap(
            b"new",
            4096,
            AddOptions {
                persistent: true,
                ..AddOptions::default()
            },
        )
        .expect_err("persistent add on a read-only image");
    assert_eq!(e.errno(), libc::EROFS, "{e}");
    assert!(d.store_bitmaps().is_err());

    // Back to read-write: in_use again, writes tracked.
    d.reopen(true).expect("reopen read-write");
    assert!(!d.read_only());
    for n in ["r", "r2"] {
        assert!(
            !qd_bm(&mut d, n).readonly(),
            "'{n}' writable after reopen(true)"
        );
    }
    assert_eq!(
        in_use(true),
        vec![("r".into(), true, true), ("r2".into(), true, false)],
        "reopen(true) marks the bitmaps in_use"
    );
    let w2 = random_ranges(&mut rng, 6, size, 300_000, 1);
    for &(o, l) in &w2 {
        d.set_dirty(o, l);
    }
    let want = expected_runs(&[w0, w1, w2].concat(), 4096, size);
    assert_eq!(
        qdirty_runs(qd_bm(&mut d, "r")),
        want,
        "writes tracked again"
    );
    assert_eq!(
        qd_bm(&mut d, "r2").sha256().unwrap(),
        sha_r2,
        "r2 stays disabled"
    );
    let sha_r = qd_bm(&mut d, "r").sha256().unwrap();
    d.close().expect("close");

    assert_check_clean(&img, "after close");
    assert_eq!(
        in_use(false),
        vec![("r".into(), false, true), ("r2".into(), false, false)]
    );
    assert_eq!(nbd_dirty_extents(&img, "r"), want, "QEMU sees the new bits");
    let shas = qemu_sha256s(&img, &["r".to_string(), "r2".to_string()], &tmp);
    assert_eq!(shas["r"], sha_r);
    assert_eq!(shas["r2"], sha_r2);
}
