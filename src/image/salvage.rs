//! Salvage: images whose bitmap directory entries or tables break QEMU's checks (docs/format.md,
//! 'Checks when loading'), which QEMU refuses to open at all.
//!
//! * [`OpenOptions::salvage`](super::OpenOptions::salvage): an entry that fails QEMU's per-entry checks (extra data, the
//!   constraints, a duplicate name) or whose table fails validation or cannot be read does not
//!   fail the open. It is kept as a *broken bitmap*: listed by [`Image::broken_bitmaps`] with the
//!   reason QEMU refuses the image for, never loaded, and the only operation on it is removal
//!   ([`Image::remove_broken_bitmap`], [`Image::remove_broken_bitmaps`], or
//!   [`Image::remove_bitmap`] by name). The valid bitmaps load and work normally.
//! * Removing a broken bitmap rewrites the directory without it (new directory, header commit,
//!   old directory freed, as any removal) and frees nothing its entry or table names: those
//!   clusters are leaked (`qemu-img check -r leaks` reclaims them). Freeing clusters named by
//!   garbage could free guest data or other metadata.
//! * While a broken entry remains, a store writes it back as it is, so QEMU keeps refusing the
//!   image until every broken bitmap is removed.
//! * When the directory as a whole cannot be parsed (extension fields, a directory beyond the
//!   end of the file, a broken walk, a count mismatch) nothing can be salvaged entry by entry:
//!   the salvage open fails with [`DROP_HINT`], and [`drop_bitmaps_extension`] is the explicit
//!   alternative: QEMU's own rule for programs without bitmap support (docs/format.md, 'The
//!   autoclear bit'), autoclear bit 0
//!   cleared and the extension removed in one header write. Every bitmap is lost; the
//!   directory, tables and data clusters are leaked.
//!
//! Guest data and other metadata are never touched.

use std::path::Path;

use super::header_cluster::HeaderCluster;
use super::storage::{FileStorage, Storage};
use super::{Image, Qcow2File};
use crate::error::{Error, Result};
use crate::format::AUTOCLEAR_BITMAPS;

/// Appended to a salvage open's error when the directory as a whole is broken.
pub const DROP_HINT: &str = "the bitmap directory as a whole is broken, so its bitmaps cannot be \
     salvaged one by one; the only way to make the image usable by QEMU again is to drop every \
     bitmap (guest data is kept): 'qdirty check --drop-bitmaps IMG' \
     (qdirty_image_drop_bitmaps_extension, qdirty::image::drop_bitmaps_extension)";

/// A bitmap directory entry that QEMU would refuse the image for (salvage mode).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BrokenBitmap {
    /// Its position in the directory now (0-based; changes when entries before it are
    /// removed).
    pub index: usize,
    /// Its name as QEMU reads it (up to the first NUL; may be empty or not UTF-8).
    pub name: Vec<u8>,
    /// Why QEMU refuses it: the message QEMU's checks give, as a normal open reports it.
    pub reason: String,
}

impl BrokenBitmap {
    /// The name for messages: the name when it is printable UTF-8, else "entry N".
    pub fn display_name(&self) -> String {
        match std::str::from_utf8(&self.name) {
            Ok(s) if !s.is_empty() && !s.chars().any(char::is_control) => s.to_string(),
            _ => format!("entry {}", self.index),
        }
    }
}

/// What [`drop_bitmaps_extension`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DroppedExtension {
    /// Whether there was a bitmaps extension (or autoclear bit 0) to drop; false: nothing was
    /// written.
    pub dropped: bool,
    /// nb_bitmaps of the dropped extension (as recorded, possibly garbage).
    pub nb_bitmaps: u32,
}

/// Drops the whole bitmaps extension of the image at `path`: one header write that removes the
/// extension and clears autoclear bit 0 (QEMU's rule for programs without bitmap support), then
/// fdatasync. Every persistent bitmap is lost; the directory, tables and data clusters become
/// leaks (`qemu-img check -r leaks` reclaims them). Meant for images whose bitmap directory is
/// too broken to salvage entry by entry; it works on any qcow2 v3 image, also one flagged dirty
/// or corrupt (only cluster 0 is written, and those images cannot be repaired by QEMU while
/// their bitmap directory makes it refuse them). Explicit: never done automatically.
///
/// Takes QEMU's image locks like a read-write open (fails with [`Error::InUse`] while QEMU uses
/// the image). Nothing else is read or written: guest data and other metadata are untouched.
pub fn drop_bitmaps_extension(path: impl AsRef<Path>) -> Result<DroppedExtension> {
    let path = path.as_ref();
    let ctx = || format!("Could not drop the bitmaps of '{}'", path.display());
    let mut storage = FileStorage::open_locked(path, true, false).map_err(|e| e.context(ctx()))?;
    drop_in(&mut storage).map_err(|e| e.context(ctx()))
}

fn drop_in(storage: &mut dyn Storage) -> Result<DroppedExtension> {
    let mut header_cluster = HeaderCluster::read(storage)?;
    if header_cluster.header.version < 3 {
        return Err(Error::Unsupported(
            "qcow2 v2 images have no bitmaps that QEMU would use (their bitmaps extension is \
             always ignored)"
                .into(),
        ));
    }
    let bit = header_cluster.header.autoclear_features & AUTOCLEAR_BITMAPS != 0;
    let ext = header_cluster.exts.bitmaps.take();
    if ext.is_none() && !bit {
        return Ok(DroppedExtension::default());
    }
    header_cluster.header.autoclear_features &= !AUTOCLEAR_BITMAPS;
    header_cluster.write(storage)?;
    super::alloc::flush(storage)?;
    Ok(DroppedExtension {
        dropped: true,
        nb_bitmaps: ext.map_or(0, |e| e.nb_bitmaps),
    })
}

impl Qcow2File {
    /// Whether directory entry `i` is broken (salvage).
    pub(super) fn is_broken(&self, i: usize) -> bool {
        self.broken.binary_search_by_key(&i, |b| b.0).is_ok()
    }

    /// Updates the broken positions after the entries at `removed` (positions before the
    /// removal) left the directory.
    pub(super) fn forget_entries(&mut self, removed: &[usize]) {
        self.broken.retain(|b| !removed.contains(&b.0));
        for b in &mut self.broken {
            b.0 -= removed.iter().filter(|&&r| r < b.0).count();
        }
    }

    /// Rewrites the directory without the broken entries at `positions`; frees only the old
    /// directory, never what the removed entries name (leaked).
    fn remove_broken(&mut self, positions: &[usize]) -> Result<()> {
        if positions.is_empty() {
            return Ok(());
        }
        if let Some(why) = &self.failed {
            return Err(Error::ReadOnlyImage(format!(
                "Image '{}' cannot be written: {why}",
                self.name
            )));
        }
        if self.read_only {
            return Err(Error::ReadOnlyImage(format!(
                "Image '{}' is read-only: open it read-write to remove broken bitmaps",
                self.name
            )));
        }
        let entries: Vec<_> = self
            .dir
            .entries()
            .iter()
            .enumerate()
            .filter(|(i, _)| !positions.contains(i))
            .map(|(_, e)| e.clone())
            .collect();
        self.begin_update();
        self.check_directory_owned("free")?;
        let mut allocated = Vec::new();
        let old_dir = match self.commit_directory(entries, &mut allocated) {
            Ok(old) => old,
            Err(e) => {
                self.free_quietly(&allocated);
                return Err(e);
            }
        };
        self.forget_entries(positions);
        self.free_after_commit(&old_dir);
        Ok(())
    }
}

impl Image {
    /// Whether the image was opened in salvage mode.
    pub fn salvage(&self) -> bool {
        self.file.as_ref().is_some_and(|d| d.salvage)
    }

    /// The broken bitmaps, in directory order (always empty unless opened in salvage mode).
    pub fn broken_bitmaps(&self) -> Vec<BrokenBitmap> {
        let Some(d) = self.file.as_ref() else {
            return Vec::new();
        };
        d.broken
            .iter()
            .map(|(i, reason)| BrokenBitmap {
                index: *i,
                name: d.dir.entries()[*i].qemu_name().to_vec(),
                reason: reason.clone(),
            })
            .collect()
    }

    /// The directory index of the first broken bitmap named `name`.
    pub(super) fn broken_index_by_name(&self, name: &[u8]) -> Option<usize> {
        let d = self.file.as_ref()?;
        d.broken
            .iter()
            .map(|b| b.0)
            .find(|&i| d.dir.entries()[i].qemu_name() == name)
    }

    /// Removes the broken bitmap at directory position `index` (as listed by
    /// [`Image::broken_bitmaps`]); the positions of later entries go down by one. Its clusters
    /// are leaked. Needs a read-write salvage open.
    pub fn remove_broken_bitmap(&mut self, index: usize) -> Result<()> {
        let Some(d) = self.file.as_mut() else {
            return Err(Error::InvalidArgument(format!(
                "No broken bitmap at index {index}: standalone bitmaps"
            )));
        };
        if !d.is_broken(index) {
            return Err(Error::InvalidArgument(format!(
                "Directory entry {index} of '{}' is not a broken bitmap",
                d.name
            )));
        }
        d.remove_broken(&[index])
    }

    /// Removes every broken bitmap with one directory rewrite; returns what was removed (with
    /// the positions they had). Their clusters are leaked. Needs a read-write salvage open.
    /// Afterwards QEMU opens the image again.
    pub fn remove_broken_bitmaps(&mut self) -> Result<Vec<BrokenBitmap>> {
        let list = self.broken_bitmaps();
        if let Some(d) = self.file.as_mut() {
            let positions: Vec<usize> = list.iter().map(|b| b.index).collect();
            d.remove_broken(&positions)?;
        }
        Ok(list)
    }
}
