//! `qdirty info`: the image and its bitmaps from the header and the bitmap directory alone.
//!
//! `--output=json` is `qemu-img info --output=json` where both carry the same information
//! (`virtual-size`, `cluster-size`, `format-specific.data.bitmaps[]` with `name`,
//! `granularity` and `flags`...), so that a program that reads qemu-img's document for the
//! bitmaps reads this one unchanged; what qdirty adds keeps its own names (snake_case).

use std::ffi::OsString;
use std::os::unix::fs::MetadataExt;

use qdirty::Image;
use serde_json::{json, Map, Value};

use crate::cmd_dump::loaded;
use crate::common::*;
use crate::getopt::{opt, Arity};
use crate::help::*;
use crate::imgspec::{resolve, Format, Request};
use crate::out::outln;
use crate::util::*;

pub fn run(argv: &[OsString]) -> Res<u8> {
    let specs = [
        opt("help", Some('h'), Arity::Flag),
        opt("format", Some('f'), Arity::Value),
        opt("output", None, Arity::Value),
        opt("image-opts", None, Arity::Flag),
        opt("force-share", Some('U'), Arity::Flag),
        opt("count", Some('c'), Arity::Flag),
    ];
    let Some(p) = parse(argv, &specs, "info", INFO_HELP)? else {
        return Ok(0);
    };
    let json = output_json(&p, "info")?;
    let [arg] = p.args.as_slice() else {
        return Err(usage_error("info", "Expecting one image file name"));
    };
    let shown = arg.to_string_lossy();
    let spec = resolve(
        &shown,
        &Request {
            image_opts: p.has("image-opts"),
            format: p.last("format"),
            write: false,
            force_share: p.has("force-share"),
        },
    )
    .map_err(fail)?;
    if spec.format == Format::Raw {
        return Err(fail(format!(
            "Could not open '{shown}': not a qcow2 image (a raw image has no bitmaps)"
        )));
    }
    let path = std::path::Path::new(&spec.filename);
    // Without locks when shared (-U) or unlocked (file.locking=off); else QEMU's read locks,
    // so that a bitmap found in use was left so by a QEMU that is gone: inconsistent.
    let unlocked = spec.force_share || !spec.locking;
    let info = Image::inspect_with(path, unlocked).map_err(|e| open_err(path, &e))?;
    let counts: Option<Vec<Option<u64>>> = if p.has("count") {
        let (_, mut img, _) = open_for_reading(&p, arg)?;
        let progress = Progress::counted(
            format!("reading the bitmaps of '{}'", spec.filename),
            info.bitmaps.len() as u64,
        );
        let mut c = Vec::with_capacity(info.bitmaps.len());
        for b in &info.bitmaps {
            let id = img
                .bitmaps()
                .lookup(&b.name)
                .map_err(|e| img_err(path, &e))?;
            let inconsistent = img.bitmap(id).expect("looked up").inconsistent();
            // Inconsistent: no count (null), as its flags say. Otherwise a read error fails.
            c.push(if inconsistent {
                None
            } else {
                Some(loaded(&mut img, id).map_err(|e| img_err(path, &e))?.count())
            });
            progress.step();
        }
        Some(c)
    } else {
        None
    };
    let actual_size = std::fs::metadata(path).map(|m| m.blocks() * 512).ok();
    if json {
        let bitmaps: Vec<Value> = info
            .bitmaps
            .iter()
            .enumerate()
            .map(|(i, b)| {
                let mut o = json!({
                    "flags": b.flags(),
                    "name": b.display_name(),
                    "granularity": b.granularity,
                    "consistent": b.consistent(),
                    "table_offset": b.table_offset,
                    "table_size": b.table_size,
                });
                if let Some(c) = &counts {
                    o["dirty_bytes"] = json!(c[i]);
                }
                o
            })
            .collect();
        let mut data = Map::new();
        data.insert(
            "compat".into(),
            json!(if info.version >= 3 { "1.1" } else { "0.10" }),
        );
        data.insert("compression-type".into(), json!(info.compression_type));
        if info.version >= 3 {
            data.insert("lazy-refcounts".into(), json!(info.lazy_refcounts));
            if !bitmaps.is_empty() {
                data.insert("bitmaps".into(), Value::Array(bitmaps));
            }
        }
        data.insert("refcount-bits".into(), json!(info.refcount_bits));
        if let Some(d) = &info.data_file {
            data.insert("data-file".into(), json!(d));
        }
        if info.version >= 3 {
            data.insert("corrupt".into(), json!(info.corrupt));
            data.insert("extended-l2".into(), json!(info.extended_l2));
        }
        let mut top = Map::new();
        top.insert("virtual-size".into(), json!(info.virtual_size));
        top.insert("filename".into(), json!(spec.filename));
        top.insert("cluster-size".into(), json!(info.cluster_size));
        top.insert("format".into(), json!("qcow2"));
        if let Some(a) = actual_size {
            top.insert("actual-size".into(), json!(a));
        }
        if info.encrypted {
            top.insert("encrypted".into(), json!(true));
        }
        if let Some(b) = &info.backing_file {
            top.insert("backing-filename".into(), json!(b));
        }
        top.insert(
            "format-specific".into(),
            json!({"type": "qcow2", "data": Value::Object(data)}),
        );
        top.insert("dirty-flag".into(), json!(info.dirty));
        // qdirty's additions.
        top.insert("version".into(), json!(info.version));
        top.insert("file_length".into(), json!(info.file_length));
        top.insert("snapshot_count".into(), json!(info.nb_snapshots));
        top.insert(
            "stale_bitmaps_extension".into(),
            json!(info.stale_bitmaps_extension),
        );
        top.insert("bitmaps_measure".into(), json!(info.bitmaps_measure()));
        print_json(&Value::Object(top));
        return Ok(0);
    }
    outln!("image: {}", spec.filename);
    outln!("file format: qcow2 (version {})", info.version);
    outln!(
        "virtual size: {} ({} bytes)",
        human_size(info.virtual_size),
        info.virtual_size
    );
    outln!("cluster size: {}", info.cluster_size);
    outln!(
        "file length: {} ({} bytes)",
        human_size(info.file_length),
        info.file_length
    );
    if let Some(b) = &info.backing_file {
        outln!("backing file: {b}");
    }
    if info.corrupt {
        outln!("corrupt: true");
    }
    if info.stale_bitmaps_extension {
        outln!(
            "warning: a program lacking bitmap support modified this file: its bitmaps are gone \
             and their clusters leaked ('qdirty check -r' reclaims them)"
        );
    }
    if info.bitmaps.is_empty() {
        outln!("bitmaps: none");
        return Ok(0);
    }
    outln!(
        "bitmaps size: {} (what `qemu-img measure` reports for copying them)",
        info.bitmaps_measure()
    );
    outln!("bitmaps:");
    for (i, b) in info.bitmaps.iter().enumerate() {
        let flags = b.flags().join(", ");
        // In use: under the locks nobody has the image open, so whoever left it so is gone
        // (inconsistent); without them (-U) a running QEMU may be using the bitmap.
        let state = match (b.consistent(), unlocked) {
            (true, _) => "consistent",
            (false, false) => "inconsistent",
            (false, true) => "in use",
        };
        let mut line = format!(
            "    {}: granularity {}, flags [{flags}], {state}",
            b.display_name(),
            b.granularity,
        );
        if let Some(c) = counts.as_ref().and_then(|c| c[i]) {
            line.push_str(&format!(", dirty {} ({c} bytes)", human_size(c)));
        }
        outln!("{line}");
    }
    Ok(0)
}
