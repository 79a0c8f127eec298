//! `qdirty`: qemu-img bitmap compatible bitmap changes, plus what qemu-img cannot do offline
//! (listing without loading, dumping dirty extents, checking bitmap refcounts).

mod util;

use std::ffi::OsString;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::process::ExitCode;

use qdirty::bitmap::CHECK_INCONSISTENT;
use qdirty::image::check::{check_bitmaps, CheckReport};
use qdirty::{AddOptions, Image};
use util::{human_size, parse_size, scan, Arity, Json, OptSpec, Progress, SizeError};

const USAGE: &str = "\
usage: qdirty COMMAND [OPTIONS]

Commands (qdirty COMMAND --help for each):
  info   IMG [--output=human|json] [--count]
  bitmap (--add | --remove | --clear | --enable | --disable | --merge SOURCE [-b SOURCE_FILE [-F FMT]])...
         [-g GRANULARITY] IMG BITMAP
  dump   IMG [BITMAP...] [--union] [--skip-inconsistent] [--output=human|json]
  check  IMG [-r] [--remove-inconsistent] [--salvage [--remove-broken]] [--drop-bitmaps]
         [--output=human|json]
  create IMG SIZE [-o cluster_size=SIZE]
";

const INFO_HELP: &str = "\
usage: qdirty info IMG [--output=human|json] [--count]

Shows the virtual size, the cluster size and every bitmap of the qcow2 image IMG: name,
granularity, flags as QEMU names them (auto, in-use) and whether it is consistent. Only the
header and the bitmap directory are read, so this is fast whatever the bitmaps' sizes, and it
works while the bitmaps are in use.

  --output=FMT  human (default) or json
  -c, --count   also load the bitmaps and show how many bytes each has dirty
  -f qcow2      accepted for qemu-img compatibility
  -U            accepted for qemu-img compatibility (qdirty info takes no locks)
";

const BITMAP_HELP: &str = "\
usage: qdirty bitmap (--add | --remove | --clear | --enable | --disable |
                      --merge SOURCE [-b SOURCE_FILE [-F SOURCE_FMT]])... [-g GRANULARITY] IMG BITMAP

Changes the persistent bitmap BITMAP of IMG, as `qemu-img bitmap` does: the operations are
applied in the order given; the first failure stops (what succeeded before is kept).

  --add           add BITMAP, enabled (with --disable after it: disabled)
  -g GRANULARITY  granularity for --add (512 .. 2G, power of two; 64k, 1M...; default: the
                  cluster size within [4k, 64k])
  --remove        remove BITMAP (also allowed when it is inconsistent)
  --clear         clear every bit of BITMAP
  --enable        make BITMAP record writes (stored with the auto flag)
  --disable       make BITMAP stop recording writes
  --merge SOURCE  BITMAP |= SOURCE (any granularity); SOURCE is in IMG or, with -b, in
                  SOURCE_FILE (-F qcow2 is the only format)
  -f qcow2        accepted for qemu-img compatibility
";

const DUMP_HELP: &str = "\
usage: qdirty dump IMG [BITMAP...] [--union] [--skip-inconsistent] [--output=human|json]

Lists the dirty extents of each BITMAP (default: every bitmap) of IMG, offline: the same
extents `qemu-nbd -B BITMAP` exports as qemu:dirty-bitmap:BITMAP.

An inconsistent (in-use) bitmap has no usable extents: a named one is refused (exit 1, no
output). When listing every bitmap, it is reported without extents (human: a '#' line; json:
\"consistent\": false), the other bitmaps are listed in full, stderr names it and the exit
status is 1, so that a script cannot take it for \"nothing changed\".
A bitmap whose data cannot be read is an error (exit 1, no output).

  --union              one extent list: the union of the bitmaps (what is dirty in any of
                       them, e.g. everything changed since the oldest of several checkpoints)
  --skip-inconsistent  report inconsistent bitmaps (listed or named) without extents and exit
                       0 (stderr still names them), as qemu-img convert --skip-broken-bitmaps
                       leaves them out
  --output=FMT         human (default: one \"OFFSET LENGTH\" line per extent) or json
  -f qcow2             accepted for qemu-img compatibility
";

const CHECK_HELP: &str = "\
usage: qdirty check IMG [-r] [--remove-inconsistent] [--salvage [--remove-broken]]
                        [--drop-bitmaps] [--output=human|json]

Checks the refcounts of IMG as `qemu-img check` does (same leak and corruption counts, same
exit status: 0 clean, 2 corruptions, 3 leaks only, 1 could not check) and says which problems
involve bitmap structures (directory, tables, data clusters, a bitmaps extension that a
program without bitmap support invalidated).

  -r, --repair           reclaim leaked clusters (refused when corruptions were found: use
                         'qemu-img check -r all'); drops an invalidated bitmaps extension
  --remove-inconsistent  remove the bitmaps that are inconsistent (in-use) first
  --salvage              for images QEMU refuses because of a broken bitmap directory entry or
                         table: list every broken bitmap (name, or entry index when the name is
                         empty or not printable) and why QEMU refuses it; the valid bitmaps are
                         kept. A broken bitmap found makes the exit status 2 (as a corruption)
  --remove-broken        with --salvage: remove the broken bitmaps (their clusters are leaked,
                         never freed: '-r' reclaims them); QEMU then opens the image again
  --drop-bitmaps         drop the whole bitmaps extension (every bitmap is lost; their clusters
                         are leaked), for a bitmap directory too broken to salvage entry by entry.
                         Guest data is never touched
  --output=FMT           human (default) or json
  -f qcow2               accepted for qemu-img compatibility
";

const CREATE_HELP: &str = "\
usage: qdirty create IMG SIZE [-o cluster_size=SIZE] [-q]

Creates a blank qcow2 v3 image of SIZE bytes (suffixes k, M, G, T, P, E) laid out as
`qemu-img create -f qcow2` does. IMG must not exist.

  -o cluster_size=SIZE  512 .. 2M, power of two (default 64k)
  -q                    quiet
  -f qcow2              accepted for qemu-img compatibility
";

/// A failure: the message (already formatted) and the exit status.
struct Fail {
    msg: String,
    code: u8,
    usage: Option<&'static str>,
}

type Res<T> = Result<T, Fail>;

fn fail(msg: impl Into<String>) -> Fail {
    Fail {
        msg: msg.into(),
        code: 1,
        usage: None,
    }
}

fn usage_fail(msg: impl Into<String>, help: &'static str) -> Fail {
    Fail {
        msg: msg.into(),
        code: 1,
        usage: Some(help),
    }
}

/// A library error as one line: without Rust's "(os error N)" and with the hint, if any.
fn cause(e: &qdirty::Error) -> String {
    let mut s = e.to_string();
    while let Some(p) = s.find(" (os error ") {
        match s[p..].find(')') {
            Some(q) => s.replace_range(p..p + q + 1, ""),
            None => break,
        }
    }
    s.replace('\n', " ")
}

fn img_err(img: &Path, e: &qdirty::Error) -> Fail {
    fail(format!("'{}': {}", img.display(), cause(e)))
}

fn bm_err(img: &Path, bitmap: &str, msg: String) -> Fail {
    fail(format!("'{}': bitmap '{bitmap}': {msg}", img.display()))
}

fn main() -> ExitCode {
    std::panic::set_hook(Box::new(|info| {
        let msg = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown".into());
        let at = info
            .location()
            .map(|l| format!(" at {}:{}", l.file(), l.line()))
            .unwrap_or_default();
        eprintln!(
            "qdirty: internal error (please report): {}{at}",
            msg.replace('\n', " ")
        );
        std::process::exit(2);
    }));
    let argv: Vec<OsString> = std::env::args_os().skip(1).collect();
    match run(&argv) {
        Ok(code) => ExitCode::from(code),
        Err(f) => {
            eprintln!("qdirty: {}", f.msg);
            if let Some(u) = f.usage {
                eprint!("{u}");
            }
            ExitCode::from(f.code)
        }
    }
}

fn run(argv: &[OsString]) -> Res<u8> {
    let Some(cmd) = argv.first() else {
        return Err(usage_fail("no command given", USAGE));
    };
    let rest = &argv[1..];
    let wants_help = rest.iter().any(|a| a == "--help" || a == "-h");
    let help = match cmd.to_string_lossy().as_ref() {
        "--help" | "-h" | "help" => {
            print!("{USAGE}");
            return Ok(0);
        }
        "--version" | "-V" => {
            println!(
                "qdirty {} (libqdirty {})",
                env!("CARGO_PKG_VERSION"),
                qdirty::VERSION
            );
            return Ok(0);
        }
        "info" => INFO_HELP,
        "bitmap" => BITMAP_HELP,
        "dump" => DUMP_HELP,
        "check" => CHECK_HELP,
        "create" => CREATE_HELP,
        other => return Err(usage_fail(format!("unknown command '{other}'"), USAGE)),
    };
    if wants_help {
        print!("{help}");
        return Ok(0);
    }
    match cmd.to_string_lossy().as_ref() {
        "info" => cmd_info(rest),
        "bitmap" => cmd_bitmap(rest),
        "dump" => cmd_dump(rest),
        "check" => cmd_check(rest),
        _ => cmd_create(rest),
    }
}

const fn opt(long: &'static str, short: Option<char>, arity: Arity) -> OptSpec {
    OptSpec { long, short, arity }
}

fn parse(argv: &[OsString], specs: &[OptSpec], cmd: &str, help: &'static str) -> Res<util::Parsed> {
    let p = scan(argv, specs).map_err(|e| usage_fail(format!("{cmd}: {e}"), help))?;
    for (k, v) in &p.opts {
        if *k == "format" && v != "qcow2" {
            return Err(fail(format!(
                "{cmd}: format '{v}' is not supported: qdirty works on qcow2 images only"
            )));
        }
    }
    Ok(p)
}

/// --output=human|json.
fn output_json(p: &util::Parsed, help: &'static str) -> Res<bool> {
    let mut json = false;
    for (k, v) in &p.opts {
        if *k == "output" {
            json = match v.as_str() {
                "json" => true,
                "human" => false,
                _ => {
                    return Err(usage_fail(
                        format!("--output must be human or json, not '{v}'"),
                        help,
                    ))
                }
            };
        }
    }
    Ok(json)
}

fn has(p: &util::Parsed, name: &str) -> bool {
    p.opts.iter().any(|(k, _)| *k == name)
}

fn one_image<'a>(p: &'a util::Parsed, cmd: &str, help: &'static str) -> Res<&'a Path> {
    match p.args.as_slice() {
        [img] => Ok(Path::new(img)),
        [] => Err(usage_fail(
            format!("{cmd}: expecting an image file name"),
            help,
        )),
        _ => Err(usage_fail(
            format!("{cmd}: expecting exactly one image file name"),
            help,
        )),
    }
}

fn name_of(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn open_image(img: &Path, rw: bool) -> Res<Image> {
    let _p = Progress::start(format!("loading the bitmaps of '{}'", img.display()));
    Image::open(img, rw).map_err(|e| img_err(img, &e))
}

fn close_image(img: Image, path: &Path) -> Res<()> {
    let _p = Progress::start(format!("storing the bitmaps of '{}'", path.display()));
    img.close().map_err(|e| img_err(path, &e))
}

// ---------------------------------------------------------------------------------------------

fn cmd_info(argv: &[OsString]) -> Res<u8> {
    let specs = [
        opt("output", None, Arity::Value),
        opt("count", Some('c'), Arity::Flag),
        opt("format", Some('f'), Arity::Value),
        opt("force-share", Some('U'), Arity::Flag),
    ];
    let p = parse(argv, &specs, "info", INFO_HELP)?;
    let json = output_json(&p, INFO_HELP)?;
    let path = one_image(&p, "info", INFO_HELP)?;
    let info = Image::inspect_with(path, has(&p, "force-share")).map_err(|e| img_err(path, &e))?;
    let counts: Option<Vec<Option<u64>>> = if has(&p, "count") {
        let mut img =
            Image::open_with(path, false, has(&p, "force-share")).map_err(|e| img_err(path, &e))?;
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

// ---------------------------------------------------------------------------------------------

enum Op {
    Add,
    Remove,
    Clear,
    Enable,
    Disable,
    Merge(String),
}

fn cmd_bitmap(argv: &[OsString]) -> Res<u8> {
    let specs = [
        opt("add", None, Arity::Flag),
        opt("remove", None, Arity::Flag),
        opt("clear", None, Arity::Flag),
        opt("enable", None, Arity::Flag),
        opt("disable", None, Arity::Flag),
        opt("merge", None, Arity::Value),
        opt("source-file", Some('b'), Arity::Value),
        opt("source-format", Some('F'), Arity::Value),
        opt("granularity", Some('g'), Arity::Value),
        opt("format", Some('f'), Arity::Value),
    ];
    let p = parse(argv, &specs, "bitmap", BITMAP_HELP)?;
    let mut ops = Vec::new();
    let (mut granularity, mut src_file, mut src_fmt) = (0u64, None, None);
    for (k, v) in &p.opts {
        match *k {
            "add" => ops.push(Op::Add),
            "remove" => ops.push(Op::Remove),
            "clear" => ops.push(Op::Clear),
            "enable" => ops.push(Op::Enable),
            "disable" => ops.push(Op::Disable),
            "merge" => ops.push(Op::Merge(v.clone())),
            "source-file" => src_file = Some(v.clone()),
            "source-format" => src_fmt = Some(v.clone()),
            "granularity" => {
                granularity = match parse_size(v) {
                    Ok(g) => g,
                    Err(SizeError::Invalid) => {
                        return Err(fail(format!("Invalid granularity specified: '{v}'.")))
                    }
                    Err(SizeError::TooBig) => return Err(fail(
                        "Invalid granularity specified. Must be between 0 and 9223372036854775807.",
                    )),
                }
            }
            _ => {}
        }
    }
    // qemu-img's checks, in its order and with its messages.
    if ops.is_empty() {
        return Err(usage_fail(
            "Need at least one of --add, --remove, --clear, --enable, --disable, or --merge",
            BITMAP_HELP,
        ));
    }
    if granularity != 0 && !ops.iter().any(|o| matches!(o, Op::Add)) {
        return Err(usage_fail(
            "granularity only supported with --add",
            BITMAP_HELP,
        ));
    }
    if src_fmt.is_some() && src_file.is_none() {
        return Err(usage_fail("-F only supported with -b", BITMAP_HELP));
    }
    if src_file.is_some() && !ops.iter().any(|o| matches!(o, Op::Merge(_))) {
        return Err(usage_fail(
            "Merge bitmap source file only supported with --merge",
            BITMAP_HELP,
        ));
    }
    if let Some(f) = &src_fmt {
        if f != "qcow2" {
            return Err(fail(format!(
                "bitmap: source format '{f}' is not supported: qdirty works on qcow2 images only"
            )));
        }
    }
    let [img_arg, name_arg] = p.args.as_slice() else {
        return Err(usage_fail(
            "Expecting filename and bitmap name",
            BITMAP_HELP,
        ));
    };
    let path = Path::new(img_arg);
    let name = name_arg.as_bytes();
    let shown = name_of(name);
    let mut img = open_image(path, true)?;
    let mut result = Ok(0);
    for op in &ops {
        let (what, r) = match op {
            Op::Add => (
                "add",
                img.add_bitmap(
                    name,
                    granularity,
                    AddOptions {
                        persistent: true,
                        disabled: false,
                        autoload: None,
                    },
                )
                .map(drop),
            ),
            Op::Remove => ("remove", img.remove_bitmap(name)),
            Op::Clear => (
                "clear",
                img.bitmaps()
                    .lookup(name)
                    .and_then(|id| img.bitmaps_mut().bitmap_mut(id)?.clear()),
            ),
            Op::Enable => (
                "enable",
                img.bitmaps()
                    .lookup(name)
                    .and_then(|id| img.bitmaps_mut().bitmap_mut(id)?.enable()),
            ),
            Op::Disable => (
                "disable",
                img.bitmaps()
                    .lookup(name)
                    .and_then(|id| img.bitmaps_mut().bitmap_mut(id)?.disable()),
            ),
            Op::Merge(src) => match &src_file {
                None => ("merge", img.merge_bitmap(name, src.as_bytes())),
                Some(f) => {
                    let src_path = Path::new(f);
                    let mut src_img = match open_image(src_path, false) {
                        Ok(s) => s,
                        Err(e) => {
                            result = Err(e);
                            break;
                        }
                    };
                    let r = img.merge_bitmap_from(name, &mut src_img, src.as_bytes());
                    ("merge", r)
                }
            },
        };
        if let Err(e) = r {
            let mut msg = format!("Operation {what} failed: {}", cause(&e));
            if let qdirty::Error::Inconsistent { name: bad } = &e {
                // The inconsistent bitmap may be the merge source, possibly in another file.
                let target_bad = img
                    .find_bitmap(name)
                    .and_then(|id| img.bitmap(id))
                    .is_some_and(|b| b.inconsistent());
                let file = match (op, &src_file) {
                    (Op::Merge(_), Some(f)) if !target_bad => Path::new(f),
                    _ => path,
                };
                msg.push_str(&format!(
                    " (try 'qdirty bitmap --remove {} {bad}' to delete it)",
                    file.display()
                ));
            }
            result = Err(bm_err(path, &shown, msg));
            break;
        }
    }
    // As qemu-img: what succeeded before a failure is stored at close.
    let closed = close_image(img, path);
    let code = result?;
    closed?;
    Ok(code)
}

// ---------------------------------------------------------------------------------------------

/// A consistent bitmap, up to date and with its data in memory. Fails with QEMU's refusal for
/// an inconsistent bitmap, or with the read error: never a bitmap whose bits would read as
/// clean.
fn loaded(img: &mut Image, id: qdirty::BitmapId) -> qdirty::Result<&qdirty::DirtyBitmap> {
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

fn cmd_dump(argv: &[OsString]) -> Res<u8> {
    let specs = [
        opt("output", None, Arity::Value),
        opt("union", None, Arity::Flag),
        opt("skip-inconsistent", None, Arity::Flag),
        opt("format", Some('f'), Arity::Value),
    ];
    let p = parse(argv, &specs, "dump", DUMP_HELP)?;
    let json = output_json(&p, DUMP_HELP)?;
    let skip = has(&p, "skip-inconsistent");
    let Some((img_arg, names)) = p.args.split_first() else {
        return Err(usage_fail("dump: expecting an image file name", DUMP_HELP));
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
    if has(&p, "union") {
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
        print_dump_json(path, &out, has(&p, "union"))
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

// ---------------------------------------------------------------------------------------------

fn cmd_check(argv: &[OsString]) -> Res<u8> {
    let specs = [
        opt("repair", Some('r'), Arity::Flag),
        opt("remove-inconsistent", None, Arity::Flag),
        opt("salvage", None, Arity::Flag),
        opt("remove-broken", None, Arity::Flag),
        opt("drop-bitmaps", None, Arity::Flag),
        opt("output", None, Arity::Value),
        opt("format", Some('f'), Arity::Value),
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
    let p = parse(&argv, &specs, "check", CHECK_HELP)?;
    let json = output_json(&p, CHECK_HELP)?;
    let path = one_image(&p, "check", CHECK_HELP)?;
    if has(&p, "remove-broken") && !has(&p, "salvage") {
        return Err(usage_fail(
            "check: --remove-broken needs --salvage",
            CHECK_HELP,
        ));
    }
    if has(&p, "drop-bitmaps") && has(&p, "salvage") {
        return Err(usage_fail(
            "check: --drop-bitmaps and --salvage exclude each other",
            CHECK_HELP,
        ));
    }
    let mut salvage = SalvageOutcome::default();
    if has(&p, "drop-bitmaps") {
        let d = qdirty::image::drop_bitmaps_extension(path).map_err(|e| img_err(path, &e))?;
        salvage.dropped = Some(d.nb_bitmaps).filter(|_| d.dropped);
    }
    if has(&p, "salvage") {
        let rw = has(&p, "remove-broken");
        let mut img = {
            let _p = Progress::start(format!("loading the bitmaps of '{}'", path.display()));
            Image::open_salvage(path, rw).map_err(|e| img_err(path, &e))?
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
    if has(&p, "remove-inconsistent") {
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
        check_bitmaps(path, has(&p, "repair")).map_err(|e| img_err(path, &e))?
    };
    print_check(path, &report, &removed, &salvage, has(&p, "repair"), json);
    Ok(report.exit_code() as u8)
}

/// `check --salvage` while broken bitmaps remain (no refcount check is possible).
fn print_broken(path: &Path, salvage: &SalvageOutcome, json: bool) {
    if json {
        let j = Json::Obj(vec![
            ("filename", Json::Str(path.display().to_string())),
            ("format", Json::Str("qcow2".into())),
            ("broken_bitmaps", broken_json(&salvage.broken)),
            ("removed_broken_bitmaps", broken_json(&salvage.removed)),
        ]);
        println!("{}", j.pretty());
        return;
    }
    print_salvage(salvage);
}

fn print_salvage(salvage: &SalvageOutcome) {
    if let Some(nb) = salvage.dropped {
        println!(
            "Dropped the bitmaps extension ({nb} bitmaps recorded); their clusters are leaked \
             ('-r' reclaims them)"
        );
    }
    for b in &salvage.broken {
        println!(
            "Broken bitmap '{}' (entry {}): {}",
            b.display_name(),
            b.index,
            b.reason
        );
    }
    for b in &salvage.removed {
        println!(
            "Removed broken bitmap '{}' (entry {}); its clusters are leaked",
            b.display_name(),
            b.index
        );
    }
    if salvage.broken.len() > salvage.removed.len() {
        println!(
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

fn broken_json(v: &[qdirty::image::BrokenBitmap]) -> Json {
    Json::Arr(
        v.iter()
            .map(|b| {
                Json::Obj(vec![
                    ("index", Json::Num(b.index as u64)),
                    ("name", Json::Str(name_of(&b.name))),
                    ("display_name", Json::Str(b.display_name())),
                    ("reason", Json::Str(b.reason.clone())),
                ])
            })
            .collect(),
    )
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
        let strs = |v: &[String]| Json::Arr(v.iter().map(|s| Json::Str(s.clone())).collect());
        let j = Json::Obj(vec![
            ("filename", Json::Str(path.display().to_string())),
            ("format", Json::Str("qcow2".into())),
            ("check_errors", Json::Num(r.check_errors)),
            ("leaks", Json::Num(r.leaks)),
            ("corruptions", Json::Num(r.corruptions)),
            ("bitmap_leaks", Json::Num(r.bitmap_leaks)),
            ("bitmap_corruptions", Json::Num(r.bitmap_corruptions)),
            ("leaks_fixed", Json::Num(r.leaks_fixed)),
            ("bitmap_leaks_fixed", Json::Num(r.bitmap_leaks_fixed)),
            ("stale_bitmaps_extension", Json::Bool(r.stale_extension)),
            (
                "stale_bitmaps_extension_dropped",
                Json::Bool(r.stale_extension_dropped),
            ),
            ("inconsistent_bitmaps", strs(&inconsistent)),
            ("removed_bitmaps", strs(removed)),
            ("broken_bitmaps", broken_json(&salvage.broken)),
            ("removed_broken_bitmaps", broken_json(&salvage.removed)),
            (
                "bitmaps_extension_dropped",
                Json::Bool(salvage.dropped.is_some()),
            ),
            ("total_clusters", Json::Num(r.total_clusters)),
            ("image_end_offset", Json::Num(r.image_end_offset)),
        ]);
        println!("{}", j.pretty());
        return;
    }
    for m in &r.messages {
        eprintln!("{m}");
    }
    print_salvage(salvage);
    for n in removed {
        println!("Removed inconsistent bitmap '{n}'");
    }
    if r.leaks_fixed > 0 || r.stale_extension_dropped {
        println!("The following inconsistencies were found and repaired:\n");
        println!(
            "    {} leaked clusters ({} of bitmap structures)",
            r.leaks_fixed, r.bitmap_leaks_fixed
        );
        if r.stale_extension_dropped {
            println!("    an invalidated bitmaps extension (dropped)");
        }
        println!();
    }
    if r.corruptions == 0 && r.leaks == 0 && r.check_errors == 0 {
        println!("No errors were found on the image.");
    }
    if r.corruptions > 0 {
        println!(
            "\n{} errors were found on the image ({} involve bitmap structures).\nData may be corrupted, or further writes to the image may corrupt it.",
            r.corruptions, r.bitmap_corruptions
        );
        if repair {
            println!(
                "Leaks are not repaired while there are corruptions: use 'qemu-img check -r all'."
            );
        }
    }
    if r.leaks > 0 {
        println!(
            "\n{} leaked clusters were found on the image ({} of bitmap structures).\nThis means waste of disk space, but no harm to data.",
            r.leaks, r.bitmap_leaks
        );
    }
    if r.check_errors > 0 {
        println!(
            "\n{} internal errors have occurred during the check.",
            r.check_errors
        );
    }
    if r.stale_extension && !r.stale_extension_dropped {
        println!("A program lacking bitmap support modified this file: its bitmaps are gone ('-r' reclaims their clusters).");
    }
    for n in &inconsistent {
        println!("Bitmap '{n}' is inconsistent (in-use): --remove-inconsistent removes it");
    }
    println!("Image end offset: {}", r.image_end_offset);
}

// ---------------------------------------------------------------------------------------------

fn cmd_create(argv: &[OsString]) -> Res<u8> {
    let specs = [
        opt("options", Some('o'), Arity::Value),
        opt("format", Some('f'), Arity::Value),
        opt("quiet", Some('q'), Arity::Flag),
    ];
    let p = parse(argv, &specs, "create", CREATE_HELP)?;
    let mut cluster_size = 65536u64;
    for (k, v) in &p.opts {
        if *k != "options" {
            continue;
        }
        for kv in v.split(',').filter(|s| !s.is_empty()) {
            let (key, val) = kv.split_once('=').unwrap_or((kv, ""));
            match key {
                "cluster_size" => {
                    cluster_size = parse_size(val).map_err(|_| {
                        fail(format!("Parameter 'cluster_size' expects a non-negative number below 2^64 (got '{val}')"))
                    })?;
                }
                "compat" if matches!(val, "1.1" | "v3") => {}
                _ => {
                    return Err(fail(format!(
                        "create: option '{kv}' is not supported (only cluster_size)"
                    )))
                }
            }
        }
    }
    let [img_arg, size_arg] = p.args.as_slice() else {
        return Err(usage_fail(
            "create: expecting an image file name and a size",
            CREATE_HELP,
        ));
    };
    let path = Path::new(img_arg);
    let s = size_arg.to_string_lossy();
    let size = match parse_size(&s) {
        Ok(v) => v,
        Err(SizeError::Invalid) => {
            return Err(fail(format!("Invalid image size specified: '{s}'.")))
        }
        Err(SizeError::TooBig) => {
            return Err(fail(
                "Invalid image size specified. Must be between 0 and 9223372036854775807.",
            ))
        }
    };
    let cs = u32::try_from(cluster_size).unwrap_or(u32::MAX).max(1);
    if !has(&p, "quiet") {
        println!(
            "Formatting '{}', fmt=qcow2 cluster_size={cluster_size} size={size}",
            path.display()
        );
    }
    Image::create(path, size, cs).map_err(|e| img_err(path, &e))?;
    Ok(0)
}
