//! Safe wrappers of the few operating-system calls qdirty needs beyond std (the other direction
//! of the foreign function interface): Linux open-file-description byte-range locks, as QEMU's
//! file-posix driver uses them (docs/format.md, 'Image locking').

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

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
pub fn ofd_lock_shared(file: &File, byte: u64) -> io::Result<()> {
    let mut fl = flock_for(libc::F_RDLCK as libc::c_short, byte)?;
    fcntl_lock(file, libc::F_OFD_SETLK, &mut fl)
}

/// Releases this open file description's OFD lock on one byte of `file`.
pub fn ofd_unlock(file: &File, byte: u64) -> io::Result<()> {
    let mut fl = flock_for(libc::F_UNLCK as libc::c_short, byte)?;
    fcntl_lock(file, libc::F_OFD_SETLK, &mut fl)
}

/// Whether another open file description holds any lock on one byte of `file` (a write-lock
/// probe with F_OFD_GETLK, as QEMU tests for conflicts).
pub fn ofd_probe_locked(file: &File, byte: u64) -> io::Result<bool> {
    let mut fl = flock_for(libc::F_WRLCK as libc::c_short, byte)?;
    fcntl_lock(file, libc::F_OFD_GETLK, &mut fl)?;
    Ok(fl.l_type != libc::F_UNLCK as libc::c_short)
}
