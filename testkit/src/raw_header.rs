//! Raw file and header access, independent of qdirty's codecs: to flip bits and inspect
//! extensions the way the tests need.

use std::path::Path;

pub fn read_file(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()))
}

pub fn be_u32(b: &[u8], off: usize) -> u32 {
    u32::from_be_bytes(b[off..off + 4].try_into().expect("4 bytes"))
}

pub fn be_u64(b: &[u8], off: usize) -> u64 {
    u64::from_be_bytes(b[off..off + 8].try_into().expect("8 bytes"))
}

/// Reads `len` bytes at `off` of a file.
pub fn read_at(p: &Path, off: u64, len: usize) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(p).unwrap_or_else(|e| panic!("open {}: {e}", p.display()));
    let mut buf = vec![0u8; len];
    f.read_exact_at(&mut buf, off)
        .unwrap_or_else(|e| panic!("read {}: {e}", p.display()));
    buf
}

/// Writes bytes at `off` of a file (no truncation).
pub fn write_at(p: &Path, off: u64, data: &[u8]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(p)
        .unwrap_or_else(|e| panic!("open {}: {e}", p.display()));
    f.write_all_at(data, off)
        .unwrap_or_else(|e| panic!("write {}: {e}", p.display()));
    f.sync_all().expect("sync");
}

/// The autoclear feature field (u64 BE at offset 88).
pub fn autoclear(p: &Path) -> u64 {
    be_u64(&read_at(p, 88, 8), 0)
}

/// Overwrites the autoclear feature field.
pub fn set_autoclear(p: &Path, v: u64) {
    write_at(p, 88, &v.to_be_bytes());
}

/// Magic of the bitmaps extension.
pub const EXT_BITMAPS: u32 = 0x2385_2875;
/// Magic of the end of the extension area.
pub const EXT_END: u32 = 0;

/// The header and extensions of cluster 0, parsed independently of qdirty.
#[derive(Clone, Debug)]
pub struct RawHeader {
    pub version: u32,
    pub cluster_bits: u32,
    pub backing_file_offset: u64,
    pub refcount_table_offset: u64,
    pub refcount_table_clusters: u32,
    pub autoclear: u64,
    pub header_length: u32,
    /// (magic, data) in file order, end marker excluded.
    pub extensions: Vec<(u32, Vec<u8>)>,
    /// Raw cluster 0 bytes.
    pub cluster0: Vec<u8>,
}

impl RawHeader {
    pub fn ext(&self, magic: u32) -> Option<&[u8]> {
        self.extensions
            .iter()
            .find(|e| e.0 == magic)
            .map(|e| &e.1[..])
    }
}

/// Parses cluster 0 of a qcow2 file.
pub fn raw_header(p: &Path) -> RawHeader {
    let head = read_at(p, 0, 104);
    assert_eq!(
        be_u32(&head, 0),
        0x5146_49FB,
        "not a qcow2 file: {}",
        p.display()
    );
    let version = be_u32(&head, 4);
    let cluster_bits = be_u32(&head, 20);
    let cs = 1usize << cluster_bits;
    let len = std::fs::metadata(p).expect("stat").len() as usize;
    let c0 = read_at(p, 0, cs.min(len));
    let (autoclear, header_length) = if version >= 3 {
        (be_u64(&c0, 88), be_u32(&c0, 100))
    } else {
        (0, 72)
    };
    let backing_file_offset = be_u64(&c0, 8);
    let end = if backing_file_offset != 0 {
        backing_file_offset as usize
    } else {
        c0.len()
    };
    let mut extensions = Vec::new();
    let mut off = header_length as usize;
    while off + 8 <= end {
        let magic = be_u32(&c0, off);
        let l = be_u32(&c0, off + 4) as usize;
        if magic == EXT_END {
            break;
        }
        assert!(
            off + 8 + l <= end,
            "extension {magic:#x} overflows cluster 0"
        );
        extensions.push((magic, c0[off + 8..off + 8 + l].to_vec()));
        off += 8 + l.next_multiple_of(8);
    }
    RawHeader {
        version,
        cluster_bits,
        backing_file_offset,
        refcount_table_offset: be_u64(&c0, 48),
        refcount_table_clusters: be_u32(&c0, 56),
        autoclear,
        header_length,
        extensions,
        cluster0: c0,
    }
}

/// Rewrites cluster 0 of a v3 image without a backing file: `unknown_fields` are appended after
/// the 112-byte header (header_length grows accordingly) and `extensions` replace the extension
/// area (end marker added).
pub fn rewrite_header(p: &Path, unknown_fields: &[u8], extensions: &[(u32, Vec<u8>)]) {
    let h = raw_header(p);
    assert_eq!(h.version, 3);
    assert_eq!(
        h.backing_file_offset, 0,
        "rewrite_header does not handle backing files"
    );
    let mut c0 = h.cluster0[..112].to_vec();
    c0.extend_from_slice(unknown_fields);
    let hl = c0.len() as u32;
    c0[100..104].copy_from_slice(&hl.to_be_bytes());
    for (magic, data) in extensions {
        c0.extend_from_slice(&magic.to_be_bytes());
        c0.extend_from_slice(&(data.len() as u32).to_be_bytes());
        c0.extend_from_slice(data);
        c0.resize(c0.len().next_multiple_of(8), 0);
    }
    c0.extend_from_slice(&[0u8; 8]);
    assert!(
        c0.len() <= h.cluster0.len(),
        "header does not fit in cluster 0"
    );
    c0.resize(h.cluster0.len(), 0);
    write_at(p, 0, &c0);
}

/// Copies a file.
pub fn copy(a: &Path, b: &Path) {
    std::fs::copy(a, b).unwrap_or_else(|e| panic!("copy {} -> {}: {e}", a.display(), b.display()));
}
