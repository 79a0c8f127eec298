//! Image locking that interoperates with QEMU (docs/format.md, 'Image locking'; QEMU's file-posix
//! `raw_apply_lock_bytes` / `raw_check_lock_bytes`).
//!
//! QEMU marks "I hold permission i" with a shared OFD lock on byte 100 + i and "I do not let
//! anybody else hold permission i" with one on byte 200 + i, and finds conflicts by probing
//! bytes with a write-lock test. qdirty does exactly the same, locking first and probing
//! second, so that two racing openers both fail rather than both succeed:
//! - read-write: holds consistent-read, write and resize (100, 101, 103) and shares neither
//!   write nor resize (201, 203); probes 200, 201, 203, 101, 103;
//! - read-only: holds consistent-read (100), shares neither write nor resize (201, 203);
//!   probes 200, 101, 103;
//! - force-share (like `qemu-img -U`, read-only only): no locks at all.

use std::fs::File;
use std::io;

use crate::error::{Error, Result};
use crate::sys::{ofd_lock_shared, ofd_probe_locked, ofd_unlock};

/// First byte of the "holds permission" range. QEMU: RAW_LOCK_PERM_BASE.
pub const LOCK_PERM_BASE: u64 = 100;
/// First byte of the "does not share permission" range. QEMU: RAW_LOCK_SHARED_BASE.
pub const LOCK_SHARED_BASE: u64 = 200;
/// QEMU's permission names, by bit (BLK_PERM_CONSISTENT_READ, _WRITE, _WRITE_UNCHANGED,
/// _RESIZE).
const PERM_NAMES: [&str; 4] = ["consistent read", "write", "write unchanged", "resize"];

/// How an image file is locked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LockMode {
    /// Read-write open.
    Write,
    /// Read-only open that must see consistent data.
    Read,
    /// No locks (force-share, read-only).
    None,
}

impl LockMode {
    /// (bytes to lock, bytes to probe) in QEMU's order.
    fn bytes(self) -> (&'static [u64], &'static [u64]) {
        match self {
            LockMode::Write => (&[100, 101, 103, 201, 203], &[200, 201, 203, 101, 103]),
            LockMode::Read => (&[100, 201, 203], &[200, 101, 103]),
            LockMode::None => (&[], &[]),
        }
    }
}

fn unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EINVAL | libc::ENOTSUP | libc::ENOLCK | libc::ENOSYS)
    )
}

fn conflict(byte: u64, name: &str) -> Error {
    let (shared, perm) = if byte >= LOCK_SHARED_BASE {
        ("", byte - LOCK_SHARED_BASE)
    } else {
        ("shared ", byte - LOCK_PERM_BASE)
    };
    let perm = PERM_NAMES.get(perm as usize).copied().unwrap_or("unknown");
    Error::InUse(format!(
        "Failed to get {shared}\"{perm}\" lock: is another process using the image [{name}]?"
    ))
}

/// Takes the locks of `mode` on `file` and checks that no other opener conflicts. On failure
/// every lock taken here is released. Returns false when the filesystem has no OFD locks
/// (then, as QEMU's locking=auto, the image is used unlocked).
pub fn acquire(file: &File, mode: LockMode, name: &str) -> Result<bool> {
    let (take, probe) = mode.bytes();
    let mut held = Vec::new();
    let fail = |held: &[u64], e: Error| {
        for &b in held {
            let _ = ofd_unlock(file, b);
        }
        Err(e)
    };
    for &b in take {
        match ofd_lock_shared(file, b) {
            Ok(()) => held.push(b),
            Err(e) if unsupported(&e) && held.is_empty() => return Ok(false),
            Err(e)
                if e.raw_os_error() == Some(libc::EAGAIN)
                    || e.raw_os_error() == Some(libc::EACCES) =>
            {
                return fail(
                    &held,
                    Error::InUse(format!(
                        "Failed to lock byte {b}: is another process using the image [{name}]?"
                    )),
                )
            }
            Err(e) => return fail(&held, Error::io(format!("Could not lock '{name}'"), e)),
        }
    }
    for &b in probe {
        match ofd_probe_locked(file, b) {
            Ok(false) => {}
            Ok(true) => return fail(&held, conflict(b, name)),
            Err(e) => {
                return fail(
                    &held,
                    Error::io(format!("Could not test the locks of '{name}'"), e),
                )
            }
        }
    }
    Ok(true)
}

/// Releases the locks of `mode` held through `file` (closing the file releases them too).
pub fn release(file: &File, mode: LockMode) {
    for &b in mode.bytes().0 {
        let _ = ofd_unlock(file, b);
    }
}
