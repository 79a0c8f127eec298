//! A fault-injection [`Storage`] for crash-consistency and error-path tests (a testing tool:
//! nothing in the library uses it).
//!
//! [`FaultyStorage`] holds an image in memory and numbers every write and flush ("ops", from 0).
//! It records each op, and can be told to act at op `k` ([`Fault`]):
//!
//! * **error**: op `k` fails (EIO, or ENOSPC for a write) without effect; later ops fail too
//!   (`sticky`) or succeed again.
//! * **crash**: op `k` and everything after it are lost (they fail with EIO, so the program
//!   stops soon). The image that survives ([`FaultHandle::crashed_image`]) holds every write
//!   made durable by a flush before op `k`; each write issued since the last flush is kept or
//!   lost independently (a deterministic choice from a seed, or all kept / all lost); and when
//!   op `k` is a write, a prefix of its 512-byte sectors may reach the disk (a torn write; the
//!   sectors are those of the file, so a write inside one sector is never torn).
//!
//! Reads see every write that succeeded (the page cache of the process); a read can be made to
//! fail with EIO at read number `k`. Writes that would end beyond a size limit fail with ENOSPC.
//!
//! The storage is shared with a [`FaultHandle`] (same state), so that a test can hand the
//! storage to an [`Image`](super::Image) and still look at what happened afterwards.

use std::io;
use std::sync::{Arc, Mutex, MutexGuard};

use super::storage::Storage;

/// Sector size of the tearing model: a write is durable in whole 512-byte sectors.
pub const SECTOR: u64 = 512;

/// What happens to the writes not yet flushed when a crash happens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unflushed {
    /// All of them reached the disk (a process crash: the kernel still has them).
    Kept,
    /// None of them did (power loss with a volatile cache).
    Lost,
    /// Each independently, from this seed (power loss, writes reordered).
    Random(u64),
}

/// A fault to inject at op number `at` (writes and flushes are counted together from 0).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Op `at` fails with EIO (`enospc`: ENOSPC, for a write); with `sticky` every later op
    /// fails too, else later ops succeed.
    Error {
        /// The op that fails.
        at: u64,
        /// Later ops fail as well.
        sticky: bool,
        /// Fail a write with ENOSPC instead of EIO.
        enospc: bool,
    },
    /// The machine stops at op `at`: op `at` and later ones are lost.
    Crash {
        /// The op at which the crash happens (op `at` itself is not complete).
        at: u64,
        /// The fate of writes issued since the last flush.
        unflushed: Unflushed,
        /// How many sectors of op `at` (if a write) reach the disk, counted from its start;
        /// clamped to the sectors it touches. 0: none.
        torn_sectors: u64,
    },
}

/// One recorded op.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// A write of `len` bytes at `offset`.
    Write {
        /// Byte offset.
        offset: u64,
        /// Length in bytes.
        len: u64,
    },
    /// A flush.
    Flush,
}

#[derive(Debug, Default)]
struct Inner {
    /// What reads see: every successful write applied.
    live: Vec<u8>,
    /// The content as of the last successful flush.
    durable: Vec<u8>,
    /// Writes since the last flush, in order.
    pending: Vec<(u64, Vec<u8>)>,
    /// Ops so far (writes + flushes, including failed ones).
    ops: u64,
    /// Reads so far.
    reads: u64,
    log: Vec<Op>,
    fault: Option<Fault>,
    /// Fail read number `k` with EIO (and later ones too when the bool is set).
    read_fault: Option<(u64, bool)>,
    size_limit: Option<u64>,
    /// Set once the fault has fired.
    fired: bool,
    /// The image left by a crash.
    crashed: Option<Vec<u8>>,
}

fn apply(img: &mut Vec<u8>, offset: u64, data: &[u8]) {
    let start = offset as usize;
    let end = start + data.len();
    if end > img.len() {
        img.resize(end, 0);
    }
    img[start..end].copy_from_slice(data);
}

/// SplitMix64, for the keep/lose choices.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl Inner {
    fn crash(&mut self, unflushed: Unflushed, torn: Option<(u64, &[u8], u64)>) {
        let mut img = self.durable.clone();
        for (i, (off, data)) in self.pending.iter().enumerate() {
            let keep = match unflushed {
                Unflushed::Kept => true,
                Unflushed::Lost => false,
                Unflushed::Random(seed) => mix(seed ^ mix(i as u64)) & 1 == 1,
            };
            if keep {
                apply(&mut img, *off, data);
            }
        }
        if let Some((offset, data, sectors)) = torn {
            // The write's bytes up to the end of its `sectors`-th sector (file sectors).
            let end = offset + data.len() as u64;
            let first_sector_end = (offset / SECTOR + 1) * SECTOR;
            let cut = (first_sector_end + (sectors.saturating_sub(1)) * SECTOR).min(end);
            if sectors > 0 && cut > offset {
                apply(&mut img, offset, &data[..(cut - offset) as usize]);
            }
        }
        self.crashed = Some(img);
        self.fired = true;
    }

    /// Decides the fate of the op about to run. Ok(()) = perform it.
    fn gate(&mut self, write: Option<(u64, &[u8])>) -> io::Result<()> {
        let k = self.ops;
        self.ops += 1;
        self.log.push(match write {
            Some((offset, data)) => Op::Write {
                offset,
                len: data.len() as u64,
            },
            None => Op::Flush,
        });
        if self.crashed.is_some() {
            return Err(io::Error::other("injected crash: the machine is down"));
        }
        match self.fault {
            Some(Fault::Error { at, sticky, enospc }) if k == at || (sticky && k > at) => {
                self.fired = true;
                if enospc && write.is_some() {
                    Err(io::Error::from_raw_os_error(libc::ENOSPC))
                } else {
                    Err(io::Error::from_raw_os_error(libc::EIO))
                }
            }
            Some(Fault::Crash {
                at,
                unflushed,
                torn_sectors,
            }) if k == at => {
                let torn = write.map(|(o, d)| (o, d, torn_sectors));
                self.crash(unflushed, torn);
                Err(io::Error::other("injected crash"))
            }
            _ => Ok(()),
        }
    }
}

/// The fault-injecting storage. Clones share the same state.
#[derive(Clone, Debug)]
pub struct FaultyStorage {
    inner: Arc<Mutex<Inner>>,
}

/// A second view of a [`FaultyStorage`]'s state, kept by the test while the storage itself
/// is owned by an image.
#[derive(Clone, Debug)]
pub struct FaultHandle {
    inner: Arc<Mutex<Inner>>,
}

impl FaultyStorage {
    /// A storage holding `image` (durable), with no fault armed.
    pub fn new(image: Vec<u8>) -> (FaultyStorage, FaultHandle) {
        let inner = Arc::new(Mutex::new(Inner {
            live: image.clone(),
            durable: image,
            ..Inner::default()
        }));
        (
            FaultyStorage {
                inner: inner.clone(),
            },
            FaultHandle { inner },
        )
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl FaultHandle {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Arms a fault (replacing any other).
    pub fn set_fault(&self, fault: Option<Fault>) {
        let mut g = self.lock();
        g.fault = fault;
        g.fired = false;
    }

    /// Fails read number `at` (counted from 0 since creation) with EIO, and later reads too
    /// when `sticky`.
    pub fn set_read_fault(&self, fault: Option<(u64, bool)>) {
        self.lock().read_fault = fault;
    }

    /// Writes ending beyond `limit` bytes fail with ENOSPC.
    pub fn set_size_limit(&self, limit: Option<u64>) {
        self.lock().size_limit = limit;
    }

    /// Writes and flushes so far.
    pub fn ops(&self) -> u64 {
        self.lock().ops
    }

    /// Reads so far.
    pub fn reads(&self) -> u64 {
        self.lock().reads
    }

    /// Every write and flush so far, in order.
    pub fn log(&self) -> Vec<Op> {
        self.lock().log.clone()
    }

    /// Whether the armed fault has fired.
    pub fn fired(&self) -> bool {
        self.lock().fired
    }

    /// The image a crash left behind, if one happened.
    pub fn crashed_image(&self) -> Option<Vec<u8>> {
        self.lock().crashed.clone()
    }

    /// What reads see now (every successful write).
    pub fn live_image(&self) -> Vec<u8> {
        self.lock().live.clone()
    }

    /// The content made durable by the last successful flush.
    pub fn durable_image(&self) -> Vec<u8> {
        self.lock().durable.clone()
    }
}

impl Storage for FaultyStorage {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let mut g = self.lock();
        let k = g.reads;
        g.reads += 1;
        if g.crashed.is_some() {
            return Err(io::Error::other("injected crash: the machine is down"));
        }
        if let Some((at, sticky)) = g.read_fault {
            if k == at || (sticky && k > at) {
                g.fired = true;
                return Err(io::Error::from_raw_os_error(libc::EIO));
            }
        }
        if buf.is_empty() {
            return Ok(());
        }
        let start = usize::try_from(offset).map_err(|_| io::ErrorKind::UnexpectedEof)?;
        let end = start
            .checked_add(buf.len())
            .ok_or(io::ErrorKind::UnexpectedEof)?;
        if end > g.live.len() {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        buf.copy_from_slice(&g.live[start..end]);
        Ok(())
    }

    fn write_all_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut g = self.lock();
        if buf.is_empty() {
            // An op like any other (a fault may fire on it) that writes nothing, anywhere.
            return g.gate(Some((offset, buf)));
        }
        let end = offset
            .checked_add(buf.len() as u64)
            .filter(|&e| e <= 1 << 40)
            .ok_or(io::ErrorKind::InvalidInput)?;
        g.gate(Some((offset, buf)))?;
        if g.size_limit.is_some_and(|l| end > l) {
            return Err(io::Error::from_raw_os_error(libc::ENOSPC));
        }
        apply(&mut g.live, offset, buf);
        g.pending.push((offset, buf.to_vec()));
        Ok(())
    }

    fn size(&self) -> io::Result<u64> {
        let g = self.lock();
        if g.crashed.is_some() {
            return Err(io::Error::other("injected crash: the machine is down"));
        }
        Ok(g.live.len() as u64)
    }

    fn flush(&mut self) -> io::Result<()> {
        let mut g = self.lock();
        g.gate(None)?;
        let pending = std::mem::take(&mut g.pending);
        for (off, data) in pending {
            apply(&mut g.durable, off, &data);
        }
        Ok(())
    }

    fn set_writable(&mut self, _writable: bool) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crash_keeps_flushed_and_tears_prefix() {
        let (mut s, h) = FaultyStorage::new(vec![0u8; 2048]);
        s.write_all_at(&[1u8; 512], 0).unwrap(); // op 0
        s.flush().unwrap(); // op 1
        s.write_all_at(&[2u8; 512], 512).unwrap(); // op 2, unflushed
        h.set_fault(Some(Fault::Crash {
            at: 3,
            unflushed: Unflushed::Lost,
            torn_sectors: 1,
        }));
        assert!(s.write_all_at(&[3u8; 1024], 1024).is_err()); // op 3, torn after 1 sector
        assert!(s.flush().is_err());
        let img = h.crashed_image().unwrap();
        assert!(img[..512].iter().all(|&b| b == 1));
        assert!(img[512..1024].iter().all(|&b| b == 0));
        assert!(img[1024..1536].iter().all(|&b| b == 3));
        assert!(img[1536..].iter().all(|&b| b == 0));
        assert_eq!(h.log().len(), 5);
    }

    #[test]
    fn errors_sticky_or_not_and_enospc() {
        let (mut s, h) = FaultyStorage::new(vec![0u8; 1024]);
        h.set_fault(Some(Fault::Error {
            at: 0,
            sticky: false,
            enospc: false,
        }));
        let e = s.write_all_at(&[1], 0).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EIO));
        s.write_all_at(&[1], 0).unwrap();
        h.set_fault(Some(Fault::Error {
            at: 2,
            sticky: true,
            enospc: false,
        }));
        assert!(s.flush().is_err());
        assert!(s.flush().is_err());
        h.set_fault(None);
        h.set_size_limit(Some(1024));
        let e = s.write_all_at(&[1; 2], 1023).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOSPC));
        h.set_read_fault(Some((0, false)));
        let mut b = [0u8; 1];
        assert!(s.read_exact_at(&mut b, 0).is_err());
        s.read_exact_at(&mut b, 0).unwrap();
        assert_eq!(b[0], 1);
    }
}
