//! Transactions of bitmap actions across images, all or nothing (QEMU's `transaction` command
//! with the block-dirty-bitmap-* actions, blockdev.c).
//!
//! As in QEMU, every action is *prepared* (carried out) when it is added and fails right away if
//! it cannot be done; the caller then either commits (the actions become final) or aborts
//! (every prepared action is undone, newest first, exactly: cleared and merged bitmaps get their
//! old bits back, enabled/disabled ones their old state, added ones disappear, removed ones come
//! back). Images are named by [`Image::uid`]; commit and abort need all of them.

use super::{AddOptions, BitmapId, Image};
use crate::bitmap::{Backup, CHECK_ALLOW_RO, CHECK_BUSY, CHECK_RO};
use crate::error::{Error, Result};

#[derive(Debug)]
enum Undo {
    /// Abort releases the new bitmap.
    Add,
    /// Abort restores the bits.
    Bits(Backup),
    /// Abort restores the enabled state.
    Enabled(bool),
    /// Commit releases the bitmap; abort gives it back (not busy, stored again on close).
    Remove,
}

#[derive(Debug)]
struct Action {
    image: u64,
    bitmap: BitmapId,
    undo: Undo,
}

/// A group of bitmap actions (see the module documentation).
#[derive(Debug, Default)]
pub struct Transaction {
    actions: Vec<Action>,
}

impl Transaction {
    /// An empty transaction.
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of prepared actions.
    pub fn len(&self) -> usize {
        self.actions.len()
    }

    /// Whether no action is prepared.
    pub fn is_empty(&self) -> bool {
        self.actions.is_empty()
    }

    /// The uids of the images the prepared actions touch.
    pub fn images(&self) -> Vec<u64> {
        let mut v: Vec<u64> = self.actions.iter().map(|a| a.image).collect();
        v.sort_unstable();
        v.dedup();
        v
    }

    fn push(&mut self, img: &mut Image, bitmap: BitmapId, undo: Undo) {
        // Durable mode stores nothing of the transaction before it ends (see
        // `Image::sync_durable`): a crash before the commit leaves the image as before it.
        img.txn_actions += 1;
        self.actions.push(Action {
            image: img.uid(),
            bitmap,
            undo,
        });
    }

    /// block-dirty-bitmap-add. Abort releases the new bitmap.
    pub fn add(
        &mut self,
        img: &mut Image,
        name: &[u8],
        granularity: u64,
        opts: AddOptions,
    ) -> Result<BitmapId> {
        let id = img.add_bitmap(name, granularity, opts)?;
        self.push(img, id, Undo::Add);
        Ok(id)
    }

    /// block-dirty-bitmap-clear (with a backup, DEFAULT checks). Abort restores the bits.
    pub fn clear(&mut self, img: &mut Image, name: &[u8]) -> Result<()> {
        let id = img.set.lookup(name)?;
        let backup = img.set.bitmap_mut(id)?.clear_with_backup()?;
        self.push(img, id, Undo::Bits(backup));
        Ok(())
    }

    fn set_enabled(&mut self, img: &mut Image, name: &[u8], enabled: bool) -> Result<()> {
        let id = img.set.lookup(name)?;
        let bm = img.set.bitmap_mut(id)?;
        bm.check(CHECK_ALLOW_RO)?;
        let was = bm.enabled();
        bm.set_enabled_unchecked(enabled);
        self.push(img, id, Undo::Enabled(was));
        Ok(())
    }

    /// block-dirty-bitmap-enable (ALLOW_RO checks). Abort restores the previous state.
    pub fn enable(&mut self, img: &mut Image, name: &[u8]) -> Result<()> {
        self.set_enabled(img, name, true)
    }

    /// block-dirty-bitmap-disable (ALLOW_RO checks). Abort restores the previous state.
    pub fn disable(&mut self, img: &mut Image, name: &[u8]) -> Result<()> {
        self.set_enabled(img, name, false)
    }

    /// block-dirty-bitmap-merge of `source` (in `src`, or in `img` when None) into `target`,
    /// with a backup, with every write the hook of either image logged so far. Abort restores
    /// the target.
    pub fn merge(
        &mut self,
        img: &mut Image,
        target: &[u8],
        src: Option<&mut Image>,
        source: &[u8],
    ) -> Result<()> {
        let t = img.set.lookup(target)?;
        let backup = match src {
            Some(other) => {
                let s = other.set.lookup(source)?;
                let s = other.set.current(s)?;
                img.set.merge(t, s, true)?
            }
            None => {
                let s = img.set.current(img.set.lookup(source)?)?.clone();
                img.set.merge(t, &s, true)?
            }
        };
        let backup = backup.expect("merge with backup returns one");
        self.push(img, t, Undo::Bits(backup));
        Ok(())
    }

    /// block-dirty-bitmap-remove (BUSY and RO checks, and what would stop commit from
    /// releasing it: live iterators, a successor). Every refusal comes before the stored copy
    /// is deleted from the image; that deletion is not undone (as in QEMU); the bitmap stays in
    /// memory, busy and not to be stored, until commit releases it. Abort gives it back, still
    /// persistent, so the next store writes it again.
    pub fn remove(&mut self, img: &mut Image, name: &[u8]) -> Result<()> {
        let id = img.set.lookup(name)?;
        let bm = img.set.bitmap(id)?;
        bm.check(CHECK_BUSY | CHECK_RO)?;
        img.set.check_release(id)?;
        let bm = img.set.bitmap(id)?;
        if bm.will_be_stored() {
            img.remove_stored_bitmap(name)?;
        }
        let bm = img.set.bitmap_mut(id)?;
        bm.set_skip_store(true);
        bm.set_busy(true);
        self.push(img, id, Undo::Remove);
        Ok(())
    }

    fn check_images(&self, images: &[&mut Image]) -> Result<()> {
        for uid in self.images() {
            if !images.iter().any(|i| i.uid() == uid) {
                return Err(Error::Precondition(format!(
                    "Image #{uid} of the transaction was not given"
                )));
            }
        }
        Ok(())
    }

    /// Makes every action final. `images` must hold every image the actions touched; otherwise
    /// nothing happens (the actions stay prepared).
    pub fn commit(&mut self, images: &mut [&mut Image]) -> Result<()> {
        self.check_images(images)?;
        for a in std::mem::take(&mut self.actions) {
            let img = images
                .iter_mut()
                .find(|i| i.uid() == a.image)
                .expect("checked");
            img.txn_actions -= 1;
            if let Undo::Remove = a.undo {
                img.set.remove_unchecked(a.bitmap);
            }
        }
        sync_all(images)
    }

    /// Undoes every action, newest first. `images` must hold every image the actions touched;
    /// otherwise nothing happens (the actions stay prepared).
    pub fn abort(&mut self, images: &mut [&mut Image]) -> Result<()> {
        self.check_images(images)?;
        for a in std::mem::take(&mut self.actions).into_iter().rev() {
            let img = images
                .iter_mut()
                .find(|i| i.uid() == a.image)
                .expect("checked");
            img.txn_actions -= 1;
            match a.undo {
                Undo::Add => {
                    img.set.remove_unchecked(a.bitmap);
                }
                Undo::Bits(backup) => {
                    if let Some(bm) = img.set.get_mut(a.bitmap) {
                        bm.restore_unchecked(backup);
                    }
                }
                Undo::Enabled(was) => {
                    if let Some(bm) = img.set.get_mut(a.bitmap) {
                        bm.set_enabled_unchecked(was);
                    }
                }
                Undo::Remove => {
                    if let Some(bm) = img.set.get_mut(a.bitmap) {
                        bm.set_skip_store(false);
                        bm.set_busy(false);
                    }
                }
            }
        }
        sync_all(images)
    }
}

/// Durable mode: stores what the transaction changed in each image (the first error is
/// returned after every image was tried).
fn sync_all(images: &mut [&mut Image]) -> Result<()> {
    let mut first = Ok(());
    for img in images.iter_mut() {
        if let Err(e) = img.sync_durable() {
            if first.is_ok() {
                first = Err(e);
            }
        }
    }
    first
}

impl Drop for Transaction {
    fn drop(&mut self) {
        if !self.actions.is_empty() {
            crate::warning::warn(&format!(
                "A transaction with {} prepared action(s) was dropped without commit or abort; \
                 the actions stay done",
                self.actions.len()
            ));
        }
    }
}
