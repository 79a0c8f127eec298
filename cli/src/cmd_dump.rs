//! `qdirty dump`.

use std::ffi::OsString;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use qdirty::bitmap::CHECK_INCONSISTENT;
use qdirty::Image;

use crate::common::*;
use crate::getopt::{opt, Arity};
use crate::help::*;
use crate::util::*;

// ---------------------------------------------------------------------------------------------

/// A consistent bitmap, up to date and with its data in memory. Fails with QEMU's refusal for
/// an inconsistent bitmap, or with the read error: never a bitmap whose bits would read as
/// clean.
pub fn loaded(img: &mut Image, id: qdirty::BitmapId) -> qdirty::Result<&qdirty::DirtyBitmap> {
    let bm = img.bitmap_current(id)?;
    bm.check(CHECK_INCONSISTENT)?;
    Ok(bm)
}

/// The dirty extents of a consistent bitmap, as qemu-nbd exports them (see [`loaded`]).
fn read_extents(img: &mut Image, id: qdirty::BitmapId) -> qdirty::Result<Vec<(u64, u64)>> {
    let bm = loaded(img, id)?;
    Ok(bm.dirty_runs(0, bm.size())?.collect())
}

fn union(mut runs: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    runs.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (o, l) in runs {
        if let Some(last) = out.last_mut() {
            if o <= last.0 + last.1 {
                let end = (o + l).max(last.0 + last.1);
                last.1 = end - last.0;
                continue;
            }
        }
        out.push((o, l));
    }
    out
}

struct Dumped {
    name: String,
    granularity: u64,
    size: u64,
    enabled: Option<bool>,
    /// None: inconsistent, extents unknown.
    extents: Option<Vec<(u64, u64)>>,
}

pub fn run(argv: &[OsString]) -> Res<u8> {
    let specs = [
        opt("help", Some('h'), Arity::Flag),
        opt("output", None, Arity::Value),
        opt("union", None, Arity::Flag),
        opt("skip-inconsistent", None, Arity::Flag),
        opt("format", Some('f'), Arity::Value),
    ];
    let Some(p) = parse(argv, &specs, "dump", DUMP_HELP)? else {
        return Ok(0);
    };
    let json = output_json(&p, "dump")?;
    let skip = p.has("skip-inconsistent");
    let Some((img_arg, names)) = p.args.split_first() else {
        return Err(usage_error("dump", "dump: expecting an image file name"));
    };
    let path = Path::new(img_arg);
    let mut img = open_image(path, false)?;
    // Directory order (oldest first), as qemu-img info lists them.
    let mut ids = img.bitmap_ids();
    ids.reverse();
    let selected: Vec<qdirty::BitmapId> = if names.is_empty() {
        ids.into_iter()
            .filter(|&id| {
                img.bitmap(id)
                    .is_some_and(|b| b.persistent() || b.name().is_some())
            })
            .collect()
    } else {
        let mut v = Vec::new();
        for n in names {
            let n = n.as_bytes();
            let id = img
                .bitmaps()
                .lookup(n)
                .map_err(|e| bm_err(path, &name_of(n), cause(&e)))?;
            let bm = img.bitmap(id).expect("looked up");
            if let Err(e) = bm.check(CHECK_INCONSISTENT) {
                if !skip {
                    return Err(bm_err(
                        path,
                        &name_of(n),
                        format!(
                            "{} (try 'qdirty bitmap --remove {} {}' to delete it)",
                            cause(&e),
                            path.display(),
                            name_of(n)
                        ),
                    ));
                }
            }
            v.push(id);
        }
        v
    };
    let mut out = Vec::new();
    // The inconsistent bitmaps reported without extents, with QEMU's refusal.
    let mut unusable: Vec<(String, String)> = Vec::new();
    for id in selected {
        let bm = img.bitmap(id).expect("listed");
        let (name, granularity, size) = (bm.display_name(), bm.granularity(), bm.size());
        let (enabled, extents) = if let Err(e) = bm.check(CHECK_INCONSISTENT) {
            unusable.push((name.clone(), cause(&e)));
            (None, None)
        } else {
            let enabled = bm.enabled();
            let ext = read_extents(&mut img, id).map_err(|e| img_err(path, &e))?;
            (Some(enabled), Some(ext))
        };
        out.push(Dumped {
            name,
            granularity,
            size,
            enabled,
            extents,
        });
    }
    if p.has("union") {
        let all: Vec<(u64, u64)> = out
            .iter()
            .flat_map(|d| d.extents.clone().unwrap_or_default())
            .collect();
        let names: Vec<String> = out
            .iter()
            .filter(|d| d.extents.is_some())
            .map(|d| d.name.clone())
            .collect();
        let g = out
            .iter()
            .filter(|d| d.extents.is_some())
            .map(|d| d.granularity)
            .min()
            .unwrap_or(0);
        out = vec![Dumped {
            name: names.join("|"),
            granularity: g,
            size: img.size(),
            enabled: None,
            extents: Some(union(all)),
        }];
    }
    drop(img);
    let written = if json {
        print_dump_json(path, &out, p.has("union"))
    } else {
        print_dump_human(&out)
    };
    for (name, why) in &unusable {
        let what = if skip {
            "skipped, its dirty extents are unknown".to_string()
        } else {
            format!(
                "its dirty extents are unknown (try 'qdirty bitmap --remove {} {name}' to \
                 delete it; --skip-inconsistent exits 0 anyway)",
                path.display()
            )
        };
        eprintln!(
            "qdirty: '{}': bitmap '{name}': {why}: {what}",
            path.display()
        );
    }
    match written {
        // The reader stopped early (head): it has what it wanted.
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(fail(format!("dump: could not write the extents: {e}")))
        }
        _ => Ok(if unusable.is_empty() || skip { 0 } else { 1 }),
    }
}

fn print_dump_json(path: &Path, out: &[Dumped], union: bool) -> std::io::Result<()> {
    let bitmaps = out
        .iter()
        .map(|d| {
            let ext = d.extents.as_ref();
            Json::Obj(vec![
                ("name", Json::Str(d.name.clone())),
                ("granularity", Json::Num(d.granularity)),
                ("size", Json::Num(d.size)),
                ("consistent", Json::Bool(ext.is_some())),
                ("enabled", d.enabled.map_or(Json::Null, Json::Bool)),
                (
                    "dirty_bytes",
                    ext.map_or(Json::Null, |e| Json::Num(e.iter().map(|x| x.1).sum())),
                ),
                (
                    "extents",
                    ext.map_or(Json::Null, |e| {
                        Json::Arr(
                            e.iter()
                                .map(|&(o, l)| {
                                    Json::Obj(vec![
                                        ("offset", Json::Num(o)),
                                        ("length", Json::Num(l)),
                                    ])
                                })
                                .collect(),
                        )
                    }),
                ),
            ])
        })
        .collect();
    let j = Json::Obj(vec![
        ("image", Json::Str(path.display().to_string())),
        ("union", Json::Bool(union)),
        ("bitmaps", Json::Arr(bitmaps)),
    ]);
    use std::io::Write;
    let mut w = std::io::stdout().lock();
    writeln!(w, "{}", j.pretty())?;
    w.flush()
}

fn print_dump_human(out: &[Dumped]) -> std::io::Result<()> {
    use std::io::Write;
    let stdout = std::io::stdout();
    let mut w = std::io::BufWriter::new(stdout.lock());
    for d in out {
        match &d.extents {
            None => writeln!(
                w,
                "# bitmap '{}': inconsistent (in-use), no extents",
                d.name
            )?,
            Some(e) => {
                let total: u64 = e.iter().map(|x| x.1).sum();
                writeln!(
                    w,
                    "# bitmap '{}': granularity {}, {} extents, {total} dirty bytes ({})",
                    d.name,
                    d.granularity,
                    e.len(),
                    human_size(total)
                )?;
                for (o, l) in e {
                    writeln!(w, "{o} {l}")?;
                }
            }
        }
    }
    w.flush()
}
