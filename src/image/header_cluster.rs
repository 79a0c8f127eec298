//! The header cluster (cluster 0 of the image): reading the header, its extensions and the
//! backing file name, and rewriting them.
//!
//! # Rewriting cluster 0 without ever exposing a broken header
//!
//! QEMU's `qcow2_update_header` rewrites the whole of cluster 0 with one write. A write larger
//! than a sector is not atomic: after a power loss any of its 512-byte sectors may be old or
//! new (the test storage, `fault.rs`, tears at sector boundaries; we reason about any subset of
//! sectors, which covers prefix and suffix tearing). One sector is written atomically.
//!
//! With 64 KiB clusters QEMU's feature-name table ends at byte 504, so the bitmaps extension
//! header sits at 504..512 (sector 0) and its 24 data bytes at 512..536 (sector 1). When the
//! extension appears (first bitmap) or disappears (last bitmap removed), new sector 0 with old
//! sector 1 (or the reverse) gives "bit set, extension with all-zero data", which QEMU refuses
//! to open ("found bitmaps extension with zero bitmaps") and `qemu-img check -r` cannot repair.
//! A backing file name, which QEMU places right after the end marker, moves in the same
//! writes, so a torn write can also leave `backing_file_offset` (sector 0) naming bytes that are
//! not (yet, or any more) the name.
//!
//! [`HeaderCluster::write`] therefore does not write the cluster blindly. It keeps the bytes of
//! cluster 0 as last read or written (`on_disk`, shared by clones so that a rollback of the
//! in-memory header cannot make it stale; forgotten after any failed write), builds the new
//! cluster and chooses a *plan*: a sequence of intermediate cluster images, each written as one
//! write of the sectors that differ from the previous one, with a flush between them. A plan is
//! taken only after every state a crash can leave is checked by parsing it the way QEMU does
//! ([`meaning`]): for a step that changes one sector, just its result; for up to 10 changed
//! sectors, every subset of them; beyond that, every prefix and suffix. A state is acceptable
//! when it parses, names the same backing file, has the old or the new header fields, and its
//! bitmaps state is the old one or the new one (strict), or, in a second round, "bitmaps bit
//! clear" (relaxed: QEMU and qdirty then treat every bitmap as inconsistent and only leak its
//! clusters; this is never needed for QEMU's own layouts, see below). Plans, in order:
//!
//! 1. one write of the changed sectors (atomic when they are a single sector: a flip of the
//!    autoclear bit, or a store that only moves the directory, where the 24 data bytes change
//!    inside sector 1);
//! 2. tail first: the changed sectors after sector 0, flush, then sector 0. Safe when the old
//!    header reads no byte that changes after sector 0: the extension appears (the old end
//!    marker is at 504, inside sector 0);
//! 3. head first: sector 0, flush, then the rest. Safe when the new header reads no byte that
//!    changes after sector 0: the extension disappears (the new end marker is at 504);
//! 4. through an intermediate header: bytes the old header does not read (beyond its end marker
//!    and backing name) are written first; then sector 0 of the new header with autoclear bit 0
//!    clear; then the rest; then the new sector 0 with the bit set;
//! 5. the whole new cluster with bit 0 clear, then sector 0 with the bit set.
//!
//! The backing file name is placed by us, not always right after the end marker: QEMU reads it
//! wherever `backing_file_offset` points, and the extension area simply ends there. Candidates,
//! in order: where it already is, when the new extension area still ends before it (so an
//! extension that disappears never moves it: with a backing file and 64 KiB clusters the end
//! marker goes from 552 back to 520 and the name stays at 560, plan 3); QEMU's place right
//! after the end marker; and a place beyond everything the old header reads. When the
//! extension appears in an image with a backing file (QEMU: end marker at 520, name at 528),
//! the new extension must overwrite the old end marker and the old name, both read by the old
//! header, while the new header reads them too: no plan 1-3 is safe for any placement, plan 4
//! is (relaxed): the name is first copied beyond the old name (unread by the old header), then
//! sector 0 with bit 0 clear and `backing_file_offset` at the copy (it reads the old end marker
//! or the new extension, which it ignores, and the copied name), then the extension bytes, then
//! sector 0 with the bit set. A crash in between leaves the bitmaps of the new directory
//! unreferenced (leaks) and no bitmap claiming to be consistent; the image is never refused.
//! The feature table of an older QEMU (7 entries) that we regenerate with 8 entries moves every
//! later byte; the same search covers it.
//!
//! Only 512-byte clusters are written in one write (one sector: atomic).

use std::sync::{Arc, Mutex};

use super::storage::Storage;
use crate::error::{Error, Result};
use crate::format::extension::{encode_header_cluster, BitmapsExt, Extensions};
use crate::format::header::Header;
use crate::format::{
    be, round_up, AUTOCLEAR_BITMAPS, MAX_CLUSTER_BITS, MIN_CLUSTER_BITS, V3_HEADER_LENGTH,
};

/// Sector size: the unit a write is torn at.
const SECTOR: usize = 512;

/// The header cluster as held in memory: header, extensions and backing file name.
#[derive(Clone, Debug)]
pub struct HeaderCluster {
    /// The header fields.
    pub header: Header,
    /// The extensions.
    pub exts: Extensions,
    /// The backing file name, if any.
    pub backing_name: Option<Vec<u8>>,
    /// Cluster 0 as last read or written (None: unknown, read it again before writing).
    on_disk: Arc<Mutex<Option<Vec<u8>>>>,
}

impl HeaderCluster {
    /// Reads and validates cluster 0: header, extensions, unknown incompatible features.
    pub fn read(storage: &dyn Storage) -> Result<HeaderCluster> {
        let len = storage
            .size()
            .map_err(|e| Error::io("Could not get the image length", e))?;
        let mut probe = vec![0u8; len.min(104) as usize];
        storage
            .read_exact_at(&mut probe, 0)
            .map_err(|e| Error::io("Could not read the qcow2 header", e))?;
        // Read all of cluster 0 (bounded by QEMU's largest cluster size and the file length);
        // the header parser validates cluster_bits itself.
        let cluster_bits = if probe.len() >= 24 {
            be::get_u32(&probe, 20).clamp(MIN_CLUSTER_BITS, MAX_CLUSTER_BITS)
        } else {
            MIN_CLUSTER_BITS
        };
        let mut buf = vec![0u8; len.min(1u64 << cluster_bits) as usize];
        storage
            .read_exact_at(&mut buf, 0)
            .map_err(|e| Error::io("Could not read the qcow2 header", e))?;
        let header = Header::parse(&buf)?;
        if (buf.len() as u64) < header.cluster_size() {
            buf.resize(header.cluster_size() as usize, 0);
        }
        let exts = Extensions::parse(&buf, &header)?;
        header.check_incompatible(exts.feature_table.as_deref())?;
        let backing_name = Extensions::backing_file_name(&buf, &header)?;
        Ok(HeaderCluster {
            header,
            exts,
            backing_name,
            on_disk: Arc::new(Mutex::new(Some(buf))),
        })
    }

    /// Whether cluster 0 has room for a bitmaps extension (always, when it has one already).
    /// With small clusters and a long backing file name it may not: QEMU's store then fails
    /// with ENOSPC ("Failed to update bitmap extension") and leaves the image as it was; a
    /// store checks this before it writes anything, to do the same.
    pub fn check_room_for_bitmaps(&self) -> Result<()> {
        if self.exts.bitmaps.is_some() {
            return Ok(());
        }
        let mut header = self.header.clone();
        header.autoclear_features |= AUTOCLEAR_BITMAPS;
        let exts = Extensions {
            bitmaps: Some(BitmapsExt {
                nb_bitmaps: 1,
                reserved32: 0,
                bitmap_directory_size: 0,
                bitmap_directory_offset: 0,
            }),
            ..self.exts.clone()
        };
        match encode_header_cluster(&header, &exts, self.backing_name.as_deref()) {
            Err(Error::NoSpace(m)) => Err(Error::NoSpace(format!(
                "Failed to update bitmap extension: no room for it in cluster 0: {m}"
            ))),
            // Any other problem is the header write's to report.
            _ => Ok(()),
        }
    }

    /// Rewrites cluster 0 from memory, with QEMU's content (qcow2_update_header) but in an
    /// order that no crash can tear into a header QEMU refuses (module documentation). The last
    /// write is not flushed; intermediate ones are.
    pub fn write(&mut self, storage: &mut dyn Storage) -> Result<()> {
        let new = encode_header_cluster(&self.header, &self.exts, self.backing_name.as_deref())?;
        let cs = new.len();
        let known = self
            .on_disk
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        let old = match known {
            Some(o) if o.len() == cs => Some(o),
            _ => read_cluster0(storage, cs),
        };
        let steps = match &old {
            Some(old) if cs > SECTOR => plan(old, &new),
            _ => vec![new],
        };
        let mut cur = old.unwrap_or_default();
        cur.resize(cs, 0);
        let last = steps.len() - 1;
        for (i, target) in steps.iter().enumerate() {
            let Some((a, b)) = changed_sectors(&cur, target) else {
                continue;
            };
            let (start, end) = (a * SECTOR, ((b + 1) * SECTOR).min(cs));
            storage
                .write_all_at(&target[start..end], start as u64)
                .map_err(|e| Error::io("Failed to update the image header", e))?;
            if i != last {
                storage
                    .flush()
                    .map_err(|e| Error::io("Failed to update the image header", e))?;
            }
            cur.clone_from(target);
        }
        self.header.header_length = V3_HEADER_LENGTH + self.header.unknown_fields.len() as u32;
        if self.backing_name.is_some() {
            self.header.backing_file_offset = be::get_u64(&cur, 8);
            self.header.backing_file_size = be::get_u32(&cur, 16);
        }
        *self.on_disk.lock().unwrap_or_else(|p| p.into_inner()) = Some(cur);
        Ok(())
    }
}

/// Cluster 0 as the storage has it now, zero-filled beyond the end of the file.
fn read_cluster0(storage: &dyn Storage, cs: usize) -> Option<Vec<u8>> {
    let len = storage.size().ok()?.min(cs as u64) as usize;
    let mut buf = vec![0u8; len];
    storage.read_exact_at(&mut buf, 0).ok()?;
    buf.resize(cs, 0);
    Some(buf)
}

/// First and last sector in which `a` and `b` differ.
fn changed_sectors(a: &[u8], b: &[u8]) -> Option<(usize, usize)> {
    let first = a.iter().zip(b).position(|(x, y)| x != y)?;
    let last = a.iter().zip(b).rposition(|(x, y)| x != y)?;
    Some((first / SECTOR, last / SECTOR))
}

/// What a header means to QEMU, for comparing crash states: the header fields and extensions
/// other than the ones below, the backing file name (as a C string), and the bitmaps state.
#[derive(Debug, PartialEq, Eq)]
struct Meaning {
    header: Header,
    exts: Extensions,
    backing: Option<Vec<u8>>,
    bitmaps: Bitmaps,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Bitmaps {
    /// Autoclear bit 0 clear: any extension is ignored (its length must still be 24).
    Off,
    /// Bit set and this extension.
    On(BitmapsExt),
    /// Bit set, no extension (QEMU marks the image corrupt on the next allocation).
    OnWithout,
}

/// Parses cluster 0 (or its first bytes; the rest reads as zeros) as QEMU's open does; None
/// when QEMU would refuse it.
fn meaning(buf: &[u8]) -> Option<Meaning> {
    let mut header = Header::parse(buf).ok()?;
    let exts = Extensions::parse(buf, &header).ok()?;
    header
        .check_incompatible(exts.feature_table.as_deref())
        .ok()?;
    let backing = Extensions::backing_file_name(buf, &header)
        .ok()?
        .map(|n| n.split(|&c| c == 0).next().unwrap_or(&[]).to_vec());
    if let Some(b) = exts.bitmaps {
        if header.autoclear_features & AUTOCLEAR_BITMAPS != 0 {
            // QEMU validates the extension at open when the bit is set.
            b.validate(header.cluster_size()).ok()?;
        }
    }
    let bitmaps = match (
        header.autoclear_features & AUTOCLEAR_BITMAPS != 0,
        exts.bitmaps,
    ) {
        (false, _) => Bitmaps::Off,
        (true, Some(b)) => Bitmaps::On(b),
        (true, None) => Bitmaps::OnWithout,
    };
    header.autoclear_features &= !AUTOCLEAR_BITMAPS;
    header.backing_file_offset = 0;
    header.backing_file_size = 0;
    header.header_length = 0;
    let exts = Extensions {
        bitmaps: None,
        feature_table: None,
        ..exts
    };
    Some(Meaning {
        header,
        exts,
        backing,
        bitmaps,
    })
}

/// Where the extension area ends (one past the end marker, or the area's end) and where
/// everything the header reads ends (including the backing file name).
fn layout_ends(buf: &[u8]) -> Option<(usize, usize)> {
    let header = Header::parse(buf).ok()?;
    let start = header.extensions_start() as usize;
    let area_end = (header.extensions_end() as usize).min(buf.len());
    let mut pos = start;
    let mut ext_end = area_end;
    while pos + 8 <= area_end {
        let magic = be::get_u32(buf, pos);
        let len = be::get_u32(buf, pos + 4) as usize;
        if magic == 0 {
            ext_end = pos + 8;
            break;
        }
        pos += 8 + round_up(len as u64, 8) as usize;
    }
    let backing_end = if header.backing_file_offset != 0 {
        (header.backing_file_offset + u64::from(header.backing_file_size)) as usize
    } else {
        0
    };
    Some((ext_end, ext_end.max(backing_end).min(buf.len())))
}

/// `buf` with its backing file name moved to `to` (backing_file_offset updated).
fn relocate_backing(buf: &[u8], to: usize) -> Option<Vec<u8>> {
    let from = be::get_u64(buf, 8) as usize;
    let len = be::get_u32(buf, 16) as usize;
    if from == 0 || to + len > buf.len() {
        return None;
    }
    let name = buf[from..from + len].to_vec();
    let mut out = buf.to_vec();
    out[from..from + len].fill(0);
    out[to..to + len].copy_from_slice(&name);
    be::put_u64(&mut out, 8, to as u64);
    Some(out)
}

/// `base` with the bytes of `src` in [start, end).
fn splice(base: &[u8], src: &[u8], start: usize, end: usize) -> Vec<u8> {
    let mut out = base.to_vec();
    out[start..end].copy_from_slice(&src[start..end]);
    out
}

/// `buf` with autoclear bit 0 clear.
fn bit_clear(buf: &[u8]) -> Vec<u8> {
    let mut out = buf.to_vec();
    let a = be::get_u64(&out, 88) & !AUTOCLEAR_BITMAPS;
    be::put_u64(&mut out, 88, a);
    out
}

/// The sequence of cluster images to write to go from `old` to `new` (module documentation).
/// The last element has `new`'s content, with the backing file name possibly elsewhere.
fn plan(old: &[u8], new: &[u8]) -> Vec<Vec<u8>> {
    let (Some(mo), Some(mn)) = (meaning(old), meaning(new)) else {
        // The old header is not one QEMU would open (or ours would not be): nothing to keep.
        return vec![new.to_vec()];
    };
    if old == new {
        return vec![new.to_vec()];
    }
    let cs = new.len();
    let (Some((_, old_used)), Some((new_ext_end, _))) = (layout_ends(old), layout_ends(new)) else {
        return vec![new.to_vec()];
    };
    // Placements of the backing file name.
    let mut targets = Vec::new();
    let old_off = be::get_u64(old, 8) as usize;
    let name_len = be::get_u32(new, 16) as usize;
    if be::get_u64(new, 8) != 0 {
        if old_off >= new_ext_end
            && mo.backing == mn.backing
            && be::get_u32(old, 16) as usize == name_len
        {
            if let Some(t) = relocate_backing(new, old_off) {
                targets.push(t);
            }
        }
        targets.push(new.to_vec());
        let far = round_up(old_used.max(new_ext_end) as u64, 8) as usize;
        if let Some(t) = relocate_backing(new, far) {
            targets.push(t);
        }
    } else {
        targets.push(new.to_vec());
    }
    for relaxed in [false, true] {
        for t in &targets {
            let candidates: Vec<Vec<Vec<u8>>> = {
                let head = |src: &[u8]| splice(old, src, 0, SECTOR);
                let a = splice(old, t, old_used.min(cs), cs);
                let i0 = bit_clear(t);
                let mut c = vec![
                    vec![t.clone()],
                    vec![splice(old, t, SECTOR, cs), t.clone()],
                    vec![head(t), t.clone()],
                ];
                if relaxed {
                    c.push(vec![
                        a.clone(),
                        splice(&a, &i0, 0, SECTOR),
                        splice(t, &i0, 0, SECTOR),
                        t.clone(),
                    ]);
                    c.push(vec![i0.clone(), t.clone()]);
                }
                c
            };
            for steps in candidates {
                if safe(old, &steps, &mo, &mn, relaxed) {
                    return steps;
                }
            }
        }
    }
    // No plan passed (a layout we cannot protect): QEMU's two-phase best effort.
    vec![bit_clear(new), new.to_vec()]
}

/// Whether every state a crash can leave while writing `steps` (starting from `old`) is
/// acceptable.
fn safe(old: &[u8], steps: &[Vec<u8>], mo: &Meaning, mn: &Meaning, relaxed: bool) -> bool {
    let ok = |buf: &[u8]| -> bool {
        let Some(m) = meaning(buf) else {
            return false;
        };
        let rest_ok = (m.header == mo.header && m.exts == mo.exts)
            || (m.header == mn.header && m.exts == mn.exts);
        let backing_ok = m.backing == mo.backing || m.backing == mn.backing;
        let bitmaps_ok = m.bitmaps == mo.bitmaps
            || m.bitmaps == mn.bitmaps
            || (relaxed && m.bitmaps == Bitmaps::Off);
        rest_ok && backing_ok && bitmaps_ok
    };
    // Only the bytes up to the last non-zero byte of any image matter (the rest is zero in
    // all of them).
    let relevant = std::iter::once(old)
        .chain(steps.iter().map(Vec::as_slice))
        .map(|b| b.iter().rposition(|&c| c != 0).map_or(0, |p| p + 1))
        .max()
        .unwrap_or(0);
    let relevant = round_up(relevant.max(SECTOR) as u64, SECTOR as u64) as usize;
    let relevant = relevant.min(old.len());
    let mut cur = &old[..relevant];
    for step in steps {
        let step = &step[..relevant];
        let changed: Vec<usize> = (0..relevant / SECTOR)
            .filter(|&s| cur[s * SECTOR..(s + 1) * SECTOR] != step[s * SECTOR..(s + 1) * SECTOR])
            .collect();
        let n = changed.len();
        let mixes: Vec<Vec<bool>> = if n <= 1 {
            vec![vec![true; n]]
        } else if n <= 10 {
            (1..(1u32 << n))
                .map(|m| (0..n).map(|i| m & (1 << i) != 0).collect())
                .collect()
        } else {
            (1..=n)
                .flat_map(|k| {
                    [
                        (0..n).map(|i| i < k).collect(),
                        (0..n).map(|i| i >= n - k).collect(),
                    ]
                })
                .collect()
        };
        for mix in mixes {
            let mut state = cur.to_vec();
            for (i, &s) in changed.iter().enumerate() {
                if mix[i] {
                    state[s * SECTOR..(s + 1) * SECTOR]
                        .copy_from_slice(&step[s * SECTOR..(s + 1) * SECTOR]);
                }
            }
            if !ok(&state) {
                return false;
            }
        }
        cur = step;
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::extension::Extensions;
    use crate::image::storage::MemStorage;

    fn header_64k() -> (Header, Vec<u8>) {
        let mut s = MemStorage::default();
        let dir =
            std::env::temp_dir().join(format!("qdirty-header-cluster-{}", std::process::id()));
        let _ = std::fs::remove_file(&dir);
        crate::image::create::create(&dir, 1 << 30, 65536).unwrap();
        s.data = std::fs::read(&dir).unwrap();
        let _ = std::fs::remove_file(&dir);
        let m = HeaderCluster::read(&s).unwrap();
        (m.header, s.data)
    }

    fn ext() -> BitmapsExt {
        BitmapsExt {
            nb_bitmaps: 1,
            reserved32: 0,
            bitmap_directory_size: 32,
            bitmap_directory_offset: 0x50000,
        }
    }

    /// Every plan the write takes is safe under any subset of sectors, for the layouts that tear
    /// QEMU's single write: the extension appearing and disappearing, with and without a backing
    /// file.
    #[test]
    fn plans_for_appearing_and_disappearing_extension() {
        let (h, _) = header_64k();
        for backing in [None, Some(b"base.qcow2".to_vec()), Some(vec![b'x'; 300])] {
            let mut without = h.clone();
            without.autoclear_features &= !AUTOCLEAR_BITMAPS;
            let mut with = h.clone();
            with.autoclear_features |= AUTOCLEAR_BITMAPS;
            let e0 = Extensions {
                backing_format: backing.as_ref().map(|_| b"qcow2".to_vec()),
                ..Extensions::default()
            };
            let e1 = Extensions {
                bitmaps: Some(ext()),
                ..e0.clone()
            };
            let a = encode_header_cluster(&without, &e0, backing.as_deref()).unwrap();
            let b = encode_header_cluster(&with, &e1, backing.as_deref()).unwrap();
            let (ma, mb) = (meaning(&a).unwrap(), meaning(&b).unwrap());
            for (old, new, mo, mn) in [(&a, &b, &ma, &mb), (&b, &a, &mb, &ma)] {
                let steps = plan(old, new);
                assert!(safe(old, &steps, mo, mn, true), "backing {backing:?}");
                let last = steps.last().unwrap();
                let m = meaning(last).unwrap();
                assert_eq!(m, *mn);
            }
            // The plain single write QEMU does is unsafe without a backing file.
            if backing.is_none() {
                assert!(!safe(&a, std::slice::from_ref(&b), &ma, &mb, true));
                assert!(!safe(&b, std::slice::from_ref(&a), &mb, &ma, true));
            }
        }
    }
}
