//! The embedding interface: `qdirty_io_ops` and `qdirty_image_open_with_io`, for a host (a
//! hypervisor) that owns the qcow2 file and its allocator and hands qdirty its I/O.
//!
//! [`CallbackStorage`] implements [`Storage`] and [`ClusterAllocator`] over the host's callbacks.
//! It lives here, not in `crate::image`, because it holds raw pointers from C.

use std::ffi::c_void;
use std::io;
use std::os::raw::{c_char, c_int};

use super::boundary::ffi_call;
use super::error::{qdirty_error, FfiError};
use super::handle::{qdirty_image, ImageHandle};
use super::image::arg_bytes;
use super::{QDIRTY_OPEN_DURABLE, QDIRTY_OPEN_RDWR};
use crate::image::storage::{ClusterAllocator, Storage};
use crate::image::OpenOptions;

super::symbol_versions::symbol_versions!("io");

/// The I/O of a qcow2 image as its host provides it: a table of callbacks passed to
/// `qdirty_image_open_with_io`, which qdirty uses instead of opening the file itself.
///
/// Set `size` to `sizeof(qdirty_io_ops)`; it lets the structure grow in later versions (new
/// fields are only ever appended, and a callback added later is optional: NULL keeps the
/// behaviour of the version without it). Any size from the first published layout (`size`
/// through `free_clusters`) up is accepted: fields past the caller's size count as NULL, so a
/// host built against an older header keeps working. A smaller size is refused (EINVAL); a
/// larger one than this version knows is accepted when every byte past the known fields is
/// zero (unset), and refused (ENOTSUP) otherwise.
///
/// Every callback gets the `opaque` pointer given to `qdirty_image_open_with_io` first and
/// returns 0 on success or a negative errno (-EIO, -ENOSPC, ...), which qdirty reports in its own
/// error (a positive value from `pread`/`pwrite` is accepted as a byte count: `len` means
/// success, less is a short transfer, reported as EIO). A read or write must transfer all `len`
/// bytes: there are no partial successes. qdirty never asks for bytes past the end of the file
/// (it checks `get_length` first and fails such a read itself), so a `pread` that passes POSIX
/// pread's count through (0 only at the end of the file) is safe.
///
/// Callbacks are called synchronously, with the image's lock held, from the thread that called
/// into qdirty (any thread that uses the image); calls for one image never overlap. They must
/// not call qdirty functions on the same image (that deadlocks) and must not unwind.
///
/// - `pread` (required): read `len` bytes at byte `offset` of the image file into `buf`.
/// - `pwrite` (required for read-write opens, may be NULL for read-only ones): write `len`
///   bytes from `buf` at `offset`. Writes may land beyond the current end of the file only in
///   clusters the host allocated (see `alloc_clusters`), or, without host allocation, where
///   qdirty's refcount allocator put them.
/// - `flush` (required for read-write opens): make every completed write durable, and the
///   host's own metadata (e.g. the refcounts changed by `alloc_clusters`/`free_clusters`) as
///   well, before returning (fdatasync). qdirty relies on it for ordering: see
///   `qdirty_image_open_with_io`.
/// - `get_length` (required): the current length of the file in bytes, or a negative errno.
/// - `alloc_clusters` (optional): allocate `n` contiguous, cluster-aligned clusters of
///   `cluster_size` bytes, give them refcount 1 in the host's refcounts, store the byte offset
///   of the first in `*offset` and return 0 (or -ENOSPC, ...). The clusters belong to qdirty
///   until it frees them; the refcount change must be durable after the next `flush`.
/// - `free_clusters` (optional): qdirty no longer references the `n` clusters at `offset`
///   (which it got from `alloc_clusters`, in this or an earlier session, or which QEMU
///   allocated for bitmaps): drop their refcount. qdirty calls `flush` afterwards.
///
/// `alloc_clusters` and `free_clusters` are both set or both NULL. When both are NULL, qdirty
/// allocates and frees through the image's refcount table and blocks itself, using `pread`
/// and `pwrite` (and may grow the refcount table, which changes the header's refcount table
/// fields): the host must then not hold any refcount state in memory across qdirty calls that
/// write (open read-write, store, remove, close).
#[repr(C)]
#[allow(non_camel_case_types)]
#[derive(Clone, Copy)]
pub struct qdirty_io_ops {
    /// `sizeof(qdirty_io_ops)` as the host was compiled with.
    pub size: u32,
    /// Reads `len` bytes at `offset` into `buf`: 0 or -errno.
    pub pread: Option<
        unsafe extern "C" fn(opaque: *mut c_void, buf: *mut c_void, len: u64, offset: u64) -> c_int,
    >,
    /// Writes `len` bytes from `buf` at `offset`: 0 or -errno.
    pub pwrite: Option<
        unsafe extern "C" fn(
            opaque: *mut c_void,
            buf: *const c_void,
            len: u64,
            offset: u64,
        ) -> c_int,
    >,
    /// Makes completed writes and the host's allocation metadata durable: 0 or -errno.
    pub flush: Option<unsafe extern "C" fn(opaque: *mut c_void) -> c_int>,
    /// The file's length in bytes, or -errno.
    pub get_length: Option<unsafe extern "C" fn(opaque: *mut c_void) -> i64>,
    /// Allocates `n` contiguous clusters (refcount 1), the first at `*offset`: 0 or -errno.
    pub alloc_clusters: Option<
        unsafe extern "C" fn(
            opaque: *mut c_void,
            n: u64,
            cluster_size: u64,
            offset: *mut u64,
        ) -> c_int,
    >,
    /// Frees `n` clusters at `offset` (refcount decrement): 0 or -errno.
    pub free_clusters: Option<
        unsafe extern "C" fn(opaque: *mut c_void, offset: u64, n: u64, cluster_size: u64) -> c_int,
    >,
}

/// The largest `size` accepted (a bound on how much of the caller's memory is inspected).
const MAX_OPS_SIZE: u32 = 4096;

/// The size of the first published layout of `qdirty_io_ops` (`size` .. `free_clusters`):
/// every size from it up is accepted, so that hosts built against an older header keep
/// working when fields are appended.
const IO_OPS_FIRST_SIZE: usize =
    std::mem::offset_of!(qdirty_io_ops, free_clusters) + std::mem::size_of::<usize>();

/// Copies the caller's ops table, checking its size.
///
/// # Safety
/// `ops` is NULL or points to at least `(*ops).size` readable bytes (and at least 4).
unsafe fn copy_ops(ops: *const qdirty_io_ops) -> Result<qdirty_io_ops, FfiError> {
    if ops.is_null() {
        return Err(FfiError::null_arg("ops"));
    }
    // SAFETY: `size` is the first field; the caller's contract.
    let size = unsafe { std::ptr::read_unaligned(ops.cast::<u32>()) };
    // SAFETY: the caller's contract: `size` bytes are readable.
    unsafe { copy_versioned(ops, size, IO_OPS_FIRST_SIZE) }
}

/// Copies a versioned struct whose first field is its `size` as the caller was built with:
/// `size` from `first` (the first published layout) up to [`MAX_OPS_SIZE`]. Fields past the
/// caller's size are zero (NULL callbacks: absent); bytes past the fields this version knows
/// must be zero (unset), else ENOTSUP.
///
/// # Safety
/// `p` points to `size` readable bytes. `T` is plain data for which all-zero bytes are a
/// valid value (integers and nullable function pointers).
unsafe fn copy_versioned<T>(p: *const T, size: u32, first: usize) -> Result<T, FfiError> {
    let known = std::mem::size_of::<T>();
    let what = std::any::type_name::<T>()
        .rsplit("::")
        .next()
        .unwrap_or("struct");
    if (size as usize) < first {
        return Err(FfiError::invalid(format!(
            "{what}.size is {size}, less than the first layout of {what} ({first} bytes): set \
             it to sizeof({what})"
        )));
    }
    if size > MAX_OPS_SIZE {
        return Err(FfiError::invalid(format!(
            "{what}.size is {size}, more than any version of {what}"
        )));
    }
    let size = size as usize;
    if size > known {
        // SAFETY: the caller's contract: `size` bytes are readable.
        let extra = unsafe { std::slice::from_raw_parts(p.cast::<u8>().add(known), size - known) };
        if extra.iter().any(|&b| b != 0) {
            return Err(FfiError::new(
                libc::ENOTSUP,
                format!(
                    "{what} sets fields unknown to this version of qdirty ({known} bytes known, \
                     {size} given)"
                ),
            ));
        }
    }
    // SAFETY: all-zero bytes are a valid T (caller's contract).
    let mut out: T = unsafe { std::mem::zeroed() };
    // SAFETY: min(size, known) bytes are readable at `p` and writable at `out`; they do not
    // overlap.
    unsafe {
        std::ptr::copy_nonoverlapping(
            p.cast::<u8>(),
            (&mut out as *mut T).cast::<u8>(),
            size.min(known),
        )
    };
    Ok(out)
}

/// [`Storage`] and [`ClusterAllocator`] over a host's `qdirty_io_ops`.
pub(crate) struct CallbackStorage {
    ops: qdirty_io_ops,
    opaque: *mut c_void,
    /// The file length last reported by `get_length` (refreshed when a read goes past it): a
    /// read past the end is refused before `pread` runs, so that a host returning POSIX
    /// pread's 0 at the end of the file (which the protocol would take for success) can never
    /// leave a buffer unfilled.
    known_len: std::sync::atomic::AtomicU64,
}

// SAFETY: the host's contract (documented on `qdirty_image_open_with_io`): the callbacks and
// `opaque` may be used from any thread that calls into qdirty for the image; the image's lock
// serializes them.
unsafe impl Send for CallbackStorage {}

/// An `io::Error` from a callback's negative return value.
fn cb_error(rc: i64, what: &str) -> io::Error {
    match rc.checked_neg().and_then(|e| i32::try_from(e).ok()) {
        Some(errno) if errno > 0 => io::Error::from_raw_os_error(errno),
        _ => io::Error::other(format!("{what} returned an invalid value {rc}")),
    }
}

/// An error reported as EIO, with a message.
fn eio(msg: String) -> io::Error {
    io::Error::other(msg)
}

impl CallbackStorage {
    /// Checks which callbacks a host must provide for the access it asks for.
    pub(crate) fn new(
        ops: qdirty_io_ops,
        opaque: *mut c_void,
        read_write: bool,
    ) -> Result<Self, FfiError> {
        let missing =
            |name: &str| FfiError::invalid(format!("qdirty_io_ops.{name} must not be NULL"));
        if ops.pread.is_none() {
            return Err(missing("pread"));
        }
        if ops.get_length.is_none() {
            return Err(missing("get_length"));
        }
        if read_write && ops.pwrite.is_none() {
            return Err(FfiError::invalid(
                "qdirty_io_ops.pwrite must not be NULL for a read-write open",
            ));
        }
        if read_write && ops.flush.is_none() {
            return Err(FfiError::invalid(
                "qdirty_io_ops.flush must not be NULL for a read-write open",
            ));
        }
        if ops.alloc_clusters.is_some() != ops.free_clusters.is_some() {
            return Err(FfiError::invalid(
                "qdirty_io_ops.alloc_clusters and free_clusters must both be set or both be NULL",
            ));
        }
        Ok(CallbackStorage {
            ops,
            opaque,
            known_len: std::sync::atomic::AtomicU64::new(0),
        })
    }

    /// Checks a pread/pwrite return value.
    fn transfer_result(rc: c_int, len: usize, what: &str, offset: u64) -> io::Result<()> {
        match rc {
            0 => Ok(()),
            r if r < 0 => Err(cb_error(i64::from(r), what)),
            r if r as usize == len => Ok(()),
            r => Err(eio(format!(
                "{what}: short transfer of {r} of {len} bytes at offset {offset}"
            ))),
        }
    }
}

impl Storage for CallbackStorage {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        let end = offset
            .checked_add(buf.len() as u64)
            .ok_or_else(|| io::Error::from(io::ErrorKind::UnexpectedEof))?;
        if end > self.known_len.load(std::sync::atomic::Ordering::Relaxed) {
            let len = self.size()?;
            self.known_len
                .store(len, std::sync::atomic::Ordering::Relaxed);
            if end > len {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!(
                        "read of {} bytes at offset {offset} past the end of the file ({len} \
                         bytes)",
                        buf.len()
                    ),
                ));
            }
        }
        let f = self.ops.pread.expect("checked at open");
        // SAFETY: the host's contract: pread writes at most `len` bytes into `buf`.
        let rc = unsafe {
            f(
                self.opaque,
                buf.as_mut_ptr().cast(),
                buf.len() as u64,
                offset,
            )
        };
        Self::transfer_result(rc, buf.len(), "the host's pread", offset)
    }

    fn write_all_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        let Some(f) = self.ops.pwrite else {
            return Err(io::Error::from_raw_os_error(libc::EROFS));
        };
        // A host's offsets are a file's (off_t): the end of the write must fit, or the host
        // would be handed a range it cannot represent.
        if offset
            .checked_add(buf.len() as u64)
            .is_none_or(|end| end > i64::MAX as u64)
        {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "a write of {} bytes at offset {offset} ends past the largest file offset",
                    buf.len()
                ),
            ));
        }
        // SAFETY: the host's contract: pwrite reads at most `len` bytes from `buf`.
        let rc = unsafe { f(self.opaque, buf.as_ptr().cast(), buf.len() as u64, offset) };
        Self::transfer_result(rc, buf.len(), "the host's pwrite", offset)
    }

    fn size(&self) -> io::Result<u64> {
        let f = self.ops.get_length.expect("checked at open");
        // SAFETY: the host's contract.
        let len = unsafe { f(self.opaque) };
        u64::try_from(len).map_err(|_| cb_error(len, "the host's get_length"))
    }

    fn flush(&mut self) -> io::Result<()> {
        let Some(f) = self.ops.flush else {
            return Err(io::Error::from_raw_os_error(libc::EROFS));
        };
        // SAFETY: the host's contract.
        match unsafe { f(self.opaque) } {
            0 => Ok(()),
            rc => Err(cb_error(i64::from(rc), "the host's flush")),
        }
    }

    fn allocator(&mut self) -> Option<&mut dyn ClusterAllocator> {
        if self.ops.alloc_clusters.is_some() {
            Some(self)
        } else {
            None
        }
    }

    fn set_writable(&mut self, writable: bool) -> io::Result<()> {
        if writable && (self.ops.pwrite.is_none() || self.ops.flush.is_none()) {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "the host gave no pwrite or flush callback",
            ));
        }
        Ok(())
    }
}

impl ClusterAllocator for CallbackStorage {
    fn alloc(&mut self, n: u64, cluster_size: u64) -> io::Result<u64> {
        let f = self.ops.alloc_clusters.expect("allocator() checked it");
        let mut offset = 0u64;
        // SAFETY: the host's contract; `offset` is a valid out-pointer for the call.
        let rc = unsafe { f(self.opaque, n, cluster_size, &mut offset) };
        match rc {
            0 => Ok(offset),
            rc => Err(cb_error(i64::from(rc), "the host's alloc_clusters")),
        }
    }

    fn free(&mut self, offset: u64, n: u64, cluster_size: u64) -> io::Result<()> {
        let f = self.ops.free_clusters.expect("allocator() checked it");
        // SAFETY: the host's contract.
        match unsafe { f(self.opaque, offset, n, cluster_size) } {
            0 => Ok(()),
            rc => Err(cb_error(i64::from(rc), "the host's free_clusters")),
        }
    }
}

/// Opens a qcow2 image whose file the host (a hypervisor with its own qcow2 driver) owns, and
/// loads its bitmaps, doing all I/O through the host's callbacks in `ops`; with
/// `alloc_clusters`/`free_clusters`, every cluster qdirty uses comes from the host's allocator.
///
/// `ops` is copied (the caller's structure may go away after the call); `opaque` is passed to
/// every callback and must stay valid until `qdirty_image_close` returns. `name` names the image
/// in messages. `flags`: 0 (read-only: qdirty only reads) or QDIRTY_OPEN_RDWR.
///
/// The protocol:
/// - Open (load) when the host opens the image, after its own header checks and before the
///   guest writes anything; on every guest write, call `qdirty_image_set_dirty` (the write
///   hook). Call `qdirty_image_store_bitmaps` at checkpoints (e.g. before a snapshot of the
///   file, or inactivation for migration) and `qdirty_image_close` when the host closes the
///   image, before it releases the file: close stores the bitmaps. Until then the stored
///   bitmaps are marked in_use, so a crash leaves them inconsistent, as in QEMU.
/// - What qdirty writes, and where: cluster 0 (the header) only to set or clear autoclear bit 0
///   (bitmaps) and to add, change or drop the bitmaps extension. With host allocation it reads
///   cluster 0 again through `pread` right before each rewrite and keeps every other field and
///   extension as read, so header changes the host made between qdirty calls are kept. Without
///   host allocation it rewrites cluster 0 from the copy it read at open (updated with its own
///   refcount table moves), so the host must not change the header while the image is open
///   read-write. A read-write open
///   rewrites cluster 0 when it must drop unknown autoclear bits or an invalidated bitmaps
///   extension, and marks loaded bitmaps in_use (header, then the bitmap directory in place,
///   with flushes). Bitmap data clusters, bitmap tables and the bitmap directory are written
///   only into clusters qdirty allocated (through `alloc_clusters`, or without it through the
///   image's refcounts), and the in_use flags into the directory the header names. qdirty never writes guest data,
///   L1/L2 tables or snapshots, and never truncates or discards.
/// - Order of a store (close, store, removal of a stored bitmap): new data clusters, tables and
///   directory are written into newly allocated clusters; `flush`; cluster 0 is rewritten to name
///   the new directory (the commit point); `flush`; only then the old directory, tables and data
///   clusters are given back through `free_clusters` (or the refcounts), followed by `flush`. A
///   failure before the commit point frees what was allocated (or leaks it); after it, the old
///   clusters may leak, nothing more.
/// - The host must not keep a cached copy of cluster 0 across qdirty calls that may write it
///   (open read-write, store, remove a persistent bitmap, close, reopen): it re-reads the
///   header afterwards before writing it itself. Without host allocation the same holds for the
///   refcount table and blocks, which qdirty then writes.
///
/// Returns: the image, or NULL on failure: NULL `ops` or `name`, a bad `ops.size`, a missing
/// required callback, only one of alloc/free set, unknown flag bits (EINVAL); fields unknown to
/// this version set (ENOTSUP); an image that is not usable qcow2 (EINVAL, ENOTSUP), that needs
/// repair before it can be written (EACCES); errors from the callbacks (their errno).
/// Errors: on failure `*errp` receives the details (when `errp` is not NULL).
/// Ownership: the caller owns the image and must pass it to `qdirty_image_close`; qdirty never
/// frees or closes `opaque`.
/// Thread safety: may be called from any thread. The callbacks run on the thread that calls
/// into qdirty for the image, with the image's lock held, never concurrently for one image, and
/// must not call qdirty functions on the same image.
///
/// # Safety
/// `ops` is NULL or points to `ops->size` readable bytes starting with a `qdirty_io_ops`, whose
/// callbacks behave as documented on `qdirty_io_ops` for as long as the image is open. `name`
/// is NULL or a NUL-terminated string. `errp` is NULL or points to a `qdirty_error *` that is
/// NULL (otherwise the call returns NULL and does nothing).
#[no_mangle]
pub unsafe extern "C" fn qdirty_image_open_with_io(
    ops: *const qdirty_io_ops,
    opaque: *mut c_void,
    name: *const c_char,
    flags: u32,
    errp: *mut *mut qdirty_error,
) -> *mut qdirty_image {
    ffi_call!(errp = errp, {
        let known = QDIRTY_OPEN_RDWR | QDIRTY_OPEN_DURABLE;
        if flags & !known != 0 {
            return Err(FfiError::invalid(format!(
                "qdirty_image_open_with_io: unknown flags {:#x} (known flags: {known:#x})",
                flags & !known
            )));
        }
        // SAFETY: see the function's Safety section.
        let ops = unsafe { copy_ops(ops) }?;
        // SAFETY: see the function's Safety section.
        let name = unsafe { arg_bytes(name, "name") }?;
        let name = String::from_utf8_lossy(name).into_owned();
        let read_write = flags & QDIRTY_OPEN_RDWR != 0;
        let storage = CallbackStorage::new(ops, opaque, read_write)?;
        let image = OpenOptions::new()
            .read_write(read_write)
            .durable(flags & QDIRTY_OPEN_DURABLE != 0)
            .open_storage(Box::new(storage), &name)?;
        Ok(ImageHandle::into_raw(image))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A later layout: the first one with a field appended.
    #[repr(C)]
    struct Grown {
        ops: qdirty_io_ops,
        extra: Option<unsafe extern "C" fn(opaque: *mut c_void) -> c_int>,
    }

    unsafe extern "C" fn nop(_: *mut c_void) -> c_int {
        0
    }

    fn first_layout() -> qdirty_io_ops {
        // SAFETY: all-zero is a valid qdirty_io_ops (an integer and NULL callbacks).
        let mut ops: qdirty_io_ops = unsafe { std::mem::zeroed() };
        ops.size = IO_OPS_FIRST_SIZE as u32;
        ops.flush = Some(nop);
        ops
    }

    #[test]
    fn a_host_built_against_an_older_layout_is_accepted() {
        // A library whose struct grew reads a host's first-layout table: the new field is
        // absent (NULL), the others are the host's.
        let old = first_layout();
        // SAFETY: `old` is IO_OPS_FIRST_SIZE readable bytes; Grown is zeroable plain data.
        let got = unsafe {
            copy_versioned(
                (&old as *const qdirty_io_ops).cast::<Grown>(),
                old.size,
                IO_OPS_FIRST_SIZE,
            )
        }
        .unwrap();
        assert!(got.extra.is_none());
        assert!(got.ops.flush.is_some());
        assert_eq!(got.ops.size as usize, IO_OPS_FIRST_SIZE);
    }

    #[test]
    fn sizes_below_the_first_layout_or_with_unknown_fields_set_are_refused() {
        let mut old = first_layout();
        old.size = IO_OPS_FIRST_SIZE as u32 - 8;
        // SAFETY: at least `size` bytes are readable.
        let Err(e) = (unsafe { copy_ops(&old) }) else {
            panic!("accepted")
        };
        assert_eq!(e.errno, libc::EINVAL);
        let grown = Grown {
            ops: qdirty_io_ops {
                size: std::mem::size_of::<Grown>() as u32,
                ..first_layout()
            },
            extra: Some(nop),
        };
        // SAFETY: `grown` is `size` readable bytes.
        let Err(e) = (unsafe { copy_ops(&grown.ops) }) else {
            panic!("accepted")
        };
        assert_eq!(e.errno, libc::ENOTSUP);
    }

    /// A host over bytes in memory that follows the protocol: what it holds, and what its last
    /// flush made durable.
    #[derive(Default)]
    struct MemHost {
        data: std::sync::Mutex<Vec<u8>>,
        flushed: std::sync::Mutex<Vec<u8>>,
    }

    /// # Safety
    /// `opaque` is a live `MemHost`.
    unsafe fn mem_host<'a>(opaque: *mut c_void) -> &'a MemHost {
        // SAFETY: the caller's contract.
        unsafe { &*opaque.cast::<MemHost>() }
    }

    unsafe extern "C" fn mem_pread(
        opaque: *mut c_void,
        buf: *mut c_void,
        len: u64,
        off: u64,
    ) -> c_int {
        // SAFETY: qdirty passes back the MemHost the test gave.
        let d = unsafe { mem_host(opaque) }.data.lock().unwrap();
        let (off, len) = (off as usize, len as usize);
        if off.checked_add(len).is_none_or(|end| end > d.len()) {
            return -libc::EIO;
        }
        // SAFETY: `buf` holds `len` writable bytes; the source range was checked.
        unsafe { std::ptr::copy_nonoverlapping(d[off..].as_ptr(), buf.cast::<u8>(), len) };
        0
    }

    unsafe extern "C" fn mem_pwrite(
        opaque: *mut c_void,
        buf: *const c_void,
        len: u64,
        off: u64,
    ) -> c_int {
        // SAFETY: as mem_pread.
        let mut d = unsafe { mem_host(opaque) }.data.lock().unwrap();
        let (off, len) = (off as usize, len as usize);
        if d.len() < off + len {
            d.resize(off + len, 0);
        }
        // SAFETY: `buf` holds `len` readable bytes; the destination was sized above.
        unsafe { std::ptr::copy_nonoverlapping(buf.cast::<u8>(), d[off..].as_mut_ptr(), len) };
        0
    }

    unsafe extern "C" fn mem_flush(opaque: *mut c_void) -> c_int {
        // SAFETY: as mem_pread.
        let h = unsafe { mem_host(opaque) };
        let now = h.data.lock().unwrap().clone();
        *h.flushed.lock().unwrap() = now;
        0
    }

    unsafe extern "C" fn mem_length(opaque: *mut c_void) -> i64 {
        // SAFETY: as mem_pread.
        unsafe { mem_host(opaque) }.data.lock().unwrap().len() as i64
    }

    /// The storage a host's callbacks make, as the test kit's suite sees it, and the host it
    /// keeps alive (the callbacks' `opaque`).
    struct Hosted {
        storage: CallbackStorage,
        _host: std::sync::Arc<MemHost>,
    }

    impl qdirty_testkit::storage::StorageUnderTest for Hosted {
        fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
            self.storage.read_exact_at(buf, offset)
        }
        fn write_all_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
            self.storage.write_all_at(buf, offset)
        }
        fn write_all_vectored_at(&mut self, bufs: &[&[u8]], offset: u64) -> io::Result<()> {
            self.storage.write_all_vectored_at(bufs, offset)
        }
        fn size(&self) -> io::Result<u64> {
            self.storage.size()
        }
        fn flush(&mut self) -> io::Result<()> {
            self.storage.flush()
        }
    }

    #[test]
    fn host_callbacks_conform() {
        qdirty_testkit::storage::check_storage("CallbackStorage", |bytes| {
            let host = std::sync::Arc::new(MemHost::default());
            *host.data.lock().unwrap() = bytes.to_vec();
            *host.flushed.lock().unwrap() = bytes.to_vec();
            // SAFETY: all-zero is a valid qdirty_io_ops (an integer and NULL callbacks).
            let mut ops: qdirty_io_ops = unsafe { std::mem::zeroed() };
            ops.size = IO_OPS_FIRST_SIZE as u32;
            ops.pread = Some(mem_pread);
            ops.pwrite = Some(mem_pwrite);
            ops.flush = Some(mem_flush);
            ops.get_length = Some(mem_length);
            let opaque = std::sync::Arc::as_ptr(&host).cast_mut().cast::<c_void>();
            let Ok(st) = CallbackStorage::new(ops, opaque, true) else {
                panic!("refused")
            };
            let durable = std::sync::Arc::clone(&host);
            let hosted = Hosted {
                storage: st,
                _host: host,
            };
            qdirty_testkit::storage::Subject::with_durable(hosted, move || {
                durable.flushed.lock().unwrap().clone()
            })
        });
    }

    /// A host that passes POSIX pread's result through: the bytes read, 0 at the end of the
    /// file. The protocol takes 0 for success, so a read past the end must never reach it.
    unsafe extern "C" fn posix_pread(
        opaque: *mut c_void,
        buf: *mut c_void,
        len: u64,
        offset: u64,
    ) -> c_int {
        // SAFETY: `opaque` is the test's Vec<u8>; `buf` holds `len` bytes.
        let data = unsafe { &*opaque.cast::<Vec<u8>>() };
        let start = (offset as usize).min(data.len());
        let n = (len as usize).min(data.len() - start);
        // SAFETY: as above.
        unsafe { std::ptr::copy_nonoverlapping(data[start..].as_ptr(), buf.cast::<u8>(), n) };
        n as c_int
    }

    unsafe extern "C" fn length(opaque: *mut c_void) -> i64 {
        // SAFETY: `opaque` is the test's Vec<u8>.
        unsafe { &*opaque.cast::<Vec<u8>>() }.len() as i64
    }

    #[test]
    fn a_read_past_the_end_never_reaches_a_posix_style_pread() {
        let mut data: Vec<u8> = (0..4096u32).map(|i| i as u8).collect();
        // SAFETY: all-zero is a valid qdirty_io_ops.
        let mut ops: qdirty_io_ops = unsafe { std::mem::zeroed() };
        ops.size = IO_OPS_FIRST_SIZE as u32;
        ops.pread = Some(posix_pread);
        ops.get_length = Some(length);
        let opaque = (&mut data as *mut Vec<u8>).cast::<c_void>();
        let Ok(st) = CallbackStorage::new(ops, opaque, false) else {
            panic!("refused")
        };
        let mut buf = [0xAAu8; 512];
        st.read_exact_at(&mut buf, 1024).unwrap();
        assert_eq!(buf[0], 0);
        assert_eq!(buf[1], 1);
        // Past the end: POSIX pread would return 0, the protocol's "success", leaving the
        // buffer as it was. qdirty refuses the read first.
        let mut buf = [0xAAu8; 512];
        let e = st.read_exact_at(&mut buf, 4096).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof, "{e}");
        let e = st.read_exact_at(&mut buf, 4000).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof, "{e}");
    }
}
