//! Interop A: QEMU writes, qdirty reads.
//!
//! Images and bitmaps are made by qemu-img / qemu-io / qemu-storage-daemon in many shapes; qdirty
//! must see exactly what QEMU sees: the same names, granularities, enabled == "auto", the dirty
//! runs QEMU exports over NBD, and the SHA-256 QEMU computes (x-debug-block-dirty-bitmap-sha256).

mod common;

use std::path::Path;

use common::*;

const MIB: u64 = 1 << 20;

/// A bitmap made by QEMU in a scenario.
struct Spec {
    name: String,
    granularity: Option<u64>,
}

fn spec(name: &str, granularity: Option<u64>) -> Spec {
    Spec {
        name: name.to_string(),
        granularity,
    }
}

/// Runs the standard QEMU-side scenario on an existing image and checks qdirty against QEMU:
/// 1. every bitmap in `specs` is added enabled, plus "never" added disabled;
/// 2. random writes (phase 1);
/// 3. every odd-indexed bitmap is disabled with `qemu-img bitmap --disable`;
/// 4. `between` runs (e.g. an internal snapshot), then random writes (phase 2);
/// 5. QEMU's extents are checked against the writes (so the scenario did what it meant), then
///    qdirty's view is checked against QEMU's (names, flags, runs, count, SHA-256).
fn scenario(
    tmp: &TempDir,
    img: &Path,
    specs: &[Spec],
    seed: u64,
    writes: usize,
    max_len: u64,
    between: &dyn Fn(),
) {
    let size = qemu_img_info(img, false)
        .get("virtual-size")
        .and_then(Json::as_u64)
        .expect("virtual-size");
    for s in specs {
        qemu_img_bitmap_add(img, &s.name, s.granularity, false);
    }
    qemu_img_bitmap_add(img, "never", None, true);
    let mut rng = Prng::new(seed);
    let phase1 = random_ranges(&mut rng, writes, size, max_len, 1);
    qemu_io_write(img, &phase1);
    for s in specs.iter().skip(1).step_by(2) {
        qemu_img_bitmap(img, &["--disable"], &s.name);
    }
    between();
    let phase2 = random_ranges(&mut rng, writes, size, max_len, 1);
    qemu_io_write(img, &phase2);
    let info = qemu_img_info_bitmaps(img, false);
    let all: Vec<(u64, u64)> = phase1.iter().chain(phase2.iter()).copied().collect();
    for (i, s) in specs.iter().enumerate() {
        let q = info
            .iter()
            .find(|b| b.name == s.name)
            .expect("QEMU lists the bitmap");
        let want = if i % 2 == 0 {
            expected_runs(&all, q.granularity, size)
        } else {
            expected_runs(&phase1, q.granularity, size)
        };
        let got = nbd_dirty_extents(img, &s.name);
        assert!(
            got == want,
            "scenario sanity: QEMU's runs of '{}' are not the writes: {}",
            short(&s.name),
            diff_runs(&got, &want)
        );
        assert_eq!(
            q.auto(),
            i % 2 == 0,
            "scenario sanity: flags of '{}': {:?}",
            short(&s.name),
            q.flags
        );
    }
    assert_eq!(nbd_dirty_extents(img, "never"), vec![]);
    assert_check_clean(img, "QEMU-made image");
    let runs = assert_qdirty_matches_qemu(img, &format!("{}", img.display()));
    assert_sha256_match(img, tmp, &format!("{}", img.display()));
    // A qdirty read-write session without changes rewrites every bitmap: QEMU must see the
    // same bitmaps afterwards, in the same directory order, and a clean image.
    let info_before = qemu_img_info_bitmaps(img, false);
    qd_open(img, true)
        .close()
        .expect("close after a read-write session");
    assert_check_clean(img, "after a qdirty read-write session");
    assert_eq!(
        qemu_img_info_bitmaps(img, false),
        info_before,
        "qemu-img info after a qdirty read-write session (left) vs before (right)"
    );
    for (name, r) in &runs {
        let now = nbd_dirty_extents(img, name);
        assert!(
            &now == r,
            "runs of '{}' changed by a qdirty read-write session: {}",
            short(name),
            diff_runs(r, &now)
        );
    }
}

fn standard_specs(cluster: u64) -> Vec<Spec> {
    vec![
        spec("default", None),
        spec("g512", Some(512)),
        spec("cluster", Some(cluster.max(512))),
        spec("g64k", Some(65536)),
        spec("g1m", Some(MIB)),
        spec("g4m", Some(4 * MIB)),
    ]
}

fn cluster_size_case(test: &str, cluster: u64, size: u64) {
    if !require_qemu(test) {
        return;
    }
    let tmp = TempDir::new(test);
    let img = tmp.join("a.qcow2");
    qemu_img_create(&img, size, &format!("cluster_size={cluster}"), &[]);
    scenario(
        &tmp,
        &img,
        &standard_specs(cluster),
        cluster,
        30,
        300_000,
        &|| {},
    );
}

#[test]
fn a_cluster_size_512() {
    cluster_size_case("a_cluster_size_512", 512, 24 * MIB + 512);
}

#[test]
fn a_cluster_size_4k() {
    cluster_size_case("a_cluster_size_4k", 4096, 40 * MIB + 3 * 512);
}

#[test]
fn a_cluster_size_64k() {
    cluster_size_case("a_cluster_size_64k", 65536, 64 * MIB);
}

#[test]
fn a_cluster_size_2m() {
    cluster_size_case("a_cluster_size_2m", 2 * MIB, 64 * MIB + 7 * 512);
}

fn refcount_case(test: &str, bits: u32) {
    if !require_qemu(test) {
        return;
    }
    let tmp = TempDir::new(test);
    let img = tmp.join("a.qcow2");
    qemu_img_create(
        &img,
        32 * MIB,
        &format!("cluster_size=4096,refcount_bits={bits}"),
        &[],
    );
    scenario(
        &tmp,
        &img,
        &standard_specs(4096),
        u64::from(bits) + 100,
        25,
        200_000,
        &|| {},
    );
}

#[test]
fn a_refcount_bits_1() {
    refcount_case("a_refcount_bits_1", 1);
}

#[test]
fn a_refcount_bits_16() {
    refcount_case("a_refcount_bits_16", 16);
}

#[test]
fn a_refcount_bits_64() {
    refcount_case("a_refcount_bits_64", 64);
}

#[test]
fn a_granularities_512_to_16m() {
    let test = "a_granularities_512_to_16m";
    if !require_qemu(test) {
        return;
    }
    let tmp = TempDir::new(test);
    let img = tmp.join("a.qcow2");
    // Not a multiple of any granularity above 512.
    qemu_img_create(&img, 100 * MIB + 512, "", &[]);
    let specs: Vec<Spec> = (9..=24)
        .map(|b| spec(&format!("g{}", 1u64 << b), Some(1u64 << b)))
        .collect();
    scenario(&tmp, &img, &specs, 9, 40, 2 * MIB, &|| {});
}

#[test]
fn a_extended_l2() {
    let test = "a_extended_l2";
    if !require_qemu(test) {
        return;
    }
    let tmp = TempDir::new(test);
    let img = tmp.join("a.qcow2");
    qemu_img_create(&img, 48 * MIB, "cluster_size=65536,extended_l2=on", &[]);
    let info = qemu_img_info(&img, false);
    assert_eq!(
        info.path(&["format-specific", "data", "extended-l2"])
            .and_then(Json::as_bool),
        Some(true)
    );
    scenario(&tmp, &img, &standard_specs(65536), 77, 30, 100_000, &|| {});
}

#[test]
fn a_external_data_file() {
    let test = "a_external_data_file";
    if !require_qemu(test) {
        return;
    }
    let tmp = TempDir::new(test);
    let img = tmp.join("a.qcow2");
    // A relative data file name: every tool runs with cwd = the image's directory.
    qemu_img_create(&img, 32 * MIB, "data_file=a.data", &[]);
    assert!(tmp.join("a.data").exists());
    scenario(&tmp, &img, &standard_specs(65536), 5, 30, 200_000, &|| {});
}

#[test]
fn a_backing_file() {
    let test = "a_backing_file";
    if !require_qemu(test) {
        return;
    }
    let tmp = TempDir::new(test);
    let base = tmp.join("base.qcow2");
    let img = tmp.join("top.qcow2");
    qemu_img_create(&base, 32 * MIB, "cluster_size=4096", &[]);
    qemu_img_bitmap_add(&base, "in-base", Some(4096), false);
    qemu_io_write(&base, &[(0, 5000), (10 * MIB, 123_456)]);
    qemu_img_create(&img, 32 * MIB, "", &["-b", "base.qcow2", "-F", "qcow2"]);
    scenario(&tmp, &img, &standard_specs(65536), 11, 30, 200_000, &|| {});
    // The base's bitmap belongs to the base only.
    let top = qd_open(&img, false);
    assert!(
        top.find_bitmap(b"in-base").is_none(),
        "qdirty lists the backing file's bitmap on the overlay"
    );
    top.close().unwrap();
    assert_qdirty_matches_qemu(&base, "backing file itself");
}

#[test]
fn a_internal_snapshots() {
    let test = "a_internal_snapshots";
    if !require_qemu(test) {
        return;
    }
    let tmp = TempDir::new(test);
    let img = tmp.join("a.qcow2");
    qemu_img_create(&img, 32 * MIB, "cluster_size=4096", &[]);
    qemu_io_write(&img, &[(0, MIB), (8 * MIB, 3 * MIB)]);
    run_ok("qemu-img", &["snapshot", "-c", "s0", "a.qcow2"], tmp.path());
    let snap1 = || {
        run_ok("qemu-img", &["snapshot", "-c", "s1", "a.qcow2"], tmp.path());
    };
    scenario(&tmp, &img, &standard_specs(4096), 13, 25, 500_000, &snap1);
    run_ok("qemu-img", &["snapshot", "-c", "s2", "a.qcow2"], tmp.path());
    let info = qemu_img_info(&img, false);
    assert_eq!(
        info.get("snapshots")
            .and_then(Json::as_array)
            .map(<[_]>::len),
        Some(3)
    );
    assert_qdirty_matches_qemu(&img, "after a third snapshot");
}

#[test]
fn a_zstd_and_compressed_clusters() {
    let test = "a_zstd_and_compressed_clusters";
    if !require_qemu(test) {
        return;
    }
    let tmp = TempDir::new(test);
    let img = tmp.join("a.qcow2");
    qemu_img_create(&img, 16 * MIB, "compression_type=zstd", &[]);
    let info = qemu_img_info(&img, false);
    assert_eq!(
        info.path(&["format-specific", "data", "compression-type"])
            .and_then(Json::as_str),
        Some("zstd")
    );
    qemu_img_bitmap_add(&img, "before-compressed", Some(512), false);
    // Compressed writes must be cluster aligned.
    qemu_io(
        &img,
        &[
            "write -c -P 0x5a 0 64k".into(),
            "write -c -P 0x11 2M 128k".into(),
        ],
    );
    assert_eq!(
        nbd_dirty_extents(&img, "before-compressed"),
        vec![(0, 65536), (2 * MIB, 131_072)]
    );
    scenario(&tmp, &img, &standard_specs(65536), 17, 20, 100_000, &|| {});
}

#[test]
fn a_many_bitmaps_long_names() {
    let test = "a_many_bitmaps_long_names";
    if !require_qemu(test) {
        return;
    }
    let tmp = TempDir::new(test);
    let img = tmp.join("a.qcow2");
    qemu_img_create(&img, 16 * MIB + 512, "cluster_size=4096", &[]);
    let lens = [
        1usize, 2, 7, 8, 9, 15, 16, 17, 63, 64, 100, 255, 256, 257, 500, 511, 512, 513, 767, 1000,
        1021, 1022, 1023,
    ];
    let mut specs: Vec<Spec> = lens
        .iter()
        .enumerate()
        .map(|(i, &l)| {
            let mut n = format!("{i:02}-");
            let alphabet = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-";
            while n.len() < l {
                n.push(alphabet[(n.len() * 7 + i) % alphabet.len()] as char);
            }
            n.truncate(l);
            let g = 512u64 << (i % 8);
            spec(&n, Some(g))
        })
        .collect();
    // Non-ASCII bytes (UTF-8), up to the limit in bytes, not characters.
    let mut utf = String::from("ü-");
    while utf.len() + 2 <= 1023 {
        utf.push('é');
    }
    specs.push(spec(&utf, Some(65536)));
    specs.push(spec("x", None));
    assert!(specs.len() >= 25);
    assert!(specs.iter().any(|s| s.name.len() == 1023));
    scenario(&tmp, &img, &specs, 23, 30, 300_000, &|| {});
}

#[test]
fn a_sha256_full_empty_and_odd_sizes() {
    let test = "a_sha256_full_empty_and_odd_sizes";
    if !require_qemu(test) {
        return;
    }
    let tmp = TempDir::new(test);
    // Sizes that are not multiples of the granularities (and one that is).
    for (i, size) in [8 * MIB, 8 * MIB + 512, 5 * MIB + 7 * 512, 512 * 1000]
        .into_iter()
        .enumerate()
    {
        let img = tmp.join(&format!("s{i}.qcow2"));
        qemu_img_create(&img, size, "cluster_size=4096", &[]);
        for g in [512u64, 4096, 65536, 2 * MIB] {
            qemu_img_bitmap_add(&img, &format!("full{g}"), Some(g), false);
        }
        qemu_img_bitmap_add(&img, "empty", Some(65536), false);
        // A fully dirty bitmap: a write-zeroes over the whole disk marks everything.
        qemu_io(&img, &[format!("write -z 0 {size}")]);
        qemu_img_bitmap(&img, &["--clear"], "empty");
        qemu_img_bitmap(&img, &["--disable"], "empty");
        qemu_img_bitmap_add(&img, "last-byte", Some(1 << 20), false);
        qemu_io(&img, &[format!("write -P 0x33 {} 1", size - 1)]);
        for g in [512u64, 4096, 65536, 2 * MIB] {
            assert_eq!(
                nbd_dirty_extents(&img, &format!("full{g}")),
                vec![(0, size)],
                "sanity: fully dirty"
            );
        }
        assert_eq!(nbd_dirty_extents(&img, "empty"), vec![], "sanity: empty");
        let lg = 1 << 20;
        assert_eq!(
            nbd_dirty_extents(&img, "last-byte"),
            vec![((size - 1) / lg * lg, size - (size - 1) / lg * lg)]
        );
        assert_qdirty_matches_qemu(&img, &format!("size {size}"));
        assert_sha256_match(&img, &tmp, &format!("size {size}"));
    }
}

#[test]
fn a_bitmaps_made_over_qmp() {
    let test = "a_bitmaps_made_over_qmp";
    if !require_qemu(test) {
        return;
    }
    let tmp = TempDir::new(test);
    let img = tmp.join("a.qcow2");
    qemu_img_create(&img, 20 * MIB + 512, "cluster_size=16384", &[]);
    qemu_img_bitmap_add(&img, "src", Some(512), false);
    let mut rng = Prng::new(99);
    qemu_io_write(
        &img,
        &random_ranges(&mut rng, 50, 20 * MIB + 512, 40_000, 1),
    );
    let mut q = Qsd::start(&img, false, &tmp);
    q.bitmap_add("q-default", None, true, false);
    q.bitmap_add("q-disabled", Some(8192), true, true);
    q.bitmap_add("q-huge-granularity", Some(1 << 31), true, false);
    q.exec_ok(
        "block-dirty-bitmap-merge",
        r#"{"node":"fmt0","target":"q-disabled","bitmaps":["src"]}"#,
    );
    q.exec_ok(
        "block-dirty-bitmap-merge",
        r#"{"node":"fmt0","target":"q-huge-granularity","bitmaps":["src"]}"#,
    );
    q.exec_ok(
        "block-dirty-bitmap-disable",
        r#"{"node":"fmt0","name":"src"}"#,
    );
    q.bitmap_add("transient", Some(4096), false, false);
    q.quit();
    let info = qemu_img_info_bitmaps(&img, false);
    assert_eq!(info.len(), 4, "{info:?}");
    assert_qdirty_matches_qemu(&img, "QMP-made bitmaps");
    assert_sha256_match(&img, &tmp, "QMP-made bitmaps");
}
