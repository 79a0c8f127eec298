//! Opening an image as qemu-img does (`img_open`): the file first (locks), then the format
//! (probed when not given), with qemu-img's messages (`Could not open 'ARG': ...`).

use std::path::Path;

use qdirty::image::storage::{FileStorage, Storage};
use qdirty::{Image, OpenOptions};

use crate::imgspec::{Format, ImageSpec};
use crate::util::Progress;

/// The magic of a qcow2 header ("QFI\xfb").
const QCOW2_MAGIC: [u8; 4] = *b"QFI\xfb";

/// An open image: qcow2 with its bitmaps, or a raw one (no bitmaps can live there).
pub enum Opened {
    Qcow2(Box<Image>),
    /// The open file keeps the locks until dropped.
    Raw(#[allow(dead_code)] FileStorage),
}

/// QEMU messages that the library follows with details of its own (`: magic is ...`,
/// `(repair it with ...)`): qemu-img prints them alone.
const QEMU_MESSAGES: &[&str] = &[
    "Image is not in qcow2 format",
    "qcow2 header too short",
    "qcow2: Image is corrupt; cannot be opened read/write",
    "Too much space will be occupied by the bitmap. Use larger granularity",
];

/// A library error as qemu-img words it: without Rust's "(os error N)" or the library's own
/// details after one of QEMU's messages, a lock conflict's question on its own line and a hint
/// (the inconsistent bitmap's) on the next one.
pub fn qemu_text(e: &qdirty::Error) -> String {
    let mut s = e.to_string();
    for m in QEMU_MESSAGES {
        if let Some(p) = s.find(m) {
            s.truncate(p + m.len());
        }
    }
    while let Some(p) = s.find(" (os error ") {
        match s[p..].find(')') {
            Some(q) => s.replace_range(p..p + q + 1, ""),
            None => break,
        }
    }
    if let qdirty::Error::InUse(_) = e {
        s = s.replace(
            ": is another process using the image [",
            "\nIs another process using the image [",
        );
    }
    if let Some(h) = e.hint() {
        s.push('\n');
        s.push_str(h);
    }
    s
}

/// Opens `spec` for reading, or for writing with `write`. Prints qemu-img's warning when the
/// format was probed as raw. Errors are qemu-img's whole message (without the program name).
pub fn open(spec: &ImageSpec, write: bool) -> Result<Opened, String> {
    let path = Path::new(&spec.filename);
    let shared = spec.force_share && !write;
    let storage = if spec.locking {
        FileStorage::open_locked(path, write, shared)
    } else {
        FileStorage::open(path, write)
            .map_err(|e| qdirty::Error::io(format!("Could not open '{}'", spec.filename), e))
    }
    .map_err(|e| format!("Could not open '{}': {}", spec.arg, qemu_text(&e)))?;
    let format = match spec.format {
        Format::Probe => {
            let mut magic = [0u8; 4];
            let qcow2 = storage.read_exact_at(&mut magic, 0).is_ok() && magic == QCOW2_MAGIC;
            if qcow2 {
                Format::Qcow2
            } else if !write {
                Format::Raw
            } else {
                eprintln!(
                    "WARNING: Image format was not specified for '{}' and probing guessed raw.\n         \
                     Automatically detecting the format is dangerous for raw images, write \
                     operations on block 0 will be restricted.\n         Specify the 'raw' \
                     format explicitly to remove the restrictions.",
                    spec.filename
                );
                Format::Raw
            }
        }
        f => f,
    };
    if format == Format::Raw {
        return Ok(Opened::Raw(storage));
    }
    let _p = Progress::start(format!("loading the bitmaps of '{}'", spec.filename));
    OpenOptions::new()
        .read_write(write)
        .force_share(shared)
        .open_storage(Box::new(storage), &spec.arg)
        .map(|i| Opened::Qcow2(Box::new(i)))
        .map_err(|e| qemu_text(&e))
}
