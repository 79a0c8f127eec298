//! Salvage: QEMU-made images with one bitmap directory entry or table broken so that
//! QEMU refuses the whole image. qdirty's normal open refuses them with the same reason; a
//! salvage open lists the broken bitmaps with their reasons and loads the valid ones with the
//! bits nbdinfo showed before the damage; removing the broken ones makes QEMU open the image
//! again (only leaks, same guest data, same extents). A directory broken as a whole is refused
//! with a hint, and dropping the whole extension makes QEMU open the image.

mod common;

use qdirty_testkit::salvage_cases;

use common::*;
use qdirty::image::drop_bitmaps_extension;
use qdirty::{Image, OpenOptions};
use salvage_cases::*;

fn run_case(case: &Case) {
    let test = format!("salvage_{}", case.name);
    if !require_qemu(&test) {
        return;
    }
    let tmp = TempDir::new(&test);
    let img = tmp.join("img.qcow2");
    let pristine = tmp.join("pristine.qcow2");
    let reference = qemu_base(&img);
    copy(&img, &pristine);
    (case.apply)(&img);
    let ctx = case.name;

    // QEMU refuses the whole image.
    let (code, qemu_err) = qemu_info_refusal(&img);
    assert_ne!(code, 0, "{ctx}: qemu-img info accepted the damaged image");
    assert!(
        qemu_err.contains(case.qemu_says),
        "{ctx}: QEMU said {qemu_err:?}"
    );

    // qdirty's normal open refuses with the reason the salvage open reports.
    let strict = Image::open(&img, false)
        .expect_err("normal open must refuse")
        .to_string();
    let mut salv = OpenOptions::new()
        .salvage(true)
        .open(&img)
        .expect("salvage open");
    let broken = salv.broken_bitmaps();
    assert_eq!(
        broken.iter().map(|b| b.name.clone()).collect::<Vec<_>>(),
        case.broken
            .iter()
            .map(|n| {
                let mut v = n.as_bytes().to_vec();
                if case.name == "name_too_long" {
                    v.resize(1024, b'x');
                }
                v
            })
            .collect::<Vec<_>>(),
        "{ctx}: broken list {broken:?}"
    );
    for (b, listed) in broken.iter().zip(case.listed) {
        assert!(
            b.display_name().starts_with(listed),
            "{ctx}: listed as {}",
            b.display_name()
        );
        assert!(
            b.reason.starts_with(case.reason_starts),
            "{ctx}: reason {}",
            b.reason
        );
    }
    assert!(
        strict.contains(&broken[0].reason),
        "{ctx}: normal open said {strict:?}, salvage reason {:?}",
        broken[0].reason
    );
    // The original bitmaps the damage replaced (an empty or longer name replaced b2).
    let gone: Vec<&str> = case
        .broken
        .iter()
        .map(|n| {
            if BITMAPS.iter().any(|b| b.0 == *n) {
                *n
            } else {
                "b2"
            }
        })
        .collect();
    // The valid bitmaps load with the bits QEMU exported before the damage.
    let valid: Vec<&str> = BITMAPS
        .iter()
        .map(|b| b.0)
        .filter(|n| !gone.contains(n))
        .collect();
    assert_eq!(salv.bitmap_ids().len(), valid.len(), "{ctx}");
    for n in &valid {
        let bm = qd_bm(&mut salv, n);
        assert_eq!(qdirty_runs(bm), reference[*n], "{ctx}: bits of {n}");
    }
    drop(salv);
    let mut rw = OpenOptions::new()
        .read_write(true)
        .salvage(true)
        .open(&img)
        .expect("salvage rw open");
    assert_eq!(rw.broken_bitmaps(), broken, "{ctx}");
    let removed = rw.remove_broken_bitmaps().expect("remove broken");
    assert_eq!(removed, broken);
    assert!(rw.broken_bitmaps().is_empty());
    rw.close().expect("close");

    assert_recovered(&img, &pristine, &reference, &gone, ctx);
    // And qdirty's normal open accepts it, with the same bits.
    let mut again = Image::open(&img, false).expect("normal open after salvage");
    for n in &valid {
        assert_eq!(
            qdirty_runs(qd_bm(&mut again, n)),
            reference[*n],
            "{ctx}: bits of {n}"
        );
    }
}

macro_rules! case_tests {
    ($($t:ident),* $(,)?) => {$(
        #[test]
        fn $t() {
            let name = stringify!($t);
            let case = cases().into_iter().find(|c| c.name == name).expect("case");
            run_case(&case);
        }
    )*};
}

case_tests!(
    reserved_flag,
    granularity_bits,
    table_offset_unaligned,
    bad_type,
    name_too_long,
    extra_data,
    empty_name,
    table_entry_reserved_bits,
    table_size_wrong,
    two_broken,
);

#[test]
fn salvage_rules() {
    if !require_qemu("salvage_rules") {
        return;
    }
    let tmp = TempDir::new("salvage_rules");
    let img = tmp.join("img.qcow2");
    let pristine = tmp.join("pristine.qcow2");
    let reference = qemu_base(&img);
    copy(&img, &pristine);
    edit_flags(&img);

    // Read-only salvage: removal refused.
    let mut ro = OpenOptions::new().salvage(true).open(&img).unwrap();
    assert!(ro.remove_broken_bitmap(1).is_err());
    assert!(ro.remove_broken_bitmap(0).is_err(), "b1 is not broken");
    drop(ro);

    // A store keeps the broken entry as it is (QEMU still refuses), and a new bitmap cannot
    // take the broken one's name.
    let mut rw = OpenOptions::new()
        .read_write(true)
        .salvage(true)
        .open(&img)
        .unwrap();
    assert!(rw
        .add_bitmap(
            b"b2",
            0,
            qdirty::AddOptions {
                persistent: true,
                ..Default::default()
            }
        )
        .is_err());
    rw.set_dirty(30 << 20, 4096);
    rw.close().unwrap();
    let (code, _) = qemu_info_refusal(&img);
    assert_ne!(
        code, 0,
        "QEMU must still refuse while a broken entry remains"
    );
    let (_, _, es) = read_dir(&img);
    assert_eq!(
        es[1].flags & 4,
        4,
        "the broken entry was written back as it was"
    );
    // The valid bitmaps stored the new write.
    let mut rw = OpenOptions::new()
        .read_write(true)
        .salvage(true)
        .open(&img)
        .unwrap();
    assert_eq!(rw.broken_bitmaps().len(), 1);
    let b1 = qdirty_runs(qd_bm(&mut rw, "b1"));
    assert!(b1.iter().any(|&(o, _)| o == 30 << 20), "{b1:?}");
    // remove_bitmap by name also removes a broken bitmap.
    rw.remove_bitmap(b"b2").unwrap();
    rw.close().unwrap();
    let mut expect = reference.clone();
    for (n, g) in [("b1", 65536u64), ("b3", 512)] {
        let mut r = expect[n].clone();
        r.push((30 << 20, g.max(4096)));
        expect.insert(n.to_string(), merge_runs(r));
    }
    assert_recovered(&img, &pristine, &expect, &["b2"], "store then remove");
}

fn edit_flags(img: &std::path::Path) {
    let (_, _, mut es) = read_dir(img);
    es[1].flags |= 4;
    write_dir(img, &es, None);
}

/// Directory-level damage: the salvage open refuses with the drop hint; dropping the whole
/// extension makes QEMU open the image (no bitmaps, leaks only, same guest data).
#[test]
fn directory_broken_as_a_whole() {
    if !require_qemu("directory_broken_as_a_whole") {
        return;
    }
    type Damage = fn(&std::path::Path);
    let damages: Vec<(&str, Damage)> = vec![
        ("count_mismatch", |p| {
            let (_, _, es) = read_dir(p);
            write_dir(p, &es, Some(4));
        }),
        ("broken_walk", |p| {
            let (off, _, _) = read_dir(p);
            // name_size of entry 0 far beyond the directory
            write_at(p, off + 18, &0xFFFFu16.to_be_bytes());
        }),
        ("directory_beyond_eof", |p| {
            let h = raw_header(p);
            let exts: Vec<(u32, Vec<u8>)> = h
                .extensions
                .iter()
                .map(|(m, d)| {
                    let mut d = d.clone();
                    if *m == EXT_BITMAPS {
                        d[16..24].copy_from_slice(&(1u64 << 40).to_be_bytes());
                    }
                    (*m, d)
                })
                .collect();
            let unknown = h.cluster0[112..h.header_length as usize].to_vec();
            rewrite_header(p, &unknown, &exts);
        }),
        ("extension_reserved_field", |p| {
            let h = raw_header(p);
            let exts: Vec<(u32, Vec<u8>)> = h
                .extensions
                .iter()
                .map(|(m, d)| {
                    let mut d = d.clone();
                    if *m == EXT_BITMAPS {
                        d[4] = 1;
                    }
                    (*m, d)
                })
                .collect();
            let unknown = h.cluster0[112..h.header_length as usize].to_vec();
            rewrite_header(p, &unknown, &exts);
        }),
    ];
    for (name, damage) in damages {
        let tmp = TempDir::new(name);
        let img = tmp.join("img.qcow2");
        let pristine = tmp.join("pristine.qcow2");
        qemu_base(&img);
        copy(&img, &pristine);
        damage(&img);
        let (code, _) = qemu_info_refusal(&img);
        assert_ne!(code, 0, "{name}: QEMU accepted it");
        let err = OpenOptions::new()
            .read_write(true)
            .salvage(true)
            .open(&img)
            .expect_err("salvage refuses")
            .to_string();
        assert!(err.contains("--drop-bitmaps"), "{name}: {err}");
        // Nothing was written by the refused open.
        let dropped = drop_bitmaps_extension(&img).expect("drop");
        assert!(dropped.dropped, "{name}");
        assert_eq!(autoclear(&img) & 1, 0, "{name}");
        assert!(raw_header(&img).ext(EXT_BITMAPS).is_none(), "{name}");
        let (code, err) = qemu_info_refusal(&img);
        assert_eq!(code, 0, "{name}: {err}");
        assert!(qemu_img_info_bitmaps(&img, false).is_empty(), "{name}");
        let c = qemu_img_check(&img);
        assert!(c.corruptions == 0 && c.check_errors == 0, "{name}: {c}");
        qemu_img_check_args(&img, &["-r", "leaks"]);
        assert_check_clean(&img, name);
        let (code, out) = qemu_img_compare(&img, &pristine);
        assert_eq!(code, 0, "{name}: {out}");
        // Nothing left to drop.
        assert!(!drop_bitmaps_extension(&img).unwrap().dropped);
    }
}
