//! Transactions of bitmap actions across images, all or nothing (QEMU's `transaction` command
//! with the block-dirty-bitmap-* actions).
//!
//! STUB: signatures are the contract; bodies are being written.

use super::{AddOptions, BitmapId, Image};
use crate::error::Result;

/// A group of bitmap actions. Each action is prepared (done) when it is added; `commit` makes
/// them final, `abort` undoes every prepared action in reverse order, exactly.
#[derive(Debug, Default)]
pub struct Transaction {
    _todo: (),
}

impl Transaction {
    /// An empty transaction.
    pub fn new() -> Self {
        Self::default()
    }
    /// block-dirty-bitmap-add. Abort releases the new bitmap.
    pub fn add(
        &mut self,
        img: &mut Image,
        name: &[u8],
        granularity: u64,
        opts: AddOptions,
    ) -> Result<BitmapId> {
        let _ = (img, name, granularity, opts);
        todo!()
    }
    /// block-dirty-bitmap-clear (with a backup). Abort restores the bits.
    pub fn clear(&mut self, img: &mut Image, name: &[u8]) -> Result<()> {
        let _ = (img, name);
        todo!()
    }
    /// block-dirty-bitmap-enable. Abort restores the previous state.
    pub fn enable(&mut self, img: &mut Image, name: &[u8]) -> Result<()> {
        let _ = (img, name);
        todo!()
    }
    /// block-dirty-bitmap-disable. Abort restores the previous state.
    pub fn disable(&mut self, img: &mut Image, name: &[u8]) -> Result<()> {
        let _ = (img, name);
        todo!()
    }
    /// block-dirty-bitmap-merge of `source` (in `src`, or in `img` when None) into `target`,
    /// with a backup. Abort restores the target.
    pub fn merge(
        &mut self,
        img: &mut Image,
        target: &[u8],
        src: Option<&Image>,
        source: &[u8],
    ) -> Result<()> {
        let _ = (img, target, src, source);
        todo!()
    }
    /// block-dirty-bitmap-remove: the stored copy is deleted at once (as in QEMU, not undone);
    /// the bitmap is held busy and skip_store until commit releases it; abort gives it back
    /// (still persistent, so it is stored again on close).
    pub fn remove(&mut self, img: &mut Image, name: &[u8]) -> Result<()> {
        let _ = (img, name);
        todo!()
    }
    /// Makes every action final. `images` must hold every image the actions touched.
    pub fn commit(self, images: &mut [&mut Image]) -> Result<()> {
        let _ = images;
        todo!()
    }
    /// Undoes every action in reverse order. `images` must hold every image the actions touched.
    pub fn abort(self, images: &mut [&mut Image]) -> Result<()> {
        let _ = images;
        todo!()
    }
}
