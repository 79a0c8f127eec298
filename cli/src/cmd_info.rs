//! `qdirty info`.

use std::ffi::OsString;

use crate::cmd_dump::loaded;
use qdirty::Image;

use crate::common::*;
use crate::getopt::{opt, Arity};
use crate::help::*;
use crate::util::*;

pub fn run(argv: &[OsString]) -> Res<u8> {
    let specs = [
        opt("help", Some('h'), Arity::Flag),
        opt("output", None, Arity::Value),
        opt("count", Some('c'), Arity::Flag),
        opt("format", Some('f'), Arity::Value),
        opt("force-share", Some('U'), Arity::Flag),
    ];
    let Some(p) = parse(argv, &specs, "info", INFO_HELP)? else {
        return Ok(0);
    };
    let json = output_json(&p, "info")?;
    let path = one_image(&p, "info")?;
    let info = Image::inspect_with(path, p.has("force-share")).map_err(|e| img_err(path, &e))?;
    let counts: Option<Vec<Option<u64>>> = if p.has("count") {
        let mut img =
            Image::open_with(path, false, p.has("force-share")).map_err(|e| img_err(path, &e))?;
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
        }
        drop(img);
        Some(c)
    } else {
        None
    };
    if json {
        let bitmaps = info
            .bitmaps
            .iter()
            .enumerate()
            .map(|(i, b)| {
                let mut o = vec![
                    ("name", Json::Str(b.display_name())),
                    ("granularity", Json::Num(b.granularity)),
                    (
                        "flags",
                        Json::Arr(b.flags().into_iter().map(|f| Json::Str(f.into())).collect()),
                    ),
                    ("consistent", Json::Bool(b.consistent())),
                    ("table_offset", Json::Num(b.table_offset)),
                    ("table_size", Json::Num(u64::from(b.table_size))),
                ];
                if let Some(c) = &counts {
                    o.push(("dirty_bytes", c[i].map_or(Json::Null, Json::Num)));
                }
                Json::Obj(o)
            })
            .collect();
        let opt_str = |s: &Option<String>| s.clone().map_or(Json::Null, Json::Str);
        let j = Json::Obj(vec![
            ("filename", Json::Str(path.display().to_string())),
            ("format", Json::Str("qcow2".into())),
            ("version", Json::Num(u64::from(info.version))),
            ("virtual_size", Json::Num(info.virtual_size)),
            ("cluster_size", Json::Num(info.cluster_size)),
            ("file_length", Json::Num(info.file_length)),
            ("refcount_bits", Json::Num(info.refcount_bits)),
            ("corrupt", Json::Bool(info.corrupt)),
            ("dirty_flag", Json::Bool(info.dirty)),
            ("lazy_refcounts", Json::Bool(info.lazy_refcounts)),
            ("extended_l2", Json::Bool(info.extended_l2)),
            ("compression_type", Json::Str(info.compression_type.into())),
            ("encrypted", Json::Bool(info.encrypted)),
            ("backing_file", opt_str(&info.backing_file)),
            ("data_file", opt_str(&info.data_file)),
            ("snapshots", Json::Num(u64::from(info.nb_snapshots))),
            (
                "stale_bitmaps_extension",
                Json::Bool(info.stale_bitmaps_extension),
            ),
            ("bitmaps_measure", Json::Num(info.bitmaps_measure())),
            ("bitmaps", Json::Arr(bitmaps)),
        ]);
        println!("{}", j.pretty());
        return Ok(0);
    }
    println!("image: {}", path.display());
    println!("file format: qcow2 (version {})", info.version);
    println!(
        "virtual size: {} ({} bytes)",
        human_size(info.virtual_size),
        info.virtual_size
    );
    println!("cluster size: {}", info.cluster_size);
    println!(
        "file length: {} ({} bytes)",
        human_size(info.file_length),
        info.file_length
    );
    if let Some(b) = &info.backing_file {
        println!("backing file: {b}");
    }
    if info.corrupt {
        println!("corrupt: true");
    }
    if info.stale_bitmaps_extension {
        println!(
            "warning: a program lacking bitmap support modified this file: its bitmaps are gone \
             and their clusters leaked ('qdirty check -r' reclaims them)"
        );
    }
    if info.bitmaps.is_empty() {
        println!("bitmaps: none");
        return Ok(0);
    }
    println!(
        "bitmaps size: {} (what `qemu-img measure` reports for copying them)",
        info.bitmaps_measure()
    );
    println!("bitmaps:");
    for (i, b) in info.bitmaps.iter().enumerate() {
        let flags = b.flags().join(", ");
        let mut line = format!(
            "    {}: granularity {}, flags [{}], {}",
            b.display_name(),
            b.granularity,
            flags,
            if b.consistent() {
                "consistent"
            } else {
                "inconsistent"
            }
        );
        if let Some(c) = counts.as_ref().and_then(|c| c[i]) {
            line.push_str(&format!(", dirty {} ({c} bytes)", human_size(c)));
        }
        println!("{line}");
    }
    Ok(0)
}
