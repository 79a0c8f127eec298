//! The storage trait all image I/O goes through, and the file backend.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// Cluster allocation done by the owner of the storage (a hypervisor with its own qcow2 driver):
/// when a storage has one, qdirty never reads or writes refcounts; it asks the owner for
/// clusters and gives them back through it.
pub trait ClusterAllocator {
    /// Allocates `n` contiguous clusters of `cluster_size` bytes with refcount 1 and returns
    /// the offset of the first. The refcount change must be durable once `Storage::flush`
    /// returns.
    fn alloc(&mut self, n: u64, cluster_size: u64) -> io::Result<u64>;
    /// Gives back `n` clusters starting at `offset` (qdirty no longer references them).
    fn free(&mut self, offset: u64, n: u64, cluster_size: u64) -> io::Result<()>;
}

/// Byte-addressed storage holding one qcow2 file.
///
/// Implementations need not be thread safe: an image serializes its own calls.
pub trait Storage: Send {
    /// Reads exactly `buf.len()` bytes at `offset`; reading past the end is an error
    /// (`UnexpectedEof`). A read of zero bytes succeeds, at any offset.
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Writes all of `buf` at `offset`, growing the file when needed (a gap reads as zeros).
    /// A write of zero bytes changes nothing, at any offset.
    fn write_all_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Writes `bufs` one after the other at `offset`, as if they were one buffer (bulk data:
    /// the store hands over runs of clusters whose bytes come from several places, e.g. one
    /// shared all-ones buffer for every full cluster, with no copy into a contiguous buffer).
    /// Default: one [`Storage::write_all_at`] per buffer; [`FileStorage`] does vectored writes.
    fn write_all_vectored_at(&mut self, bufs: &[&[u8]], offset: u64) -> io::Result<()> {
        // Refused whole when it cannot end inside 64 bits (no buffer written).
        let total = bufs
            .iter()
            .try_fold(offset, |end, b| end.checked_add(b.len() as u64));
        if total.is_none() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("a vectored write at offset {offset} ends past 2^64"),
            ));
        }
        let mut off = offset;
        for b in bufs {
            self.write_all_at(b, off)?;
            off += b.len() as u64;
        }
        Ok(())
    }
    /// Current length of the file in bytes.
    fn size(&self) -> io::Result<u64>;
    /// Makes every completed write durable (fdatasync).
    fn flush(&mut self) -> io::Result<()>;
    /// The owner's cluster allocator, if the owner allocates clusters itself. Default: none,
    /// qdirty allocates through the image's refcounts.
    fn allocator(&mut self) -> Option<&mut dyn ClusterAllocator> {
        None
    }
    /// Makes the storage writable or read-only (reopen). Default: unsupported.
    fn set_writable(&mut self, writable: bool) -> io::Result<()> {
        let _ = writable;
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "this storage cannot be reopened",
        ))
    }
}

/// A qcow2 file on the local filesystem.
#[derive(Debug)]
pub struct FileStorage {
    file: File,
    path: Option<PathBuf>,
    /// The QEMU-compatible locks held through `file`.
    lock: super::lock::LockMode,
    /// The process that took the locks: only it releases them (a forked child shares the open
    /// file description, and so the locks, with its parent).
    owner_pid: u32,
}

impl FileStorage {
    /// Opens `path` for reading, and for writing when `write` is set, without image locks.
    pub fn open(path: &Path, write: bool) -> io::Result<Self> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(write)
            .open(path)?;
        Ok(FileStorage {
            file,
            path: Some(path.to_path_buf()),
            lock: super::lock::LockMode::None,
            owner_pid: std::process::id(),
        })
    }

    /// Opens `path` and takes QEMU's image locks (shared lock bytes plus conflict probes; see
    /// `lock.rs`): read-write when `write`, else read-only; no locks with `force_share`
    /// (read-only only). Fails with `Error::InUse` while another process (QEMU) holds the image
    /// in a conflicting way.
    pub fn open_locked(path: &Path, write: bool, force_share: bool) -> crate::Result<Self> {
        use super::lock::{acquire, LockMode};
        let name = path.display().to_string();
        if write && force_share {
            return Err(crate::Error::InvalidArgument(
                "force-share is only possible for read-only opens".into(),
            ));
        }
        let mut st = Self::open(path, write)
            .map_err(|e| crate::Error::io(format!("Could not open '{name}'"), e))?;
        let mode = match (write, force_share) {
            (_, true) => LockMode::None,
            (true, false) => LockMode::Write,
            (false, false) => LockMode::Read,
        };
        if acquire(&st.file, mode, &name)? {
            st.lock = mode;
        }
        Ok(st)
    }

    /// Wraps an open file.
    pub fn from_file(file: File) -> Self {
        FileStorage {
            file,
            path: None,
            lock: super::lock::LockMode::None,
            owner_pid: std::process::id(),
        }
    }

    /// The underlying file.
    pub fn file(&self) -> &File {
        &self.file
    }
}

impl Drop for FileStorage {
    /// Releases the image locks explicitly before the descriptor closes: a child process forked
    /// by another thread may still hold a copy of the descriptor until it execs, and the locks
    /// belong to the open file description, so they would outlive this close for a moment.
    /// In a forked child nothing is released: the locks are the parent's too.
    fn drop(&mut self) {
        if std::process::id() == self.owner_pid {
            super::lock::release(&self.file, self.lock);
        }
    }
}

impl Storage for FileStorage {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    fn write_all_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_all_at(buf, offset)
    }

    /// A seek and `writev` calls (at most IOV_MAX buffers each, the rest after a short write).
    /// Nothing else uses the file position: every other access is positioned (pread/pwrite).
    fn write_all_vectored_at(&mut self, bufs: &[&[u8]], offset: u64) -> io::Result<()> {
        use std::io::{IoSlice, Seek, SeekFrom, Write};
        let mut slices: Vec<IoSlice<'_>> = bufs
            .iter()
            .filter(|b| !b.is_empty())
            .map(|b| IoSlice::new(b))
            .collect();
        if slices.len() <= 1 {
            return match slices.first() {
                Some(b) => self.file.write_all_at(b, offset),
                None => Ok(()),
            };
        }
        let mut file = &self.file;
        file.seek(SeekFrom::Start(offset))?;
        let mut left = &mut slices[..];
        while !left.is_empty() {
            match file.write_vectored(left) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => IoSlice::advance_slices(&mut left, n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn size(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn set_writable(&mut self, writable: bool) -> io::Result<()> {
        let Some(path) = &self.path else {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "no path to reopen",
            ));
        };
        use super::lock::{acquire, release, LockMode};
        let name = path.display().to_string();
        let new = std::fs::OpenOptions::new()
            .read(true)
            .write(writable)
            .open(path)?;
        let (old_mode, new_mode) = match self.lock {
            LockMode::None => (LockMode::None, LockMode::None),
            _ if writable => (LockMode::Read, LockMode::Write),
            _ => (LockMode::Write, LockMode::Read),
        };
        // Our own old locks would conflict with the new descriptor's probes: drop them first,
        // and take them back if the new ones cannot be had.
        release(&self.file, old_mode);
        match acquire(&new, new_mode, &name) {
            Ok(_) => {
                self.file = new;
                self.lock = new_mode;
                Ok(())
            }
            Err(e) => {
                let _ = acquire(&self.file, old_mode, &name);
                Err(io::Error::new(io::ErrorKind::WouldBlock, e.to_string()))
            }
        }
    }
}

/// A qcow2 file held in memory (tests, fuzzing).
#[derive(Clone, Debug, Default)]
pub struct MemStorage {
    /// The file's bytes.
    pub data: Vec<u8>,
}

impl Storage for MemStorage {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        let start = usize::try_from(offset).map_err(|_| io::ErrorKind::UnexpectedEof)?;
        let end = start
            .checked_add(buf.len())
            .ok_or(io::ErrorKind::UnexpectedEof)?;
        if end > self.data.len() {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        buf.copy_from_slice(&self.data[start..end]);
        Ok(())
    }

    fn write_all_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        let start = usize::try_from(offset).map_err(|_| io::ErrorKind::InvalidInput)?;
        let end = start
            .checked_add(buf.len())
            .ok_or(io::ErrorKind::InvalidInput)?;
        if end > self.data.len() {
            self.data.resize(end, 0);
        }
        self.data[start..end].copy_from_slice(buf);
        Ok(())
    }

    fn size(&self) -> io::Result<u64> {
        Ok(self.data.len() as u64)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }

    fn set_writable(&mut self, _writable: bool) -> io::Result<()> {
        Ok(())
    }
}
