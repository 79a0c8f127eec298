//! `qdirty bitmap`: `qemu-img bitmap`, with its options, order, messages and exit codes.
//!
//! As qemu-img's `img_bitmap`: the options are acted on in command-line order while they are
//! scanned (so a bad `-g` is reported before a later unknown option); then its checks; then the
//! image is opened read-write and the `-b` source read-only, both before any operation; then
//! the operations run in order, and the first failure stops them (what succeeded before is kept
//! and stored at close).

use std::ffi::OsString;
use std::os::unix::ffi::OsStrExt;

use qdirty::bitmap::CHECK_DEFAULT;
use qdirty::AddOptions;

use crate::getopt::{opt, scan, Arity, OptSpec};
use crate::help::BITMAP_HELP;
use crate::imgspec::{resolve, Request};
use crate::open::{open, qemu_text, Opened};
use crate::out::out;
use crate::util::{parse_size, Progress, SizeError};
use crate::{fail, usage_fail, Res};

/// qemu-img's long options for `bitmap`, in its table order (getopt's ambiguity messages list
/// candidates in that order).
const SPECS: [OptSpec; 13] = [
    opt("help", Some('h'), Arity::Flag),
    opt("object", None, Arity::Value),
    opt("image-opts", None, Arity::Flag),
    opt("add", None, Arity::Flag),
    opt("remove", None, Arity::Flag),
    opt("clear", None, Arity::Flag),
    opt("enable", None, Arity::Flag),
    opt("disable", None, Arity::Flag),
    opt("merge", None, Arity::Value),
    opt("granularity", Some('g'), Arity::Value),
    opt("source-file", Some('b'), Arity::Value),
    opt("source-format", Some('F'), Arity::Value),
    opt("format", Some('f'), Arity::Value),
];

/// The longest bitmap name qcow2 stores. QEMU: BME_MAX_NAME_SIZE.
const BME_MAX_NAME_SIZE: usize = 1023;

/// The message QEMU's block-dirty-bitmap-add gives for a bad granularity.
const BAD_GRANULARITY: &str = "Granularity must be power of 2 and at least 512";

enum Op {
    Add,
    Remove,
    Clear,
    Enable,
    Disable,
    Merge(String),
}

impl Op {
    fn name(&self) -> &'static str {
        match self {
            Op::Add => "add",
            Op::Remove => "remove",
            Op::Clear => "clear",
            Op::Enable => "enable",
            Op::Disable => "disable",
            Op::Merge(_) => "merge",
        }
    }
}

/// qemu-img's `cvtnum("granularity", ...)`.
fn granularity(v: &str) -> Res<u64> {
    match parse_size(v) {
        Ok(g) => Ok(g),
        Err(SizeError::Invalid) => Err(fail(format!("Invalid granularity specified: '{v}'."))),
        Err(SizeError::TooBig) => Err(fail(
            "Invalid granularity specified. Must be between 0 and 9223372036854775807.",
        )),
    }
}

pub fn run(argv: &[OsString]) -> Res<u8> {
    let (p, scan_err) = scan(argv, &SPECS);
    let mut ops = Vec::new();
    let (mut g, mut src_file, mut src_fmt, mut fmt, mut image_opts) =
        (0u64, None, None, None, false);
    for (k, v) in &p.opts {
        match *k {
            "help" => {
                out!("{BITMAP_HELP}");
                return Ok(0);
            }
            "add" => ops.push(Op::Add),
            "remove" => ops.push(Op::Remove),
            "clear" => ops.push(Op::Clear),
            "enable" => ops.push(Op::Enable),
            "disable" => ops.push(Op::Disable),
            "merge" => ops.push(Op::Merge(v.clone())),
            "source-file" => src_file = Some(v.clone()),
            "source-format" => src_fmt = Some(v.clone()),
            "format" => fmt = Some(v.clone()),
            "image-opts" => image_opts = true,
            "granularity" => g = granularity(v)?,
            // Objects (secrets) matter only to encrypted data, which qdirty never reads.
            _ => {}
        }
    }
    if let Some(e) = scan_err {
        return Err(usage_fail("bitmap", e));
    }
    // qemu-img's checks, in its order and with its messages.
    if ops.is_empty() {
        return Err(fail(
            "Need at least one of --add, --remove, --clear, --enable, --disable, or --merge",
        ));
    }
    let add = ops.iter().any(|o| matches!(o, Op::Add));
    if g != 0 && !add {
        return Err(fail("granularity only supported with --add"));
    }
    if src_fmt.is_some() && src_file.is_none() {
        return Err(fail("-F only supported with -b"));
    }
    if src_file.is_some() && !ops.iter().any(|o| matches!(o, Op::Merge(_))) {
        return Err(fail("Merge bitmap source file only supported with --merge"));
    }
    let [img_arg, name_arg] = p.args.as_slice() else {
        return Err(fail("Expecting filename and bitmap name"));
    };
    let img_arg = img_arg.to_string_lossy();
    let name = name_arg.as_bytes();
    let shown = String::from_utf8_lossy(name).into_owned();
    let spec = resolve(
        &img_arg,
        &Request {
            image_opts,
            format: fmt.as_deref(),
            write: true,
            force_share: false,
        },
    )
    .map_err(fail)?;
    for w in &spec.warnings {
        eprintln!("qdirty: {w}");
    }
    let mut target = open(&spec, true).map_err(fail)?;
    let mut source = match &src_file {
        None => None,
        Some(f) => {
            let s = resolve(
                f,
                &Request {
                    image_opts: false,
                    format: src_fmt.as_deref(),
                    write: false,
                    force_share: false,
                },
            )
            .map_err(fail)?;
            Some(open(&s, false).map_err(fail)?)
        }
    };
    // QEMU's block-dirty-bitmap-add takes the granularity as a 32-bit number.
    let g32 = g as u32;
    let mut result = Ok(0);
    {
        let _p = Progress::start(format!("updating bitmap '{shown}'"));
        for op in &ops {
            let r = apply(
                op,
                &mut target,
                source.as_mut(),
                name,
                g != 0,
                g32,
                &spec.filename,
            );
            if let Err(why) = r {
                let why = why.replace(&format!("'{}'", spec.arg), &format!("'{}'", spec.filename));
                result = Err(fail(format!(
                    "Operation {} on bitmap {shown} failed: {why}",
                    op.name()
                )));
                break;
            }
        }
    }
    drop(source);
    // As qemu-img: what succeeded before a failure is stored at close.
    let closed = match target {
        Opened::Qcow2(img) => {
            let _p = Progress::start(format!("storing the bitmaps of '{}'", spec.filename));
            img.close().map_err(|e| fail(qemu_text(&e)))
        }
        Opened::Raw(_) => Ok(()),
    };
    let code = result?;
    closed?;
    Ok(code)
}

/// One operation, as QEMU's QMP command for it (the error is its message).
fn apply(
    op: &Op,
    target: &mut Opened,
    source: Option<&mut Opened>,
    name: &[u8],
    has_granularity: bool,
    g32: u32,
    file: &str,
) -> Result<(), String> {
    let shown = String::from_utf8_lossy(name);
    let not_found = || format!("Dirty bitmap '{shown}' not found");
    let img = match target {
        Opened::Qcow2(img) => img,
        Opened::Raw(_) => {
            // No bitmaps here, and none can be stored.
            return Err(match op {
                Op::Add if name.is_empty() => "Bitmap name cannot be empty".into(),
                Op::Add if has_granularity && (g32 < 512 || !g32.is_power_of_two()) => {
                    BAD_GRANULARITY.into()
                }
                Op::Add => {
                    format!("Can't store persistent bitmaps to {file}: Operation not supported")
                }
                _ => not_found(),
            });
        }
    };
    let r = match op {
        Op::Add => {
            if name.is_empty() {
                return Err("Bitmap name cannot be empty".into());
            }
            if has_granularity && (g32 < 512 || !g32.is_power_of_two()) {
                return Err(BAD_GRANULARITY.into());
            }
            // QEMU looks for a bitmap of that name before asking the format whether it can
            // store one, and qcow2 checks its version before the name's length.
            if img.find_bitmap(name).is_some() {
                return Err(format!("Bitmap already exists: {shown}"));
            }
            if name.len() > BME_MAX_NAME_SIZE && img.version() >= 3 {
                return Err(format!(
                    "Can't make bitmap '{shown}' persistent in '{file}': Name length exceeds \
                     maximum ({BME_MAX_NAME_SIZE} characters)"
                ));
            }
            img.add_bitmap(
                name,
                u64::from(g32),
                AddOptions {
                    persistent: true,
                    disabled: false,
                    autoload: None,
                },
            )
            .map(drop)
        }
        Op::Remove => img.remove_bitmap(name),
        Op::Clear => img
            .bitmaps()
            .lookup(name)
            .and_then(|id| img.bitmaps_mut().bitmap_mut(id)?.clear()),
        Op::Enable => img
            .bitmaps()
            .lookup(name)
            .and_then(|id| img.bitmaps_mut().bitmap_mut(id)?.enable()),
        Op::Disable => img
            .bitmaps()
            .lookup(name)
            .and_then(|id| img.bitmaps_mut().bitmap_mut(id)?.disable()),
        // QEMU checks the target (found, usable) before it looks at the source.
        Op::Merge(src) => match img
            .bitmaps()
            .lookup(name)
            .and_then(|id| img.bitmap(id).expect("looked up").check(CHECK_DEFAULT))
        {
            Err(e) => Err(e),
            Ok(()) => merge(img, source, name, src),
        },
    };
    r.map_err(|e| qemu_text(&e))
}

/// `--merge SRC`: BITMAP |= SRC, from the image itself or from the -b source.
fn merge(
    img: &mut qdirty::Image,
    source: Option<&mut Opened>,
    name: &[u8],
    src: &str,
) -> qdirty::Result<()> {
    match source {
        None => img.merge_bitmap(name, src.as_bytes()),
        Some(Opened::Qcow2(s)) => img.merge_bitmap_from(name, s, src.as_bytes()),
        // A raw file has no bitmaps.
        Some(Opened::Raw(_)) => Err(qdirty::Error::BitmapNotFound { name: src.into() }),
    }
}
