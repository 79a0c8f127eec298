//! `qdirty check`.

use std::ffi::OsString;
use std::path::Path;

use qdirty::image::check::{check_bitmaps_with, CheckReport};
use qdirty::{Image, OpenOptions};
use serde_json::{json, Value};

use crate::common::*;
use crate::getopt::{opt, Arity};
use crate::help::*;
use crate::out::outln;
use crate::util::*;

// ---------------------------------------------------------------------------------------------

pub fn run(argv: &[OsString]) -> Res<u8> {
    let specs = [
        opt("help", Some('h'), Arity::Flag),
        opt("repair", Some('r'), Arity::Flag),
        opt("remove-inconsistent", None, Arity::Flag),
        opt("salvage", None, Arity::Flag),
        opt("remove-broken", None, Arity::Flag),
        opt("drop-bitmaps", None, Arity::Flag),
        opt("output", None, Arity::Value),
        opt("format", Some('f'), Arity::Value),
        opt("image-opts", None, Arity::Flag),
        opt("force-share", Some('U'), Arity::Flag),
    ];
    // qemu-img's "-r leaks" spelling.
    let argv: Vec<OsString> = {
        let mut v = Vec::new();
        let mut prev_r = false;
        for a in argv {
            if prev_r && a == "leaks" {
                prev_r = false;
                continue;
            }
            if prev_r && a == "all" {
                return Err(fail(
                    "check: qdirty repairs leaks only ('-r' or '-r leaks'); use 'qemu-img check -r all' for corruptions",
                ));
            }
            prev_r = a == "-r" || a == "--repair";
            v.push(a.clone());
        }
        v
    };
    let Some(p) = parse(&argv, &specs, "check", CHECK_HELP)? else {
        return Ok(0);
    };
    let json = output_json(&p, "check")?;
    let arg = one_image(&p, "check")?.to_string_lossy().into_owned();
    let writes = p.has("repair")
        || p.has("remove-inconsistent")
        || p.has("remove-broken")
        || p.has("drop-bitmaps");
    let spec = crate::imgspec::resolve(
        &arg,
        &crate::imgspec::Request {
            image_opts: p.has("image-opts"),
            format: p.last("format"),
            write: writes,
            force_share: p.has("force-share"),
        },
    )
    .map_err(fail)?;
    if spec.format == crate::imgspec::Format::Raw {
        return Err(fail(format!(
            "Could not open '{arg}': not a qcow2 image (qdirty checks qcow2 images only)"
        )));
    }
    let unlocked = spec.force_share || !spec.locking;
    let path = std::path::Path::new(&spec.filename);
    if p.has("remove-broken") && !p.has("salvage") {
        return Err(usage_error(
            "check",
            "check: --remove-broken needs --salvage",
        ));
    }
    if p.has("drop-bitmaps") && p.has("salvage") {
        return Err(usage_error(
            "check",
            "check: --drop-bitmaps and --salvage exclude each other",
        ));
    }
    let mut salvage = SalvageOutcome::default();
    if p.has("drop-bitmaps") {
        let d = qdirty::image::drop_bitmaps_extension(path).map_err(|e| img_err(path, &e))?;
        salvage.dropped = Some(d.nb_bitmaps).filter(|_| d.dropped);
    }
    if p.has("salvage") {
        let rw = p.has("remove-broken");
        let mut img = {
            let _p = Progress::start(format!("loading the bitmaps of '{}'", path.display()));
            OpenOptions::new()
                .read_write(rw)
                .salvage(true)
                .open(path)
                .map_err(|e| img_err(path, &e))?
        };
        salvage.broken = img.broken_bitmaps();
        let mut r = Ok(());
        if rw && !salvage.broken.is_empty() {
            match img.remove_broken_bitmaps() {
                Ok(list) => salvage.removed = list,
                Err(e) => r = Err(img_err(path, &e)),
            }
        }
        let closed = close_image(img, path);
        r?;
        closed?;
    }
    if salvage.broken.len() > salvage.removed.len() {
        // QEMU (and the refcount check, which reads the bitmaps as QEMU does) cannot open the
        // image while broken bitmaps remain: report them only.
        print_broken(path, &salvage, json);
        return Ok(2);
    }
    let mut removed = Vec::new();
    if p.has("remove-inconsistent") {
        let info = Image::inspect(path).map_err(|e| img_err(path, &e))?;
        let bad: Vec<Vec<u8>> = info
            .bitmaps
            .iter()
            .filter(|b| b.in_use)
            .map(|b| b.name.clone())
            .collect();
        if !bad.is_empty() {
            let mut img = open_image(path, true)?;
            let mut r = Ok(());
            for n in &bad {
                if let Err(e) = img.remove_bitmap(n) {
                    r = Err(bm_err(
                        path,
                        &name_of(n),
                        format!("Operation remove failed: {}", cause(&e)),
                    ));
                    break;
                }
                removed.push(name_of(n));
            }
            let closed = close_image(img, path);
            r?;
            closed?;
        }
    }
    let report = {
        let _p = Progress::start(format!("checking '{}'", path.display()));
        check_bitmaps_with(path, p.has("repair"), unlocked).map_err(|e| open_err(path, &e))?
    };
    print_check(path, &report, &removed, &salvage, p.has("repair"), json);
    Ok(report.exit_code() as u8)
}

/// `check --salvage` while broken bitmaps remain (no refcount check is possible).
fn print_broken(path: &Path, salvage: &SalvageOutcome, json: bool) {
    if json {
        print_json(&json!({
            "filename": path.display().to_string(),
            "format": "qcow2",
            "broken_bitmaps": broken_json(&salvage.broken),
            "removed_broken_bitmaps": broken_json(&salvage.removed),
        }));
        return;
    }
    print_salvage(salvage);
}

fn print_salvage(salvage: &SalvageOutcome) {
    if let Some(nb) = salvage.dropped {
        outln!(
            "Dropped the bitmaps extension ({nb} bitmaps recorded); their clusters are leaked \
             ('-r' reclaims them)"
        );
    }
    for b in &salvage.broken {
        outln!(
            "Broken bitmap '{}' (entry {}): {}",
            b.display_name(),
            b.index,
            b.reason
        );
    }
    for b in &salvage.removed {
        outln!(
            "Removed broken bitmap '{}' (entry {}); its clusters are leaked",
            b.display_name(),
            b.index
        );
    }
    if salvage.broken.len() > salvage.removed.len() {
        outln!(
            "QEMU refuses this image while broken bitmaps remain (the refcounts are checked once \
             they are gone): --salvage --remove-broken removes them"
        );
    }
}

/// What `check --salvage` / `--drop-bitmaps` found and did.
#[derive(Default)]
struct SalvageOutcome {
    broken: Vec<qdirty::image::BrokenBitmap>,
    removed: Vec<qdirty::image::BrokenBitmap>,
    /// Some(nb_bitmaps) when the extension was dropped.
    dropped: Option<u32>,
}

fn broken_json(v: &[qdirty::image::BrokenBitmap]) -> Value {
    v.iter()
        .map(|b| {
            json!({
                "index": b.index,
                "name": name_of(&b.name),
                "display_name": b.display_name(),
                "reason": b.reason,
            })
        })
        .collect()
}

fn print_check(
    path: &Path,
    r: &CheckReport,
    removed: &[String],
    salvage: &SalvageOutcome,
    repair: bool,
    json: bool,
) {
    let inconsistent: Vec<String> = r
        .bitmaps
        .iter()
        .filter(|b| b.in_use)
        .map(|b| b.display_name())
        .collect();
    if json {
        // qemu-img check's names and meanings first, then qdirty's additions.
        print_json(&json!({
            "image-end-offset": r.image_end_offset,
            "total-clusters": r.virtual_clusters,
            "check-errors": r.check_errors,
            "allocated-clusters": r.allocated_clusters,
            "filename": path.display().to_string(),
            "format": "qcow2",
            "fragmented-clusters": r.fragmented_clusters,
            "compressed-clusters": r.compressed_clusters,
            "leaks": r.leaks,
            "corruptions": r.corruptions,
            "leaks-fixed": r.leaks_fixed,
            "corruptions-fixed": 0,
            "bitmap_leaks": r.bitmap_leaks,
            "bitmap_corruptions": r.bitmap_corruptions,
            "bitmap_leaks_fixed": r.bitmap_leaks_fixed,
            "stale_bitmaps_extension": r.stale_extension,
            "stale_bitmaps_extension_dropped": r.stale_extension_dropped,
            "inconsistent_bitmaps": inconsistent,
            "removed_bitmaps": removed,
            "broken_bitmaps": broken_json(&salvage.broken),
            "removed_broken_bitmaps": broken_json(&salvage.removed),
            "bitmaps_extension_dropped": salvage.dropped.is_some(),
            "file_clusters": r.total_clusters,
        }));
        return;
    }
    for m in &r.messages {
        eprintln!("{m}");
    }
    print_salvage(salvage);
    for n in removed {
        outln!("Removed inconsistent bitmap '{n}'");
    }
    if r.leaks_fixed > 0 || r.stale_extension_dropped {
        outln!("The following inconsistencies were found and repaired:\n");
        outln!(
            "    {} leaked clusters ({} of bitmap structures)",
            r.leaks_fixed,
            r.bitmap_leaks_fixed
        );
        if r.stale_extension_dropped {
            outln!("    an invalidated bitmaps extension (dropped)");
        }
        outln!();
    }
    if r.corruptions == 0 && r.leaks == 0 && r.check_errors == 0 {
        outln!("No errors were found on the image.");
    }
    if r.corruptions > 0 {
        outln!(
            "\n{} errors were found on the image ({} involve bitmap structures).\nData may be corrupted, or further writes to the image may corrupt it.",
            r.corruptions, r.bitmap_corruptions
        );
        if repair {
            outln!(
                "Leaks are not repaired while there are corruptions: use 'qemu-img check -r all'."
            );
        }
    }
    if r.leaks > 0 {
        outln!(
            "\n{} leaked clusters were found on the image ({} of bitmap structures).\nThis means waste of disk space, but no harm to data.",
            r.leaks, r.bitmap_leaks
        );
    }
    if r.check_errors > 0 {
        outln!(
            "\n{} internal errors have occurred during the check.",
            r.check_errors
        );
    }
    if r.stale_extension && !r.stale_extension_dropped {
        outln!("A program lacking bitmap support modified this file: its bitmaps are gone ('-r' reclaims their clusters).");
    }
    for n in &inconsistent {
        outln!("Bitmap '{n}' is inconsistent (in-use): --remove-inconsistent removes it");
    }
    // qemu-img's allocation line, with its figures.
    if r.virtual_clusters != 0 && r.allocated_clusters != 0 {
        let pct = |n: u64, of: u64| n as f64 * 100.0 / of as f64;
        outln!(
            "{}/{} = {:.2}% allocated, {:.2}% fragmented, {:.2}% compressed clusters",
            r.allocated_clusters,
            r.virtual_clusters,
            pct(r.allocated_clusters, r.virtual_clusters),
            pct(r.fragmented_clusters, r.allocated_clusters),
            pct(r.compressed_clusters, r.allocated_clusters)
        );
    }
    outln!("Image end offset: {}", r.image_end_offset);
}
