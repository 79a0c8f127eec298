//! The one error type of the qdirty core.
//!
//! Every variant carries enough context to say *which* bitmap, field or value is at fault.
//! Messages follow QEMU's wording wherever QEMU has one, so that scripts that grep QEMU's
//! output keep working. The C layer maps each variant to a negative errno (see `ffi`).

use std::io;

/// The hint QEMU appends to every "inconsistent bitmap" error.
pub(crate) const INCONSISTENT_HINT: &str =
    "Try block-dirty-bitmap-remove to delete this bitmap from disk";

/// Errors returned by qdirty.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An I/O call on the image failed. `op` says what qdirty was doing.
    #[error("{op}: {source}")]
    Io {
        /// What was being done, e.g. "Failed to read bitmap directory".
        op: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },

    /// A caller passed an argument that is out of range or malformed.
    #[error("{0}")]
    InvalidArgument(String),

    /// A QEMU assertion turned into an error (unaligned reset, offset beyond the end, ...).
    #[error("{0}")]
    Precondition(String),

    /// The image is not valid qcow2 or breaks one of QEMU's checks on open.
    #[error("{0}")]
    InvalidImage(String),

    /// The image uses something qdirty (and QEMU) cannot handle.
    #[error("{0}")]
    Unsupported(String),

    /// The image is marked corrupt or dirty and must be repaired before it is written.
    #[error("{0}")]
    NeedsRepair(String),

    /// No bitmap of that name.
    #[error("Dirty bitmap '{name}' not found")]
    BitmapNotFound {
        /// The name looked up.
        name: String,
    },

    /// A bitmap of that name already exists (in memory or on disk).
    #[error("Bitmap already exists: {name}")]
    BitmapExists {
        /// The duplicate name.
        name: String,
    },

    /// QEMU's BDRV_BITMAP_BUSY check failed.
    #[error("Bitmap '{name}' is currently in use by another operation and cannot be used")]
    Busy {
        /// The bitmap.
        name: String,
    },

    /// QEMU's BDRV_BITMAP_RO check failed.
    #[error("Bitmap '{name}' is readonly and cannot be modified")]
    ReadOnlyBitmap {
        /// The bitmap.
        name: String,
    },

    /// QEMU's BDRV_BITMAP_INCONSISTENT check failed (the bitmap was found in_use on open).
    #[error("Bitmap '{name}' is inconsistent and cannot be used")]
    Inconsistent {
        /// The bitmap.
        name: String,
    },

    /// Merge of two bitmaps that cover different lengths.
    #[error(
        "Bitmaps are of different sizes (destination size is {dest}, source size is {src}) and can't be merged"
    )]
    SizeMismatch {
        /// Size of the target bitmap in bytes.
        dest: u64,
        /// Size of the source bitmap in bytes.
        src: u64,
    },

    /// A bitmap cannot go away while something holds it: an operation, a successor, live
    /// iterators.
    #[error("Bitmap '{name}' cannot be released while {why}")]
    Held {
        /// The bitmap.
        name: String,
        /// What holds it.
        why: &'static str,
    },

    /// The image (or its file) was opened read-only.
    #[error("{0}")]
    ReadOnlyImage(String),

    /// A new persistent bitmap cannot be stored in this image.
    #[error("Can't make bitmap '{name}' persistent in '{image}': {reason}")]
    CannotStore {
        /// The bitmap.
        name: String,
        /// The image path.
        image: String,
        /// Why (QEMU's wording).
        reason: String,
        /// errno that describes the reason best.
        errno: i32,
    },

    /// A QEMU limit was exceeded (bitmap too big, too many bitmaps, file offsets beyond 2^56).
    #[error("{0}")]
    TooBig(String),

    /// Another process holds the image (QEMU-compatible image locks).
    #[error("{0}")]
    InUse(String),

    /// The image has no room left (header cluster full, file cannot grow).
    #[error("{0}")]
    NoSpace(String),
}

/// Result alias used throughout the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Wraps an I/O error with what qdirty was doing.
    pub fn io(op: impl Into<String>, source: io::Error) -> Self {
        Error::Io {
            op: op.into(),
            source,
        }
    }

    /// A hint to show after the message, as QEMU's `error_append_hint` does.
    pub fn hint(&self) -> Option<&'static str> {
        match self {
            Error::Inconsistent { .. } => Some(INCONSISTENT_HINT),
            _ => None,
        }
    }

    /// The positive errno value that best describes the error (EINVAL, ENOENT, ...).
    pub fn errno(&self) -> i32 {
        match self {
            Error::Io { source, .. } => match source.raw_os_error() {
                Some(e) if e > 0 => e,
                _ if source.kind() == io::ErrorKind::UnexpectedEof => libc::EIO,
                _ => libc::EIO,
            },
            Error::InvalidArgument(_) | Error::Precondition(_) | Error::InvalidImage(_) => {
                libc::EINVAL
            }
            Error::Unsupported(_) => libc::ENOTSUP,
            Error::NeedsRepair(_) => libc::EACCES,
            Error::BitmapNotFound { .. } => libc::ENOENT,
            Error::BitmapExists { .. } => libc::EEXIST,
            Error::Busy { .. } | Error::Held { .. } => libc::EBUSY,
            Error::ReadOnlyBitmap { .. } => libc::EPERM,
            Error::Inconsistent { .. } => libc::EINVAL,
            Error::SizeMismatch { .. } => libc::EINVAL,
            Error::ReadOnlyImage(_) => libc::EROFS,
            Error::CannotStore { errno, .. } => *errno,
            Error::TooBig(_) => libc::EFBIG,
            Error::NoSpace(_) => libc::ENOSPC,
            Error::InUse(_) => libc::EAGAIN,
        }
    }

    /// Prefixes the message with context, keeping the variant (and so the errno).
    pub fn context(self, prefix: impl std::fmt::Display) -> Self {
        match self {
            Error::Io { op, source } => Error::Io {
                op: format!("{prefix}: {op}"),
                source,
            },
            Error::InvalidArgument(m) => Error::InvalidArgument(format!("{prefix}: {m}")),
            Error::Precondition(m) => Error::Precondition(format!("{prefix}: {m}")),
            Error::InvalidImage(m) => Error::InvalidImage(format!("{prefix}: {m}")),
            Error::Unsupported(m) => Error::Unsupported(format!("{prefix}: {m}")),
            Error::NeedsRepair(m) => Error::NeedsRepair(format!("{prefix}: {m}")),
            Error::ReadOnlyImage(m) => Error::ReadOnlyImage(format!("{prefix}: {m}")),
            Error::TooBig(m) => Error::TooBig(format!("{prefix}: {m}")),
            Error::NoSpace(m) => Error::NoSpace(format!("{prefix}: {m}")),
            Error::InUse(m) => Error::InUse(format!("{prefix}: {m}")),
            other => other,
        }
    }
}
