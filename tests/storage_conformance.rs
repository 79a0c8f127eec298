//! Every public `Storage` implementation runs the test kit's conformance suite
//! (`qdirty_testkit::storage`, through tests/common's `Conformance`): the file backend (opened by path, with QEMU's locks, from an open
//! file, read-only), the in-memory one and the fault-injecting one with no fault armed. The
//! storage of a host's I/O callbacks (`qdirty_image_open_with_io`) is crate-private: it runs
//! the same suite in src/ffi/io.rs's unit tests, over a host that keeps its bytes in memory.

use std::path::{Path, PathBuf};

use qdirty::image::fault::FaultyStorage;
use qdirty::image::storage::{FileStorage, MemStorage};
mod common;

use common::storage::{check_read_only_storage, check_storage, Subject};
use common::{unique_number, Conformance, TempDir};

/// A new file in `dir` holding `bytes`.
fn file_with(dir: &TempDir, bytes: &[u8]) -> PathBuf {
    let p = dir.join(&format!("file{}", unique_number()));
    std::fs::write(&p, bytes).unwrap_or_else(|e| panic!("write {}: {e}", p.display()));
    p
}

/// What a new open of the file reads.
fn reread(p: &Path) -> impl Fn() -> Vec<u8> {
    let p = p.to_path_buf();
    move || std::fs::read(&p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()))
}

#[test]
fn file_storage_conforms() {
    let dir = TempDir::new("storage-file");
    check_storage("FileStorage::open", |bytes| {
        let p = file_with(&dir, bytes);
        Subject::with_durable(
            Conformance(FileStorage::open(&p, true).expect("open")),
            reread(&p),
        )
    });
}

#[test]
fn locked_file_storage_conforms() {
    let dir = TempDir::new("storage-locked");
    check_storage("FileStorage::open_locked", |bytes| {
        let p = file_with(&dir, bytes);
        let s = FileStorage::open_locked(&p, true, false).expect("open with locks");
        Subject::with_durable(Conformance(s), reread(&p))
    });
}

#[test]
fn file_storage_from_an_open_file_conforms() {
    let dir = TempDir::new("storage-from-file");
    check_storage("FileStorage::from_file", |bytes| {
        let p = file_with(&dir, bytes);
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&p)
            .expect("open");
        Subject::with_durable(Conformance(FileStorage::from_file(f)), reread(&p))
    });
}

#[test]
fn read_only_file_storage_conforms() {
    let dir = TempDir::new("storage-ro");
    check_read_only_storage("FileStorage::open read-only", |bytes| {
        let p = file_with(&dir, bytes);
        Subject::with_durable(
            Conformance(FileStorage::open(&p, false).expect("open")),
            reread(&p),
        )
    });
    check_read_only_storage("FileStorage::open_locked read-only", |bytes| {
        let p = file_with(&dir, bytes);
        let s = FileStorage::open_locked(&p, false, false).expect("open with locks");
        Subject::with_durable(Conformance(s), reread(&p))
    });
}

#[test]
fn mem_storage_conforms() {
    check_storage("MemStorage", |bytes| {
        Subject::new(Conformance(MemStorage {
            data: bytes.to_vec(),
        }))
    });
}

#[test]
fn faulty_storage_conforms() {
    check_storage("FaultyStorage", |bytes| {
        let (s, handle) = FaultyStorage::new(bytes.to_vec());
        Subject::with_durable(Conformance(s), move || handle.durable_image())
    });
}
