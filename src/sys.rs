//! The operating-system calls qdirty makes beyond std, each behind a safe function but
//! [`unmap_pages`], whose caller vouches that nothing uses the pages any more (the other
//! direction of the foreign function interface). With the C ABI (src/ffi) and the write log's
//! memory reclamation (src/qsbr.rs), this is the only place with `unsafe` code.
//!
//! - Open-file-description byte-range locks (Linux `F_OFD_SETLK` / `F_OFD_GETLK`), as QEMU's
//!   file-posix driver takes them (docs/format.md, 'Image locking'), for the image layer's
//!   locking (src/image/lock.rs).
//! - membarrier(2) (Linux >= 4.14), which issues a full memory barrier on every running thread
//!   of the process: it lets the write hook order its accesses with plain stores and a
//!   compiler fence (no locked instruction) while the one thread that frees memory pays for
//!   the barrier (src/qsbr.rs explains the protocol).
//! - mmap(2) and munmap(2) for pieces of memory in pages of their own (src/qsbr.rs), given
//!   back to the system at once when freed, outside the C allocator's heap.
//! - malloc_trim(3) (glibc), which gives the free pages the C allocator keeps back to the
//!   system: after large frees (a bitmap cleared, the write log's pieces reclaimed), so that
//!   resident memory follows what qdirty holds.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicUsize, Ordering};
#[cfg(target_os = "linux")]
use std::sync::OnceLock;

// Open-file-description locks.

fn flock_for(kind: libc::c_short, byte: u64) -> io::Result<libc::flock> {
    // SAFETY: flock is a plain C struct for which all-zero bytes are a valid value.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = kind;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start =
        libc::off_t::try_from(byte).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    fl.l_len = 1;
    fl.l_pid = 0; // required by OFD locks
    Ok(fl)
}

fn fcntl_lock(file: &File, cmd: libc::c_int, fl: &mut libc::flock) -> io::Result<()> {
    // SAFETY: the descriptor is open for as long as `file` lives, and `fl` is a valid flock
    // that the kernel may write to (F_OFD_GETLK).
    let r = unsafe { libc::fcntl(file.as_raw_fd(), cmd, fl as *mut libc::flock) };
    if r == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Takes a shared (read) OFD lock on one byte of `file`. Fails with EAGAIN when another open
/// file description holds a write lock on it.
pub(crate) fn ofd_lock_shared(file: &File, byte: u64) -> io::Result<()> {
    let mut fl = flock_for(libc::F_RDLCK as libc::c_short, byte)?;
    fcntl_lock(file, libc::F_OFD_SETLK, &mut fl)
}

/// Releases this open file description's OFD lock on one byte of `file`.
pub(crate) fn ofd_unlock(file: &File, byte: u64) -> io::Result<()> {
    let mut fl = flock_for(libc::F_UNLCK as libc::c_short, byte)?;
    fcntl_lock(file, libc::F_OFD_SETLK, &mut fl)
}

/// Whether another open file description holds any lock on one byte of `file` (a write-lock
/// probe with F_OFD_GETLK, as QEMU tests for conflicts).
pub(crate) fn ofd_probe_locked(file: &File, byte: u64) -> io::Result<bool> {
    let mut fl = flock_for(libc::F_WRLCK as libc::c_short, byte)?;
    fcntl_lock(file, libc::F_OFD_GETLK, &mut fl)?;
    Ok(fl.l_type != libc::F_UNLCK as libc::c_short)
}

// membarrier(2).

/// Asks which commands the kernel supports (a bit mask of them). Linux: MEMBARRIER_CMD_QUERY.
#[cfg(target_os = "linux")]
const MEMBARRIER_CMD_QUERY: libc::c_long = 0;
/// A barrier on the running threads of this process, by inter-processor interrupts. Linux:
/// MEMBARRIER_CMD_PRIVATE_EXPEDITED.
#[cfg(target_os = "linux")]
const MEMBARRIER_CMD_PRIVATE_EXPEDITED: libc::c_long = 1 << 3;
/// Declares the intent to use MEMBARRIER_CMD_PRIVATE_EXPEDITED (once per process). Linux:
/// MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED.
#[cfg(target_os = "linux")]
const MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED: libc::c_long = 1 << 4;

#[cfg(target_os = "linux")]
fn membarrier(cmd: libc::c_long) -> libc::c_long {
    // SAFETY: membarrier takes two integers (command, flags) and a CPU id; it reads and writes
    // no memory of ours.
    unsafe {
        libc::syscall(
            libc::SYS_membarrier,
            cmd,
            0 as libc::c_long,
            0 as libc::c_long,
        )
    }
}

/// Whether [`membarrier_private_expedited`] works in this process: queried and registered on
/// the first call (false off Linux, before 4.14, or when a seccomp filter refuses the call).
#[cfg(target_os = "linux")]
fn registered() -> bool {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    *REGISTERED.get_or_init(|| {
        let cmds = membarrier(MEMBARRIER_CMD_QUERY);
        cmds >= 0
            && cmds & MEMBARRIER_CMD_PRIVATE_EXPEDITED != 0
            && cmds & MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED != 0
            && membarrier(MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED) == 0
    })
}

/// Whether [`membarrier_private_expedited`] works in this process (registers it on the first
/// call).
pub(crate) fn membarrier_available() -> bool {
    #[cfg(target_os = "linux")]
    {
        registered()
    }
    #[cfg(not(target_os = "linux"))]
    {
        false
    }
}

/// Issues a full memory barrier on every thread of this process that runs at the moment (a
/// thread that does not run passes one when it is scheduled again): when this returns true,
/// each other thread's memory accesses before its barrier point are visible to the caller,
/// and its accesses after that point see everything the caller did before the call. Returns
/// false, having done nothing, where the kernel does not offer it.
pub(crate) fn membarrier_private_expedited() -> bool {
    #[cfg(target_os = "linux")]
    {
        registered() && membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED) == 0
    }
    #[cfg(not(target_os = "linux"))]
    {
        false
    }
}

// Pages of their own.

/// A private anonymous mapping of `len` bytes (readable, writable, zero-filled, page-aligned),
/// or None when the system refuses it.
pub(crate) fn map_pages(len: usize) -> Option<std::ptr::NonNull<u8>> {
    // SAFETY: a new anonymous mapping at an address of the kernel's choice touches no memory
    // of ours.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return None;
    }
    std::ptr::NonNull::new(p.cast())
}

/// Gives a mapping of [`map_pages`] back to the system.
///
/// # Safety
/// `p` and `len` are those of one [`map_pages`] mapping, which nothing uses afterwards.
pub(crate) unsafe fn unmap_pages(p: std::ptr::NonNull<u8>, len: usize) {
    // SAFETY: the caller's contract. munmap fails only for arguments that are not a mapping,
    // which the contract excludes.
    unsafe {
        libc::munmap(p.as_ptr().cast(), len);
    }
}

// Giving freed memory back.

/// Bytes of heap freed since free memory was last given back.
static FREED_SINCE_TRIM: AtomicUsize = AtomicUsize::new(0);

/// Freed bytes after which the C allocator is asked to give its free pages back. glibc keeps
/// freed memory for reuse and returns it only from the top of its heap, so a heap where
/// short-lived blocks (the write log's pieces, epochs) alternate with long-lived ones (the
/// bitmaps' chunks) stays as large as it ever was. Asking costs a walk of the allocator's free
/// lists (about 50 µs when little is free, 15 ms for 500 MiB of scattered free pages), paid
/// at most once per this many bytes freed.
pub(crate) const TRIM_AFTER_BYTES: usize = 16 << 20;

/// Notes that `bytes` of heap were freed; once [`TRIM_AFTER_BYTES`] have added up, gives the
/// free pages of the C allocator back to the system (glibc's malloc_trim; nothing elsewhere).
pub(crate) fn freed(bytes: usize) {
    if bytes == 0 {
        return;
    }
    let total = FREED_SINCE_TRIM.fetch_add(bytes, Ordering::Relaxed) + bytes;
    if total < TRIM_AFTER_BYTES {
        return;
    }
    FREED_SINCE_TRIM.store(0, Ordering::Relaxed);
    trim();
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn trim() {
    // SAFETY: malloc_trim only walks and releases the allocator's free memory; it takes the
    // allocator's own locks.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn trim() {}

#[cfg(test)]
mod tests {
    #[test]
    #[cfg(target_os = "linux")]
    fn membarrier_works_here() {
        // Linux >= 4.14 everywhere this project builds; the memory figures assume it.
        assert!(super::membarrier_private_expedited());
        assert!(super::membarrier_private_expedited());
    }
}
