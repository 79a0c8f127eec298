//! What every subcommand shares: failures and how they are shown, option-scanning glue, opening
//! and closing images.

use std::ffi::OsString;
use std::path::Path;

use qdirty::Image;

use crate::getopt::{scan, OptSpec, Parsed};
use crate::out::out;
use crate::util::Progress;

/// A failure: the message (already formatted, possibly several lines as QEMU's hints are) and
/// how it is shown.
pub struct Fail {
    pub msg: String,
    pub code: u8,
    /// getopt's errors are prefixed with the subcommand (`qdirty bitmap: ...`).
    pub prefix: Option<&'static str>,
    /// Followed by `Try 'qdirty CMD --help' for more info`, as qemu-img's usage errors are.
    pub try_help: Option<&'static str>,
}

pub type Res<T> = Result<T, Fail>;

/// An error shown as `qdirty: MESSAGE`.
pub fn fail(msg: impl Into<String>) -> Fail {
    Fail {
        msg: msg.into(),
        code: 1,
        prefix: None,
        try_help: None,
    }
}

/// getopt's error for subcommand `cmd`: `qdirty CMD: MESSAGE` and the "Try" line.
pub fn usage_fail(cmd: &'static str, msg: impl Into<String>) -> Fail {
    Fail {
        msg: msg.into(),
        code: 1,
        prefix: Some(cmd),
        try_help: Some(cmd),
    }
}

/// A usage error found after scanning: `qdirty: MESSAGE` and the "Try" line.
pub fn usage_error(cmd: &'static str, msg: impl Into<String>) -> Fail {
    Fail {
        msg: msg.into(),
        code: 1,
        prefix: None,
        try_help: Some(cmd),
    }
}

impl Fail {
    /// What goes to stderr.
    pub fn text(&self) -> String {
        let mut s = match self.prefix {
            Some(cmd) => format!("qdirty {cmd}: {}", self.msg),
            None => format!("qdirty: {}", self.msg),
        };
        if let Some(cmd) = self.try_help {
            s.push_str(&format!("\nTry 'qdirty {cmd} --help' for more info"));
        }
        s
    }
}

/// A library error as one line: without Rust's "(os error N)" and with the hint, if any.
pub fn cause(e: &qdirty::Error) -> String {
    crate::open::qemu_text(e).replace('\n', " ")
}

pub fn img_err(img: &Path, e: &qdirty::Error) -> Fail {
    fail(format!("'{}': {}", img.display(), cause(e)))
}

/// A failure to open `arg` (its file, its locks) as qemu-img reports it; other errors as
/// [`img_err`].
pub fn open_err(arg: &Path, e: &qdirty::Error) -> Fail {
    let opening = match e {
        qdirty::Error::InUse(_) => true,
        qdirty::Error::Io { op, .. } => op.starts_with("Could not open '"),
        _ => false,
    };
    if opening {
        fail(format!(
            "Could not open '{}': {}",
            arg.display(),
            crate::open::qemu_text(e)
        ))
    } else {
        img_err(arg, e)
    }
}

pub fn bm_err(img: &Path, bitmap: &str, msg: String) -> Fail {
    fail(format!("'{}': bitmap '{bitmap}': {msg}", img.display()))
}

/// Scans the options of subcommand `cmd`; `--help` prints `help` (Ok(None): done).
pub fn parse(
    argv: &[OsString],
    specs: &[OptSpec],
    cmd: &'static str,
    help: &'static str,
) -> Res<Option<Parsed>> {
    let (p, err) = scan(argv, specs);
    if p.has("help") {
        out!("{help}");
        return Ok(None);
    }
    if let Some(e) = err {
        return Err(usage_fail(cmd, e));
    }
    Ok(Some(p))
}

/// --output=human|json, as qemu-img checks it.
pub fn output_json(p: &Parsed, cmd: &'static str) -> Res<bool> {
    match p.last("output") {
        None | Some("human") => Ok(false),
        Some("json") => Ok(true),
        Some(v) => Err(usage_error(
            cmd,
            format!("--output expects 'human' or 'json' not '{v}'"),
        )),
    }
}

/// The one image operand, as qemu-img requires it.
pub fn one_image<'a>(p: &'a Parsed, cmd: &'static str) -> Res<&'a Path> {
    match p.args.as_slice() {
        [img] => Ok(Path::new(img)),
        _ => Err(usage_error(cmd, "Expecting one image file name")),
    }
}

pub fn name_of(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

pub fn open_image(img: &Path, rw: bool) -> Res<Image> {
    let _p = Progress::start(format!("loading the bitmaps of '{}'", img.display()));
    Image::open(img, rw).map_err(|e| img_err(img, &e))
}

pub fn close_image(img: Image, path: &Path) -> Res<()> {
    let _p = Progress::start(format!("storing the bitmaps of '{}'", path.display()));
    img.close().map_err(|e| img_err(path, &e))
}

/// Opens the image operand `arg` of a reading subcommand as qemu-img does (`-f`,
/// `--image-opts`, `json:`, `-U` from `p`): read-only, with QEMU's shared read locks unless
/// `-U` (then another process may be writing it). Returns the file's name (for messages) and
/// the image, and whether it was opened without locks (another process may be using it).
pub fn open_for_reading(p: &Parsed, arg: &OsString) -> Res<(String, Image, bool)> {
    let arg = arg.to_string_lossy();
    let spec = crate::imgspec::resolve(
        &arg,
        &crate::imgspec::Request {
            image_opts: p.has("image-opts"),
            format: p.last("format"),
            write: false,
            force_share: p.has("force-share"),
        },
    )
    .map_err(fail)?;
    for w in &spec.warnings {
        eprintln!("qdirty: {w}");
    }
    match crate::open::open(&spec, false).map_err(fail)? {
        crate::open::Opened::Qcow2(img) => {
            let unlocked = spec.force_share || !spec.locking;
            Ok((spec.filename, *img, unlocked))
        }
        crate::open::Opened::Raw(_) => Err(fail(format!(
            "Could not open '{arg}': not a qcow2 image (a raw image has no bitmaps)"
        ))),
    }
}
