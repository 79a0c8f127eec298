//! Interop B: qdirty writes, QEMU reads.
//!
//! Images and bitmaps written by qdirty must pass `qemu-img check` with no corruptions and no
//! leaks, show the right flags in `qemu-img info` (auto iff enabled, never in-use after close),
//! export over NBD exactly the ranges that were set (rounded outward to granules, computed here
//! independently), and leave guest data untouched (`qemu-img compare`).

mod common;

use std::path::Path;

use common::*;
use qdirty::Image;

const MIB: u64 = 1 << 20;

/// What the test set on one bitmap, to compare with QEMU.
struct Want {
    name: String,
    granularity: u64,
    enabled: bool,
    /// Ranges set (before rounding).
    ranges: Vec<(u64, u64)>,
}

/// Checks the image against the expectations: check clean, info flags/granularity, NBD runs.
fn verify(img: &Path, wants: &[Want], context: &str) {
    assert_check_clean(img, context);
    let info = qemu_img_info_bitmaps(img, false);
    let size = qemu_img_info(img, false)
        .get("virtual-size")
        .and_then(Json::as_u64)
        .expect("virtual-size");
    let mut names: Vec<&str> = info.iter().map(|b| b.name.as_str()).collect();
    let mut want_names: Vec<&str> = wants.iter().map(|w| w.name.as_str()).collect();
    names.sort_unstable();
    want_names.sort_unstable();
    assert_eq!(names, want_names, "{context}: bitmaps QEMU lists");
    for w in wants {
        let q = info.iter().find(|b| b.name == w.name).expect("listed");
        assert!(
            !q.in_use(),
            "{context}: '{}' is in-use after close: {:?}",
            short(&w.name),
            q.flags
        );
        assert_eq!(
            q.auto(),
            w.enabled,
            "{context}: auto flag of '{}' ({:?})",
            short(&w.name),
            q.flags
        );
        assert_eq!(
            q.granularity,
            w.granularity,
            "{context}: granularity of '{}'",
            short(&w.name)
        );
        let want = expected_runs(&w.ranges, w.granularity, size);
        let got = nbd_dirty_extents(img, &w.name);
        assert!(
            got == want,
            "{context}: '{}' runs (QEMU vs set): {}",
            short(&w.name),
            diff_runs(&got, &want)
        );
    }
}

/// Adds bitmaps with qdirty (granularity 0 = default), sets ranges on each through the bitmap,
/// then guest-writes through the image hook (enabled bitmaps only). Returns the expectations
/// (default granularities resolved by `default_g`).
fn add_and_dirty(
    image: &mut Image,
    seed: u64,
    specs: &[(&str, u64, bool)],
    default_g: u64,
) -> Vec<Want> {
    let size = image.size();
    let mut rng = Prng::new(seed);
    let mut wants = Vec::new();
    for &(name, g, disabled) in specs {
        qd_add(image, name, g, disabled);
        let ranges = random_ranges(&mut rng, 25, size, 3 * MIB, 1);
        let bm = qd_bm_mut(image, name);
        for &(o, l) in &ranges {
            bm.set_dirty(o, l)
                .unwrap_or_else(|e| panic!("set_dirty({o}, {l}) on {name}: {e}"));
        }
        wants.push(Want {
            name: name.to_string(),
            granularity: if g == 0 { default_g } else { g },
            enabled: !disabled,
            ranges,
        });
    }
    let hook = random_ranges(&mut rng, 10, size, MIB, 1);
    for &(o, l) in &hook {
        image.set_dirty(o, l);
    }
    for w in wants.iter_mut().filter(|w| w.enabled) {
        w.ranges.extend_from_slice(&hook);
    }
    wants
}

/// Number of used (non-zero) refcount table entries, read from the file.
fn reftable_used(img: &Path) -> usize {
    let h = raw_header(img);
    let len = h.refcount_table_clusters as usize * (1usize << h.cluster_bits);
    let t = read_at(img, h.refcount_table_offset, len);
    t.chunks(8).filter(|e| e.iter().any(|&b| b != 0)).count()
}

const SPECS: &[(&str, u64, bool)] = &[
    ("default-enabled", 0, false),
    ("default-disabled", 0, true),
    ("g512", 512, false),
    ("g4k-off", 4096, true),
    ("g64k", 65536, false),
    ("g1m", MIB, false),
    ("g8m-off", 8 * MIB, true),
];

#[test]
fn b_create_blank_images() {
    let test = "b_create_blank_images";
    if !require_qemu(test) {
        return;
    }
    let tmp = TempDir::new(test);
    let mut n = 0;
    for cluster in [512u32, 4096, 65536, 2 * MIB as u32] {
        for size in [0u64, 512, 3 * 512 + 100, MIB, 64 * MIB + 512, 10 << 30] {
            n += 1;
            let img = tmp.join(&format!("c{n}.qcow2"));
            Image::create(&img, size, cluster)
                .unwrap_or_else(|e| panic!("create {size} {cluster}: {e}"));
            let ctx = format!("Image::create(size {size}, cluster {cluster})");
            assert_check_clean(&img, &ctx);
            let info = qemu_img_info(&img, false);
            assert_eq!(
                info.get("virtual-size").and_then(Json::as_u64),
                Some(size.next_multiple_of(512)),
                "{ctx}"
            );
            assert_eq!(
                info.get("cluster-size").and_then(Json::as_u64),
                Some(u64::from(cluster)),
                "{ctx}"
            );
            assert_eq!(
                info.path(&["format-specific", "data", "compat"])
                    .and_then(Json::as_str),
                Some("1.1"),
                "{ctx}"
            );
            assert!(bitmaps_of_info(&info).is_empty(), "{ctx}");
            let h = raw_header(&img);
            assert_eq!(h.version, 3, "{ctx}");
            assert_eq!(
                h.autoclear & 1,
                0,
                "{ctx}: autoclear bit 0 set without bitmaps"
            );
            assert!(h.ext(EXT_BITMAPS).is_none(), "{ctx}");
            if size >= MIB {
                // QEMU can use it as a disk.
                qemu_io(
                    &img,
                    &[
                        format!("write -P 0x42 {} 4096", size / 2),
                        format!("read -P 0x42 {} 4096", size / 2),
                    ],
                );
                assert_check_clean(&img, &format!("{ctx} after a QEMU write"));
            }
        }
    }
    // Refuses to overwrite.
    let again = tmp.join("c1.qcow2");
    assert!(
        Image::create(&again, MIB, 65536).is_err(),
        "create over an existing file must fail"
    );
}

fn blank_case(test: &str, size: u64, cluster: u32) {
    if !require_qemu(test) {
        return;
    }
    let tmp = TempDir::new(test);
    let img = tmp.join("a.qcow2");
    Image::create(&img, size, cluster).expect("create");
    let mut image = qd_open(&img, true);
    let default_g = u64::from(cluster).clamp(4096, 65536);
    assert_eq!(image.default_granularity(), default_g);
    let mut wants = add_and_dirty(&mut image, u64::from(cluster), SPECS, default_g);
    image.close().expect("close");
    verify(&img, &wants, &format!("{test} first session"));
    assert_qdirty_matches_qemu(&img, &format!("{test} read back"));

    // Second session: reset a granule-aligned range of one bitmap, add another, close.
    let w = &mut wants[2]; // g512
    let runs = nbd_dirty_extents(&img, &w.name);
    let mut image = qd_open(&img, true);
    let bm = qd_bm_mut(&mut image, &w.name);
    let (o, l) = runs[0];
    bm.reset_dirty(o, l).expect("reset a whole run");
    w.ranges = runs[1..].to_vec();
    let mut more = add_and_dirty(
        &mut image,
        1234,
        &[("second-session", 2048, false)],
        default_g,
    );
    // The hook also dirtied the other enabled bitmaps in this session.
    let hook: Vec<(u64, u64)> = more[0].ranges[25..].to_vec();
    for w in wants.iter_mut().filter(|w| w.enabled) {
        w.ranges.extend_from_slice(&hook);
    }
    wants.append(&mut more);
    image.close().expect("close");
    verify(&img, &wants, &format!("{test} second session"));

    // A read-write open and close without changes keeps everything.
    let before = qemu_img_info_bitmaps(&img, false);
    qd_open(&img, true).close().expect("close");
    assert_eq!(qemu_img_info_bitmaps(&img, false), before);
    verify(&img, &wants, &format!("{test} third session"));
}

#[test]
fn b_blank_512_clusters() {
    blank_case("b_blank_512_clusters", 40 * MIB + 512, 512);
}

#[test]
fn b_blank_4k_clusters() {
    blank_case("b_blank_4k_clusters", 64 * MIB + 3 * 512, 4096);
}

#[test]
fn b_blank_64k_clusters() {
    blank_case("b_blank_64k_clusters", 100 * MIB, 65536);
}

#[test]
fn b_blank_2m_clusters() {
    blank_case("b_blank_2m_clusters", 70 * MIB + 512, 2 * MIB as u32);
}

#[test]
fn b_default_granularity_matches_qemu() {
    let test = "b_default_granularity_matches_qemu";
    if !require_qemu(test) {
        return;
    }
    let tmp = TempDir::new(test);
    for cluster in [512u64, 4096, 16384, 65536, 2 * MIB] {
        let q = tmp.join(&format!("q{cluster}.qcow2"));
        qemu_img_create(&q, 8 * MIB, &format!("cluster_size={cluster}"), &[]);
        qemu_img_bitmap_add(&q, "d", None, false);
        let qemu_g = qemu_img_info_bitmaps(&q, false)[0].granularity;
        let d = tmp.join(&format!("d{cluster}.qcow2"));
        qemu_img_create(&d, 8 * MIB, &format!("cluster_size={cluster}"), &[]);
        let mut image = qd_open(&d, true);
        qd_add(&mut image, "d", 0, false);
        image.close().expect("close");
        assert_eq!(
            qemu_img_info_bitmaps(&d, false)[0].granularity,
            qemu_g,
            "cluster size {cluster}"
        );
        assert_check_clean(&d, "default granularity");
    }
}

/// An image QEMU made (by `make`) gets guest data from qemu-io and a QEMU bitmap; a copy is
/// kept; then qdirty adds bitmaps, dirties the QEMU one more and closes. Everything is checked,
/// including that guest data is identical to the copy.
fn qemu_shape_case(test: &str, make: &dyn Fn(&TempDir, &Path)) {
    if !require_qemu(test) {
        return;
    }
    let tmp = TempDir::new(test);
    let img = tmp.join("a.qcow2");
    make(&tmp, &img);
    let size = qemu_img_info(&img, false)
        .get("virtual-size")
        .and_then(Json::as_u64)
        .expect("size");
    qemu_img_bitmap_add(&img, "from-qemu", Some(65536), false);
    let mut rng = Prng::new(size);
    let writes = random_ranges(&mut rng, 30, size, 200_000, 1);
    qemu_io_write(&img, &writes);
    let before_q = nbd_dirty_extents(&img, "from-qemu");
    assert_eq!(before_q, expected_runs(&writes, 65536, size), "sanity");
    let copy_path = tmp.join("copy.qcow2");
    copy(&img, &copy_path);
    let data_file = tmp.join("a.data");
    let data_before = data_file.exists().then(|| read_file(&data_file));
    let snapshots_before = qemu_img_info(&img, false).get("snapshots").cloned();

    let mut image = qd_open(&img, true);
    let default_g = image.default_granularity();
    let mut wants = add_and_dirty(&mut image, 5, SPECS, default_g);
    let extra = (size / 3, 12345);
    qd_bm_mut(&mut image, "from-qemu")
        .set_dirty(extra.0, extra.1)
        .expect("set on QEMU's bitmap");
    image.close().expect("close");
    // The QEMU bitmap: its old runs, the extra range, and the hook writes (it is enabled).
    let hook: Vec<(u64, u64)> = wants[0].ranges[25..].to_vec();
    let mut ranges = before_q.clone();
    ranges.push(extra);
    ranges.extend_from_slice(&hook);
    wants.push(Want {
        name: "from-qemu".into(),
        granularity: 65536,
        enabled: true,
        ranges,
    });
    verify(&img, &wants, test);
    let (rc, out) = qemu_img_compare(&copy_path, &img);
    assert_eq!(rc, 0, "{test}: guest data changed: {out}");
    if let Some(d) = data_before {
        assert!(
            read_file(&data_file) == d,
            "{test}: the external data file changed"
        );
    }
    assert_eq!(
        qemu_img_info(&img, false).get("snapshots").cloned(),
        snapshots_before,
        "{test}: snapshots changed"
    );
    // QEMU can go on using the image and its bitmaps.
    qemu_io_write(&img, &[(0, 1)]);
    assert_check_clean(&img, &format!("{test} after QEMU used it again"));
    assert_qdirty_matches_qemu(&img, test);
}

#[test]
fn b_guest_data_unchanged_plain() {
    qemu_shape_case("b_guest_data_unchanged_plain", &|_, img| {
        qemu_img_create(img, 48 * MIB, "", &[]);
    });
}

#[test]
fn b_on_external_data_file() {
    qemu_shape_case("b_on_external_data_file", &|_, img| {
        qemu_img_create(img, 32 * MIB, "data_file=a.data", &[]);
    });
}

#[test]
fn b_on_backing_file() {
    qemu_shape_case("b_on_backing_file", &|tmp, img| {
        let base = tmp.join("base.qcow2");
        qemu_img_create(&base, 32 * MIB, "cluster_size=4096", &[]);
        qemu_io_write(&base, &[(0, 3 * MIB), (20 * MIB, 100_000)]);
        qemu_img_bitmap_add(&base, "base-bitmap", None, false);
        qemu_img_create(img, 32 * MIB, "", &["-b", "base.qcow2", "-F", "qcow2"]);
    });
}

#[test]
fn b_on_internal_snapshots() {
    qemu_shape_case("b_on_internal_snapshots", &|tmp, img| {
        qemu_img_create(img, 32 * MIB, "cluster_size=4096", &[]);
        qemu_io_write(img, &[(0, MIB), (5 * MIB, 3 * MIB)]);
        run_ok("qemu-img", &["snapshot", "-c", "s1", "a.qcow2"], tmp.path());
        qemu_io_write(img, &[(MIB / 2, MIB), (30 * MIB, 4096)]);
        run_ok("qemu-img", &["snapshot", "-c", "s2", "a.qcow2"], tmp.path());
    });
}

#[test]
fn b_on_extended_l2() {
    qemu_shape_case("b_on_extended_l2", &|_, img| {
        qemu_img_create(img, 32 * MIB, "cluster_size=32768,extended_l2=on", &[]);
    });
}

#[test]
fn b_on_zstd_refcount_bits_1() {
    qemu_shape_case("b_on_zstd_refcount_bits_1", &|_, img| {
        qemu_img_create(
            img,
            32 * MIB,
            "compression_type=zstd,refcount_bits=1,cluster_size=4096",
            &[],
        );
        qemu_io(img, &["write -c -P 0x5a 0 64k".into()]);
    });
}

/// 512-byte clusters and lots of bitmap data: qdirty must allocate new refcount blocks and grow
/// the refcount table, and QEMU must find every refcount right.
fn refcount_growth_case(test: &str, refcount_bits: u32, nbitmaps: usize) {
    if !require_qemu(test) {
        return;
    }
    let tmp = TempDir::new(test);
    let img = tmp.join("a.qcow2");
    let size = 1 << 30;
    qemu_img_create(
        &img,
        size,
        &format!("cluster_size=512,refcount_bits={refcount_bits}"),
        &[],
    );
    qemu_io_write(&img, &[(0, 4096), (size / 2, 4096)]);
    let copy_path = tmp.join("copy.qcow2");
    copy(&img, &copy_path);
    let before = raw_header(&img);
    let refblocks_before = reftable_used(&img);
    let file_before = std::fs::metadata(&img).unwrap().len();
    let mut image = qd_open(&img, true);
    let mut wants = Vec::new();
    let mut rng = Prng::new(u64::from(refcount_bits));
    for i in 0..nbitmaps {
        let name = format!("dense{i}");
        qd_add(&mut image, &name, 512, i % 3 == 2);
        let bm = qd_bm_mut(&mut image, &name);
        let ranges = if i % 2 == 0 {
            vec![(0, size)]
        } else {
            // One granule in every 4 KiB of bitmap data: every data cluster is allocated.
            let mut r: Vec<(u64, u64)> = (0..size)
                .step_by(512 * 8 * 512)
                .map(|o| (o + rng.below(512 * 8 * 512 - 512), 1))
                .collect();
            r.push((size - 1, 1));
            r
        };
        for &(o, l) in &ranges {
            bm.set_dirty(o, l).expect("set_dirty");
        }
        wants.push(Want {
            name,
            granularity: 512,
            enabled: i % 3 != 2,
            ranges,
        });
    }
    image.close().expect("close");
    let after = raw_header(&img);
    let file_after = std::fs::metadata(&img).unwrap().len();
    let rt_cover = u64::from(before.refcount_table_clusters) * 512 / 8
        * (512 * 8 / u64::from(refcount_bits))
        * 512;
    assert!(
        file_after > file_before + (256 << 10),
        "{test}: the bitmaps should take room ({file_before} -> {file_after})"
    );
    let refblocks_after = reftable_used(&img);
    assert!(
        refblocks_after > refblocks_before,
        "{test}: no new refcount block ({refblocks_before} -> {refblocks_after}) for {file_after} bytes"
    );
    if refcount_bits == 64 {
        // The shape this case exists for: the refcount table itself had to grow.
        assert!(file_after > rt_cover, "{test}: test shape: the file ({file_after}) stays within the reftable's reach ({rt_cover})");
        assert!(
            after.refcount_table_clusters > before.refcount_table_clusters,
            "{test}: file grew to {file_after} bytes, beyond what the refcount table covered ({rt_cover}), yet the table did not grow"
        );
    }
    verify(&img, &wants, test);
    let (rc, out) = qemu_img_compare(&copy_path, &img);
    assert_eq!(rc, 0, "{test}: guest data changed: {out}");
    // Remove half of them again: everything freed, still consistent.
    let mut image = qd_open(&img, true);
    for w in wants.iter().step_by(2) {
        image.remove_bitmap(w.name.as_bytes()).expect("remove");
    }
    image.close().expect("close");
    let kept: Vec<Want> = wants.into_iter().skip(1).step_by(2).collect();
    verify(&img, &kept, &format!("{test} after removals"));
}

#[test]
fn b_refcount_table_growth_512_clusters_64bit_refcounts() {
    // Reftable of 1 cluster covers 64 refblocks * 64 clusters * 512 B = 2 MiB; the bitmaps
    // need more than 3 MiB.
    refcount_growth_case(
        "b_refcount_table_growth_512_clusters_64bit_refcounts",
        64,
        14,
    );
}

#[test]
fn b_new_refblocks_512_clusters_16bit_refcounts() {
    refcount_growth_case("b_new_refblocks_512_clusters_16bit_refcounts", 16, 5);
}

/// A relative file name of exactly `len` bytes (nested directories: a name component is at most
/// 255 bytes).
fn name_of_len(len: usize) -> String {
    let mut s = String::new();
    while len - s.len() > 120 {
        s.push_str(&"d".repeat(99));
        s.push('/');
    }
    s.push_str(&"f".repeat(len - s.len() - 4));
    s.push_str(".raw");
    assert_eq!(s.len(), len);
    s
}

/// 512-byte clusters and a backing file name so long that cluster 0 has no room for the bitmaps
/// extension, or just enough: adding a persistent bitmap and closing succeeds with qdirty
/// exactly where `qemu-img bitmap --add` succeeds. Where QEMU fails (ENOSPC, "Failed to update
/// bitmap extension") qdirty fails the same way; neither leaves a leak or a bitmap behind.
#[test]
fn b_no_room_for_the_bitmaps_extension() {
    let test = "b_no_room_for_the_bitmaps_extension";
    if !require_qemu(test) {
        return;
    }
    let tmp = TempDir::new(test);
    let (mut fits, mut full) = (0, 0);
    for len in [320, 336, 340, 344, 345, 348, 352, 376] {
        let backing = name_of_len(len);
        let path = tmp.join(&backing);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, vec![0u8; MIB as usize]).unwrap();
        let q = tmp.join(&format!("q{len}.qcow2"));
        qemu_img_create(&q, MIB, "cluster_size=512", &["-b", &backing, "-F", "raw"]);
        let d = tmp.join(&format!("d{len}.qcow2"));
        std::fs::copy(&q, &d).unwrap();

        let (dir, base) = split(&q);
        let out = run(
            "qemu-img",
            &["bitmap", "--add", "-f", "qcow2", &base, "bm"],
            &dir,
        );
        let qemu_ok = out.status.success();
        let qemu_err = String::from_utf8_lossy(&out.stderr).into_owned();

        let mut img = Image::open(&d, true).unwrap();
        img.add_bitmap(
            b"bm",
            0,
            qdirty::AddOptions {
                persistent: true,
                ..Default::default()
            },
        )
        .unwrap();
        let ours = img.close();
        assert_eq!(
            ours.is_ok(),
            qemu_ok,
            "name of {len} bytes: qdirty {ours:?}, QEMU: {qemu_err}"
        );
        if let Err(e) = ours {
            full += 1;
            assert!(
                qemu_err.contains("Failed to update bitmap extension: No space left on device"),
                "{len}: {qemu_err}"
            );
            assert_eq!(e.errno(), libc::ENOSPC, "{len}: {e}");
            assert!(
                e.to_string().contains("Failed to update bitmap extension"),
                "{len}: {e}"
            );
        } else {
            fits += 1;
        }
        assert_check_clean(&q, &format!("QEMU, backing name of {len} bytes"));
        assert_check_clean(&d, &format!("qdirty, backing name of {len} bytes"));
        assert_eq!(
            qemu_img_info_bitmaps(&d, false),
            qemu_img_info_bitmaps(&q, false),
            "{len}: bitmaps"
        );
    }
    assert!(
        fits > 0 && full > 0,
        "the boundary was not crossed: {fits} fit, {full} full"
    );
}
