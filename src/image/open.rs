//! [`OpenOptions`]: how an image is opened (QEMU's open flags), the one way to open an image
//! file or an image held by any [`Storage`].

use std::path::Path;

use super::storage::{FileStorage, Storage};
use super::Image;
use crate::error::{Error, Result};

/// How many times a force-share open reads the bitmaps before it gives up on an image whose
/// bitmaps keep changing under it ([`OpenOptions::force_share`]).
pub const SHARED_OPEN_ATTEMPTS: u32 = 3;

/// Options for opening an image: read-only, with QEMU's image locks and strict checks, unless
/// set otherwise. [`Image::open`] is the shortcut for the plain cases.
///
/// ```no_run
/// use qdirty::OpenOptions;
///
/// // Look at an image a running QEMU uses (`qemu-img info -U`): read-only, no locks.
/// let mut image = OpenOptions::new().force_share(true).open("disk.qcow2")?;
/// for info in image.query()? {
///     let name = info.name.unwrap_or_default();
///     println!("{}: {} dirty bytes", String::from_utf8_lossy(&name), info.count);
/// }
/// # Ok::<(), qdirty::Error>(())
/// ```
#[derive(Clone, Debug, Default)]
pub struct OpenOptions {
    read_write: bool,
    force_share: bool,
    salvage: bool,
    durable: bool,
    zone_bytes: Option<u64>,
}

impl OpenOptions {
    /// Read-only, locked, strict: the defaults.
    pub fn new() -> Self {
        Self::default()
    }

    /// Opens for writing: loaded bitmaps are marked in_use on disk until they are stored
    /// (close). A v2 image opens read-only whatever is asked.
    pub fn read_write(&mut self, read_write: bool) -> &mut Self {
        self.read_write = read_write;
        self
    }

    /// QEMU's force-share (`qemu-img -U`): a read-only open that takes no image locks, to look
    /// at an image another process (QEMU) is using; refused with [`read_write`](Self::read_write).
    /// The open reads the data of every bitmap at once and checks that the directory and tables
    /// did not change meanwhile (read again up to [`SHARED_OPEN_ATTEMPTS`] times, then
    /// [`Error::InUse`] naming what kept changing): the bitmaps are the ones on disk at open,
    /// never a mix of versions. On a [`Storage`] of the caller's, the locks are the caller's
    /// business and only this way of reading applies.
    ///
    /// Without it, opening a file takes QEMU's locks and fails with [`Error::InUse`] while QEMU
    /// uses the image in a conflicting way.
    pub fn force_share(&mut self, force_share: bool) -> &mut Self {
        self.force_share = force_share;
        self
    }

    /// Salvage mode, for images QEMU refuses because of a broken bitmap directory entry or
    /// table: such an entry does not fail the open but becomes a broken bitmap
    /// ([`Image::broken_bitmaps`], removable only, and only read-write); the valid bitmaps load
    /// as usual. A directory broken as a whole still fails the open, with a message naming
    /// [`drop_bitmaps_extension`](super::drop_bitmaps_extension).
    pub fn salvage(&mut self, salvage: bool) -> &mut Self {
        self.salvage = salvage;
        self
    }

    /// Durable mode (docs/durable.md; read-write opens only): the stored bitmaps are never
    /// marked in_use and stay valid at every instant, so that after a crash QEMU and qdirty
    /// load them as consistent. The host calls [`Image::prepare_write`] before issuing each
    /// guest write and the write hook when it completes; management calls are durable when
    /// they return. Every bitmap's data is read at open.
    pub fn durable(&mut self, durable: bool) -> &mut Self {
        self.durable = durable;
        self
    }

    /// The zone size of durable mode: a power of two of at least 64 KiB, raised where the
    /// disk would have more than [`MAX_ZONES`](crate::bitmap::MAX_ZONES) zones. Default
    /// [`DEFAULT_ZONE_BYTES`](crate::bitmap::DEFAULT_ZONE_BYTES).
    pub fn zone_bytes(&mut self, bytes: u64) -> &mut Self {
        self.zone_bytes = Some(bytes);
        self
    }

    /// Opens the image file at `path`, taking QEMU's image locks unless
    /// [`force_share`](Self::force_share) is set.
    pub fn open(&self, path: impl AsRef<Path>) -> Result<Image> {
        self.check()?;
        let path = path.as_ref();
        let name = path.display().to_string();
        let storage = FileStorage::open_locked(path, self.read_write, self.force_share)?;
        self.open_storage(Box::new(storage), &name)
    }

    /// Opens an image held by any storage (a block device, a network export, memory). `name` is
    /// used in messages.
    pub fn open_storage(&self, storage: Box<dyn Storage>, name: &str) -> Result<Image> {
        self.check()?;
        Image::open_storage_opts(
            storage,
            name,
            self.read_write,
            self.salvage,
            self.force_share,
            self.durable
                .then(|| self.zone_bytes.unwrap_or(crate::bitmap::DEFAULT_ZONE_BYTES)),
        )
    }

    fn check(&self) -> Result<()> {
        if self.read_write && self.force_share {
            return Err(Error::InvalidArgument(
                "force-share is only possible for read-only opens".into(),
            ));
        }
        if self.durable && !self.read_write {
            return Err(Error::InvalidArgument(
                "durable mode is only possible for read-write opens".into(),
            ));
        }
        if let Some(z) = self.zone_bytes {
            if !z.is_power_of_two() || z < crate::bitmap::MIN_ZONE_BYTES {
                return Err(Error::InvalidArgument(format!(
                    "zone size {z} is not a power of two of at least {} bytes",
                    crate::bitmap::MIN_ZONE_BYTES
                )));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::storage::MemStorage;

    /// Force-share means "another process may write the image": a read-write open cannot
    /// allow that, on a file or on a storage of the caller's.
    #[test]
    fn force_share_is_refused_with_read_write() {
        let dir = std::env::temp_dir().join(format!("qdirty-open-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("a.qcow2");
        let _ = std::fs::remove_file(&path);
        Image::create(&path, 1 << 20, 0).unwrap();
        let data = std::fs::read(&path).unwrap();
        let both = || {
            let mut o = OpenOptions::new();
            o.read_write(true).force_share(true);
            o
        };
        for e in [
            both().open(&path).unwrap_err(),
            both()
                .open_storage(Box::new(MemStorage { data: data.clone() }), "m")
                .unwrap_err(),
        ] {
            assert!(matches!(e, Error::InvalidArgument(_)), "{e}");
        }
        // Each alone is fine.
        OpenOptions::new().force_share(true).open(&path).unwrap();
        let img = OpenOptions::new()
            .read_write(true)
            .open_storage(Box::new(MemStorage { data }), "m")
            .unwrap();
        assert!(!img.read_only());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
