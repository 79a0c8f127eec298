//! The image's first cluster: reading the header and its extensions, and rewriting them.

use super::storage::Storage;
use crate::error::{Error, Result};
use crate::format::extension::{encode_header_cluster, Extensions};
use crate::format::header::Header;
use crate::format::{be, MAX_CLUSTER_BITS, MIN_CLUSTER_BITS, V3_HEADER_LENGTH};

/// Header, extensions and backing file name as held in memory.
#[derive(Clone, Debug)]
pub struct Meta {
    /// The header fields.
    pub header: Header,
    /// The extensions.
    pub exts: Extensions,
    /// The backing file name, if any.
    pub backing_name: Option<Vec<u8>>,
}

impl Meta {
    /// Reads and validates cluster 0: header, extensions, unknown incompatible features.
    pub fn read(storage: &dyn Storage) -> Result<Meta> {
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
        Ok(Meta {
            header,
            exts,
            backing_name,
        })
    }

    /// Rewrites the whole cluster 0 from memory, as QEMU's qcow2_update_header (no flush).
    pub fn write(&mut self, storage: &mut dyn Storage) -> Result<()> {
        let cluster =
            encode_header_cluster(&self.header, &self.exts, self.backing_name.as_deref())?;
        storage
            .write_all_at(&cluster, 0)
            .map_err(|e| Error::io("Failed to update the image header", e))?;
        self.header.header_length = V3_HEADER_LENGTH + self.header.unknown_fields.len() as u32;
        if let Some(name) = &self.backing_name {
            self.header.backing_file_size = name.len() as u32;
            self.header.backing_file_offset = be::get_u64(&cluster, 8);
        }
        Ok(())
    }
}
