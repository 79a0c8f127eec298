//! Listing an image without reading bitmap data: the header facts `qemu-img info` shows and the
//! bitmap directory as it is on disk (QEMU: qcow2_get_bitmap_info_list).
//!
//! Unlike [`Image::open`], nothing beyond cluster 0 and the directory is read, so listing is
//! O(directory) whatever the bitmaps' sizes, and works on images whose bitmaps are in use.

use std::path::Path;

use super::header_cluster::HeaderCluster;
use super::storage::{FileStorage, Storage};
use super::Image;
use crate::error::{Error, Result};
use crate::format::bitmap_dir::{parse_directory, BitmapDirEntry};
use crate::format::{
    AUTOCLEAR_BITMAPS, COMPAT_LAZY_REFCOUNTS, INCOMPAT_CORRUPT, INCOMPAT_DATA_FILE, INCOMPAT_DIRTY,
    INCOMPAT_EXTL2, QCOW2_MAX_BITMAP_DIRECTORY_SIZE,
};

/// One entry of the bitmap directory, as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredBitmapInfo {
    /// The name as QEMU uses it (up to the first NUL), as bytes.
    pub name: Vec<u8>,
    /// Granularity in bytes.
    pub granularity: u64,
    /// The in_use flag: the bitmap was not stored cleanly and is inconsistent.
    pub in_use: bool,
    /// The auto flag: the bitmap is enabled (records writes) when loaded.
    pub auto: bool,
    /// Offset of the bitmap table.
    pub table_offset: u64,
    /// Entries in the bitmap table.
    pub table_size: u32,
}

impl StoredBitmapInfo {
    pub(crate) fn from_entry(e: &BitmapDirEntry) -> Self {
        StoredBitmapInfo {
            name: e.qemu_name().to_vec(),
            granularity: 1u64 << e.granularity_bits,
            in_use: e.in_use(),
            auto: e.auto(),
            table_offset: e.table_offset,
            table_size: e.table_size,
        }
    }

    /// The name for display (lossy UTF-8).
    pub fn display_name(&self) -> String {
        String::from_utf8_lossy(&self.name).into_owned()
    }

    /// Whether the bitmap can be used (not in_use).
    pub fn consistent(&self) -> bool {
        !self.in_use
    }

    /// The flags as `qemu-img info` names them, in its order (`in-use`, then `auto`).
    pub fn flags(&self) -> Vec<&'static str> {
        let mut f = Vec::new();
        if self.in_use {
            f.push("in-use");
        }
        if self.auto {
            f.push("auto");
        }
        f
    }
}

/// What [`Image::inspect`] found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageInfo {
    /// qcow2 version (2 or 3).
    pub version: u32,
    /// Virtual disk size in bytes, as QEMU sees it (rounded down to 512).
    pub virtual_size: u64,
    /// Cluster size in bytes.
    pub cluster_size: u64,
    /// Length of the image file in bytes.
    pub file_length: u64,
    /// Refcount width in bits.
    pub refcount_bits: u64,
    /// The corrupt bit is set.
    pub corrupt: bool,
    /// The dirty bit (lazy refcounts in use) is set.
    pub dirty: bool,
    /// Lazy refcounts are enabled.
    pub lazy_refcounts: bool,
    /// Extended L2 entries (subclusters).
    pub extended_l2: bool,
    /// `zlib` or `zstd`.
    pub compression_type: &'static str,
    /// The backing file name, if any.
    pub backing_file: Option<String>,
    /// The external data file name, if any.
    pub data_file: Option<String>,
    /// Encrypted (AES or LUKS).
    pub encrypted: bool,
    /// Internal snapshots.
    pub nb_snapshots: u32,
    /// Bitmaps in directory order (the order `qemu-img info` lists them in).
    pub bitmaps: Vec<StoredBitmapInfo>,
    /// A bitmaps extension is present but autoclear bit 0 is clear: a program without bitmap
    /// support wrote the image, the bitmaps are gone, and their clusters are leaked.
    pub stale_bitmaps_extension: bool,
}

impl ImageInfo {
    /// The bitmap of that name.
    pub fn bitmap(&self, name: &[u8]) -> Option<&StoredBitmapInfo> {
        self.bitmaps.iter().find(|b| b.name == name)
    }
}

/// Reads the directory the extension points at, validated as QEMU's open does.
pub(crate) fn read_directory(
    storage: &dyn Storage,
    header_cluster: &HeaderCluster,
) -> Result<Option<Vec<BitmapDirEntry>>> {
    let h = &header_cluster.header;
    let Some(ext) = header_cluster.exts.bitmaps else {
        return Ok(None);
    };
    if h.version < 3 || h.autoclear_features & AUTOCLEAR_BITMAPS == 0 {
        return Ok(None);
    }
    let cs = h.cluster_size();
    ext.validate(cs)?;
    let size = ext.bitmap_directory_size;
    if size == 0 || size > QCOW2_MAX_BITMAP_DIRECTORY_SIZE {
        return Err(Error::InvalidImage(format!(
            "Requested bitmap directory size is invalid: {size}"
        )));
    }
    let mut buf = vec![0u8; size as usize];
    storage
        .read_exact_at(&mut buf, ext.bitmap_directory_offset)
        .map_err(|e| Error::io("Failed to read bitmap directory", e))?;
    parse_directory(&buf, ext.nb_bitmaps, cs, h.size & !511).map(Some)
}

/// Opens `path` read-only with QEMU's read locks (none with `force_share`) and reads cluster 0.
pub(crate) fn open_header_cluster(
    path: &Path,
    force_share: bool,
) -> Result<(FileStorage, HeaderCluster)> {
    let name = path.display().to_string();
    let ctx = || format!("Could not open '{name}'");
    let storage = FileStorage::open_locked(path, false, force_share)?;
    let header_cluster = HeaderCluster::read(&storage).map_err(|e| e.context(ctx()))?;
    Ok((storage, header_cluster))
}

impl ImageInfo {
    /// What `qemu-img measure` reports as "bitmaps" for this image: the space a full copy of
    /// its persistent bitmaps takes (data, tables, directory), computed from the directory.
    pub fn bitmaps_measure(&self) -> u64 {
        crate::format::bitmap_table::measure_bitmaps(
            self.virtual_size,
            self.cluster_size,
            self.bitmaps.iter().map(|b| (b.granularity, b.name.len())),
        )
    }
}

impl Image {
    /// Lists an image's header facts and bitmap directory without reading any bitmap data
    /// (QEMU: what `qemu-img info` reports, but O(directory)). Works on images whose bitmaps
    /// are in use; fails where QEMU's open fails (not qcow2, unknown features, a directory
    /// that breaks QEMU's constraints).
    ///
    /// Takes QEMU's read locks, so it fails with [`Error::InUse`] while QEMU writes the image,
    /// as `qemu-img info` does; see [`Image::inspect_with`] for force-share.
    pub fn inspect(path: impl AsRef<Path>) -> Result<ImageInfo> {
        Self::inspect_with(path, false)
    }

    /// [`Image::inspect`] with QEMU's force-share (`qemu-img info -U`): no locks, so an image
    /// that a running QEMU holds can be listed (its bitmaps then show `in-use`).
    pub fn inspect_with(path: impl AsRef<Path>, force_share: bool) -> Result<ImageInfo> {
        let path = path.as_ref();
        let name = path.display().to_string();
        let (storage, header_cluster) = open_header_cluster(path, force_share)?;
        let entries = read_directory(&storage, &header_cluster)
            .map_err(|e| e.context(format!("Could not open '{name}'")))?;
        let h = &header_cluster.header;
        let file_length = storage
            .size()
            .map_err(|e| Error::io("Could not get the image length", e))?;
        let lossy =
            |b: &Option<Vec<u8>>| b.as_ref().map(|b| String::from_utf8_lossy(b).into_owned());
        Ok(ImageInfo {
            version: h.version,
            virtual_size: h.size & !511,
            cluster_size: h.cluster_size(),
            file_length,
            refcount_bits: 1u64 << h.refcount_order,
            corrupt: h.incompatible_features & INCOMPAT_CORRUPT != 0,
            dirty: h.incompatible_features & INCOMPAT_DIRTY != 0,
            lazy_refcounts: h.compatible_features & COMPAT_LAZY_REFCOUNTS != 0,
            extended_l2: h.incompatible_features & INCOMPAT_EXTL2 != 0,
            compression_type: if h.compression_type == 1 {
                "zstd"
            } else {
                "zlib"
            },
            backing_file: lossy(&header_cluster.backing_name),
            data_file: if h.incompatible_features & INCOMPAT_DATA_FILE != 0 {
                lossy(&header_cluster.exts.data_file)
            } else {
                None
            },
            encrypted: h.crypt_method != 0,
            nb_snapshots: h.nb_snapshots,
            stale_bitmaps_extension: h.version >= 3
                && header_cluster.exts.bitmaps.is_some()
                && h.autoclear_features & AUTOCLEAR_BITMAPS == 0,
            bitmaps: entries
                .unwrap_or_default()
                .iter()
                .map(StoredBitmapInfo::from_entry)
                .collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::AddOptions;

    fn tmp(name: &str) -> std::path::PathBuf {
        let p = std::env::temp_dir().join(format!(
            "qdirty-inspect-{}-{name}.qcow2",
            std::process::id()
        ));
        let _ = std::fs::remove_file(&p);
        p
    }

    #[test]
    fn lists_without_loading_and_sees_in_use() {
        let p = tmp("list");
        Image::create(&p, 64 << 20, 0).unwrap();
        let info = Image::inspect(&p).unwrap();
        assert_eq!(info.version, 3);
        assert_eq!(info.virtual_size, 64 << 20);
        assert_eq!(info.cluster_size, 65536);
        assert!(info.bitmaps.is_empty());
        let mut img = Image::open(&p, true).unwrap();
        let opts = AddOptions {
            persistent: true,
            ..AddOptions::default()
        };
        img.add_bitmap(b"a", 4096, opts).unwrap();
        img.add_bitmap(
            b"b",
            0,
            AddOptions {
                disabled: true,
                ..opts
            },
        )
        .unwrap();
        img.set_dirty(0, 1 << 20);
        img.close().unwrap();
        let info = Image::inspect(&p).unwrap();
        let names: Vec<String> = info.bitmaps.iter().map(|b| b.display_name()).collect();
        assert_eq!(names.len(), 2);
        let a = info.bitmap(b"a").unwrap();
        assert_eq!((a.granularity, a.auto, a.in_use), (4096, true, false));
        assert_eq!(a.flags(), vec!["auto"]);
        let b = info.bitmap(b"b").unwrap();
        assert_eq!((b.granularity, b.auto, b.in_use), (65536, false, false));
        // While open read-write the stored bitmaps are in_use: inspect still lists them.
        let img = Image::open(&p, true).unwrap();
        assert!(
            matches!(Image::inspect(&p), Err(Error::InUse(_))),
            "locked like qemu-img info"
        );
        let info = Image::inspect_with(&p, true).unwrap();
        assert!(info.bitmaps.iter().all(|b| b.in_use && !b.consistent()));
        assert_eq!(info.bitmap(b"a").unwrap().flags(), vec!["in-use", "auto"]);
        img.close().unwrap();
        let _ = std::fs::remove_file(&p);
    }

    #[test]
    fn refuses_what_is_not_qcow2() {
        let p = tmp("notqcow2");
        std::fs::write(&p, vec![0u8; 4096]).unwrap();
        assert!(Image::inspect(&p).is_err());
        std::fs::remove_file(&p).unwrap();
        assert!(Image::inspect(&p).is_err());
    }
}
