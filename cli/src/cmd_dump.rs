//! `qdirty dump`: the dirty extents of bitmaps, as qemu-nbd exports them, streamed.
//!
//! Every bitmap to list is read first (a read error fails the command before anything is
//! printed); then the extents are written as they are found, never collected: a bitmap with
//! millions of extents needs no more memory than its own bits. `--union` merges the bitmaps
//! into one at the smallest granularity (exact: every granularity is a power of two).

use std::ffi::OsString;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;

use qdirty::bitmap::CHECK_INCONSISTENT;
use qdirty::{BitmapId, DirtyBitmap, Image};

use crate::common::*;
use crate::getopt::{opt, Arity};
use crate::help::*;
use crate::util::*;

/// A consistent bitmap, up to date and with its data in memory. Fails with QEMU's refusal for
/// an inconsistent bitmap, or with the read error: never a bitmap whose bits would read as
/// clean.
pub fn loaded(img: &mut Image, id: BitmapId) -> qdirty::Result<&DirtyBitmap> {
    let bm = img.bitmap_current(id)?;
    bm.check(CHECK_INCONSISTENT)?;
    Ok(bm)
}

/// One entry of the listing.
struct Entry {
    name: String,
    granularity: u64,
    size: u64,
    enabled: Option<bool>,
    /// What to list: a bitmap of the image, the union accumulator, or nothing (inconsistent:
    /// its extents are unknown).
    source: Source,
}

enum Source {
    Image(BitmapId),
    Union(Box<DirtyBitmap>),
    Unknown,
}

pub fn run(argv: &[OsString]) -> Res<u8> {
    let specs = [
        opt("help", Some('h'), Arity::Flag),
        opt("format", Some('f'), Arity::Value),
        opt("output", None, Arity::Value),
        opt("image-opts", None, Arity::Flag),
        opt("force-share", Some('U'), Arity::Flag),
        opt("union", None, Arity::Flag),
        opt("skip-inconsistent", None, Arity::Flag),
    ];
    let Some(p) = parse(argv, &specs, "dump", DUMP_HELP)? else {
        return Ok(0);
    };
    let json = output_json(&p, "dump")?;
    let skip = p.has("skip-inconsistent");
    let Some((img_arg, names)) = p.args.split_first() else {
        return Err(usage_error("dump", "Expecting an image file name"));
    };
    let (file, mut img, unlocked) = open_for_reading(&p, img_arg)?;
    // Directory order (oldest first), as qemu-img info lists them.
    let mut ids = img.bitmap_ids();
    ids.reverse();
    let selected: Vec<BitmapId> = if names.is_empty() {
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
                .map_err(|e| bm_err_s(&file, &name_of(n), e.to_string()))?;
            let bm = img.bitmap(id).expect("looked up");
            if let Err(e) = bm.check(CHECK_INCONSISTENT) {
                if !skip {
                    return Err(bm_err_s(
                        &file,
                        &name_of(n),
                        format!(
                            "{e} (try 'qdirty bitmap --remove {file} {}' to delete it)",
                            name_of(n)
                        ),
                    ));
                }
            }
            v.push(id);
        }
        v
    };
    // Read every bitmap first: a read error fails before anything is printed.
    let mut entries = Vec::new();
    let mut unusable: Vec<(String, String)> = Vec::new();
    {
        let progress = Progress::counted(
            format!("reading the bitmaps of '{file}'"),
            selected.len() as u64,
        );
        for &id in &selected {
            let bm = img.bitmap(id).expect("listed");
            let (name, granularity, size) = (bm.display_name(), bm.granularity(), bm.size());
            let (enabled, source) = if let Err(e) = bm.check(CHECK_INCONSISTENT) {
                unusable.push((name.clone(), e.to_string()));
                (None, Source::Unknown)
            } else {
                let enabled = bm.enabled();
                loaded(&mut img, id).map_err(|e| img_err_s(&file, &e))?;
                (Some(enabled), Source::Image(id))
            };
            entries.push(Entry {
                name,
                granularity,
                size,
                enabled,
                source,
            });
            progress.step();
        }
    }
    if p.has("union") {
        entries = vec![union(&mut img, &entries).map_err(|e| img_err_s(&file, &e))?];
    }
    let written = {
        let stdout = std::io::stdout();
        let mut w = std::io::BufWriter::with_capacity(1 << 16, stdout.lock());
        let r = if json {
            print_json(&mut w, &mut img, &file, &entries, p.has("union"))
        } else {
            print_human(&mut w, &mut img, &entries, unlocked)
        };
        r.and_then(|()| w.flush())
    };
    drop(img);
    for (name, why) in &unusable {
        let what = if skip {
            "skipped, its dirty extents are unknown".to_string()
        } else {
            format!(
                "its dirty extents are unknown (try 'qdirty bitmap --remove {file} {name}' to \
                 delete it; --skip-inconsistent exits 0 anyway)"
            )
        };
        eprintln!("qdirty: '{file}': bitmap '{name}': {why}: {what}");
    }
    match written {
        // The reader stopped early (head): it has what it wanted.
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(fail(format!("dump: could not write the extents: {e}")))
        }
        _ => Ok(if unusable.is_empty() || skip { 0 } else { 1 }),
    }
}

fn bm_err_s(file: &str, bitmap: &str, msg: String) -> Fail {
    fail(format!("'{file}': bitmap '{bitmap}': {msg}"))
}

fn img_err_s(file: &str, e: &qdirty::Error) -> Fail {
    fail(format!("'{file}': {}", cause(e)))
}

/// The union of the consistent entries: one bitmap at the smallest granularity.
fn union(img: &mut Image, entries: &[Entry]) -> qdirty::Result<Entry> {
    let mut names = Vec::new();
    let mut g = 0;
    for e in entries {
        if let Source::Image(_) = e.source {
            names.push(e.name.clone());
            g = if g == 0 {
                e.granularity
            } else {
                g.min(e.granularity)
            };
        }
    }
    let mut acc = img.bitmaps().scratch(if g == 0 { 65536 } else { g })?;
    for e in entries {
        if let Source::Image(id) = e.source {
            acc.merge_from(loaded(img, id)?)?;
        }
    }
    Ok(Entry {
        name: names.join("|"),
        granularity: g,
        size: img.size(),
        enabled: None,
        source: Source::Union(Box::new(acc)),
    })
}

/// Calls `f` on each dirty extent of the entry (none when its extents are unknown).
fn each_extent(
    img: &mut Image,
    e: &Entry,
    mut f: impl FnMut(u64, u64) -> std::io::Result<()>,
) -> std::io::Result<()> {
    let bm: &DirtyBitmap = match &e.source {
        Source::Unknown => return Ok(()),
        Source::Union(b) => b,
        Source::Image(id) => loaded(img, *id).map_err(std::io::Error::other)?,
    };
    for (o, l) in bm.dirty_runs(0, bm.size()).map_err(std::io::Error::other)? {
        f(o, l)?;
    }
    Ok(())
}

/// (extents, dirty bytes) of an entry.
fn totals(img: &mut Image, e: &Entry) -> std::io::Result<(u64, u64)> {
    let (mut n, mut bytes) = (0, 0);
    each_extent(img, e, |_, l| {
        n += 1;
        bytes += l;
        Ok(())
    })?;
    Ok((n, bytes))
}

/// `unlocked`: read without locks, so that an in-use bitmap may be a running QEMU's (in use)
/// rather than one a gone QEMU left (inconsistent).
fn print_human(
    w: &mut impl Write,
    img: &mut Image,
    entries: &[Entry],
    unlocked: bool,
) -> std::io::Result<()> {
    let state = if unlocked {
        "in use"
    } else {
        "inconsistent (in-use)"
    };
    for e in entries {
        if let Source::Unknown = e.source {
            writeln!(w, "# bitmap '{}': {state}, no extents", e.name)?;
            continue;
        }
        let (n, total) = totals(img, e)?;
        let extents = if n == 1 { "extent" } else { "extents" };
        writeln!(
            w,
            "# bitmap '{}': granularity {}, {n} {extents}, {total} dirty bytes ({})",
            e.name,
            e.granularity,
            human_size(total)
        )?;
        each_extent(img, e, |o, l| writeln!(w, "{o} {l}"))?;
    }
    Ok(())
}

/// A JSON string (serde_json's escaping).
fn js(s: &str) -> String {
    serde_json::to_string(s).expect("a string serializes")
}

/// The JSON document, written as it goes: 4-space indentation as qemu-img's, one line per
/// extent.
fn print_json(
    w: &mut impl Write,
    img: &mut Image,
    file: &str,
    entries: &[Entry],
    union: bool,
) -> std::io::Result<()> {
    writeln!(w, "{{")?;
    writeln!(w, "    \"image\": {},", js(file))?;
    writeln!(w, "    \"union\": {union},")?;
    if entries.is_empty() {
        writeln!(w, "    \"bitmaps\": []")?;
        return writeln!(w, "}}");
    }
    writeln!(w, "    \"bitmaps\": [")?;
    for (i, e) in entries.iter().enumerate() {
        let known = !matches!(e.source, Source::Unknown);
        writeln!(w, "        {{")?;
        writeln!(w, "            \"name\": {},", js(&e.name))?;
        writeln!(w, "            \"granularity\": {},", e.granularity)?;
        writeln!(w, "            \"size\": {},", e.size)?;
        writeln!(w, "            \"consistent\": {known},")?;
        let enabled = e.enabled.map_or("null".to_string(), |b| b.to_string());
        writeln!(w, "            \"enabled\": {enabled},")?;
        if !known {
            writeln!(w, "            \"dirty_bytes\": null,")?;
            writeln!(w, "            \"extents\": null")?;
        } else {
            let (n, total) = totals(img, e)?;
            writeln!(w, "            \"dirty_bytes\": {total},")?;
            if n == 0 {
                writeln!(w, "            \"extents\": []")?;
            } else {
                writeln!(w, "            \"extents\": [")?;
                let mut k = 0;
                each_extent(img, e, |o, l| {
                    k += 1;
                    let sep = if k < n { "," } else { "" };
                    writeln!(
                        w,
                        "                {{\"offset\": {o}, \"length\": {l}}}{sep}"
                    )
                })?;
                writeln!(w, "            ]")?;
            }
        }
        let sep = if i + 1 < entries.len() { "," } else { "" };
        writeln!(w, "        }}{sep}")?;
    }
    writeln!(w, "    ]")?;
    writeln!(w, "}}")
}
