//! The conformance suite of qdirty's `Storage` implementations: one generic function,
//! [`check_storage`], that every implementation runs, so that they all keep the same contract
//! (the one `qdirty::image::storage::Storage` documents, and a local file gives):
//!
//! - `size` is the length of the file; a read sees every write that returned;
//! - a read transfers exactly the bytes asked for: one that would end past the end of the file
//!   (a short read) fails with `UnexpectedEof` and changes nothing;
//! - a write grows the file when it ends past the end; a gap it leaves reads as zeros;
//! - a vectored write is the writes of its buffers one after the other;
//! - a write whose end does not fit in 64 bits fails and changes nothing;
//! - operations of zero bytes succeed and change nothing, wherever they are;
//! - `flush` succeeds, and then what a new open of the file (or a crash) keeps is what reads see.
//!
//! [`check_read_only_storage`] checks a storage that refuses writes: every write fails and
//! leaves the file as it was.
//!
//! The suite reaches a storage through [`StorageUnderTest`], the operations of `Storage`: this
//! crate does not depend on qdirty, so a one-line-per-method adapter makes any `Storage` one,
//! in the integration tests (tests/common's `Conformance`) and in qdirty's own unit tests alike.

use std::io;

use crate::prng::Prng;

/// The operations of qdirty's `Storage` that the suite checks (each one the method of the same
/// name).
pub trait StorageUnderTest {
    /// `Storage::read_exact_at`.
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// `Storage::write_all_at`.
    fn write_all_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// `Storage::write_all_vectored_at`.
    fn write_all_vectored_at(&mut self, bufs: &[&[u8]], offset: u64) -> io::Result<()>;
    /// `Storage::size`.
    fn size(&self) -> io::Result<u64>;
    /// `Storage::flush`.
    fn flush(&mut self) -> io::Result<()>;
}

/// A storage to check, as [`check_storage`]'s `fresh` makes it.
pub struct Subject<S> {
    /// The storage, holding exactly the bytes it was made with.
    pub storage: S,
    /// What survives the storage: the bytes a new open of the same file reads, or what a crash
    /// keeps (flushed writes). None when nothing outlives the storage object.
    pub durable: Option<Box<dyn Fn() -> Vec<u8>>>,
}

impl<S> Subject<S> {
    /// A storage with nothing outliving it.
    pub fn new(storage: S) -> Subject<S> {
        Subject {
            storage,
            durable: None,
        }
    }

    /// A storage whose persisted bytes `durable` returns.
    pub fn with_durable(storage: S, durable: impl Fn() -> Vec<u8> + 'static) -> Subject<S> {
        Subject {
            storage,
            durable: Some(Box::new(durable)),
        }
    }
}

/// The initial contents the suite starts from: empty, one byte, and a few pages and a bit.
fn initial_contents() -> Vec<Vec<u8>> {
    let mut rng = Prng::new(0x0570_7a6e);
    [0usize, 1, 3 * 4096 + 7]
        .iter()
        .map(|&n| (0..n).map(|_| rng.next_u64() as u8).collect())
        .collect()
}

/// The file as `s` reads it (whole), after checking that `size` answers its length.
fn contents<S: StorageUnderTest>(s: &S, ctx: &str) -> Vec<u8> {
    let size = s
        .size()
        .unwrap_or_else(|e| panic!("{ctx}: size failed: {e}"));
    let mut buf = vec![0u8; usize::try_from(size).expect("a test file fits in memory")];
    s.read_exact_at(&mut buf, 0)
        .unwrap_or_else(|e| panic!("{ctx}: reading the whole file ({size} bytes) failed: {e}"));
    buf
}

/// Asserts that `s` holds exactly `model` (size and bytes).
fn assert_holds<S: StorageUnderTest>(s: &S, model: &[u8], ctx: &str) {
    let got = contents(s, ctx);
    assert_eq!(got.len(), model.len(), "{ctx}: size");
    if let Some(i) = got.iter().zip(model).position(|(a, b)| a != b) {
        panic!(
            "{ctx}: byte {i} is {:#04x}, the writes made it {:#04x}",
            got[i], model[i]
        );
    }
}

/// Writes `data` at `offset` into the model, growing it with zeros.
fn model_write(model: &mut Vec<u8>, offset: u64, data: &[u8]) {
    let start = offset as usize;
    let end = start + data.len();
    if end > model.len() {
        model.resize(end, 0);
    }
    model[start..end].copy_from_slice(data);
}

/// Reads `len` bytes at `offset` and checks them against the model.
fn assert_read<S: StorageUnderTest>(s: &S, model: &[u8], offset: u64, len: usize, ctx: &str) {
    let mut buf = vec![0xa5u8; len];
    s.read_exact_at(&mut buf, offset)
        .unwrap_or_else(|e| panic!("{ctx}: read of {len} bytes at {offset} failed: {e}"));
    let start = offset as usize;
    assert!(
        buf == model[start..start + len],
        "{ctx}: read of {len} bytes at {offset} differs from what was written"
    );
}

/// Checks that a read of `len` bytes at `offset`, which would end past the end of the file,
/// fails (with `UnexpectedEof` when `eof` is set) and changes nothing.
fn assert_short_read<S: StorageUnderTest>(
    s: &S,
    model: &[u8],
    offset: u64,
    len: usize,
    eof: bool,
    ctx: &str,
) {
    let mut buf = vec![0u8; len];
    match s.read_exact_at(&mut buf, offset) {
        Ok(()) => panic!(
            "{ctx}: a read of {len} bytes at {offset} of a {}-byte file succeeded",
            model.len()
        ),
        Err(e) if eof => assert_eq!(
            e.kind(),
            io::ErrorKind::UnexpectedEof,
            "{ctx}: a read of {len} bytes at {offset} of a {}-byte file: {e}",
            model.len()
        ),
        Err(_) => {}
    }
    assert_holds(s, model, &format!("{ctx}, after a read past the end"));
}

/// The conformance suite (see the module documentation). `what` names the implementation in
/// messages; `fresh(bytes)` makes a new storage holding exactly `bytes`, read-write.
pub fn check_storage<S: StorageUnderTest>(what: &str, mut fresh: impl FnMut(&[u8]) -> Subject<S>) {
    let mut rng = Prng::new(0xc0f0_4a11);
    for init in initial_contents() {
        let ctx = format!("{what} ({} bytes)", init.len());
        let ctx = ctx.as_str();
        let Subject {
            storage: mut s,
            durable,
        } = fresh(&init);
        let mut model = init.clone();
        assert_eq!(s.size().expect("size"), init.len() as u64, "{ctx}: size");
        assert_holds(&s, &model, ctx);
        let len = model.len() as u64;

        // Reads inside the file, of every length.
        if len > 0 {
            assert_read(&s, &model, 0, 1, ctx);
            assert_read(&s, &model, len - 1, 1, ctx);
            assert_read(&s, &model, len / 2, (len - len / 2) as usize, ctx);
            for _ in 0..20 {
                let off = rng.below(len);
                let n = 1 + rng.below(len - off);
                assert_read(&s, &model, off, n as usize, ctx);
            }
        }

        // Zero bytes: anywhere, nothing happens and nothing fails.
        for off in [0, len, len + 1, len + (1 << 20), u64::MAX] {
            s.read_exact_at(&mut [], off)
                .unwrap_or_else(|e| panic!("{ctx}: a read of 0 bytes at {off} failed: {e}"));
            s.write_all_at(&[], off)
                .unwrap_or_else(|e| panic!("{ctx}: a write of 0 bytes at {off} failed: {e}"));
            s.write_all_vectored_at(&[], off).unwrap_or_else(|e| {
                panic!("{ctx}: a vectored write of no buffers at {off} failed: {e}")
            });
            s.write_all_vectored_at(&[&[], &[]], off)
                .unwrap_or_else(|e| {
                    panic!("{ctx}: a vectored write of empty buffers at {off} failed: {e}")
                });
            assert_holds(
                &s,
                &model,
                &format!("{ctx}, after operations of 0 bytes at {off}"),
            );
        }

        // Short reads and reads past the end fail: no partial success.
        assert_short_read(&s, &model, len, 1, true, ctx);
        assert_short_read(&s, &model, len + 4096, 512, true, ctx);
        if len > 0 {
            assert_short_read(&s, &model, len - 1, 2, true, ctx);
            assert_short_read(&s, &model, 0, model.len() + 1, true, ctx);
        }
        assert_short_read(&s, &model, u64::MAX, 1, false, ctx);
        assert_short_read(&s, &model, u64::MAX - 3, 8, false, ctx);

        // Writes: inside, across the end, past the end (the gap reads as zeros).
        let mut bytes = |n: usize| -> Vec<u8> { (0..n).map(|_| rng.next_u64() as u8).collect() };
        if len > 2 {
            let data = bytes((len / 2) as usize);
            s.write_all_at(&data, 1).expect("write inside");
            model_write(&mut model, 1, &data);
            assert_holds(&s, &model, &format!("{ctx}, after a write inside"));
        }
        let at = len.saturating_sub(3);
        let data = bytes(10);
        s.write_all_at(&data, at).expect("write across the end");
        model_write(&mut model, at, &data);
        assert_holds(&s, &model, &format!("{ctx}, after a write across the end"));
        let at = model.len() as u64 + 4096 + 3;
        let data = bytes(700);
        s.write_all_at(&data, at).expect("write past the end");
        model_write(&mut model, at, &data);
        assert_holds(&s, &model, &format!("{ctx}, after a write past the end"));
        let end = model.len() as u64;
        assert_short_read(&s, &model, end - 1, 2, true, ctx);

        // Vectored writes: the buffers one after the other, empty ones included.
        let (a, b, c) = (bytes(3), bytes(5000), bytes(1));
        let at = end - 2;
        s.write_all_vectored_at(&[&a, &[], &b, &[], &c], at)
            .expect("vectored write across the end");
        model_write(&mut model, at, &[&a[..], &b[..], &c[..]].concat());
        assert_holds(&s, &model, &format!("{ctx}, after a vectored write"));
        let at = model.len() as u64 + 100;
        s.write_all_vectored_at(&[&c, &a], at)
            .expect("vectored write past the end");
        model_write(&mut model, at, &[&c[..], &a[..]].concat());
        assert_holds(
            &s,
            &model,
            &format!("{ctx}, after a vectored write past the end"),
        );

        // A write whose end does not fit in 64 bits fails and changes nothing.
        for (at, n) in [(u64::MAX, 1usize), (u64::MAX - 2, 8)] {
            let data = bytes(n);
            assert!(
                s.write_all_at(&data, at).is_err(),
                "{ctx}: a write of {n} bytes at {at} succeeded"
            );
            assert!(
                s.write_all_vectored_at(&[&data, &data], at).is_err(),
                "{ctx}: a vectored write of {n} + {n} bytes at {at} succeeded"
            );
            assert_holds(&s, &model, &format!("{ctx}, after a write at {at}"));
        }
        // A vectored write whose first buffer would fit but whose whole does not: refused
        // whole, the first buffer not written either.
        let (first, second) = (bytes(2), bytes(8));
        assert!(
            s.write_all_vectored_at(&[&first, &second], u64::MAX - 3)
                .is_err(),
            "{ctx}: a vectored write of 2 + 8 bytes at 2^64 - 4 succeeded"
        );
        assert_holds(
            &s,
            &model,
            &format!("{ctx}, after a vectored write at 2^64 - 4"),
        );

        // Flush: what survives the storage is what reads see.
        s.flush()
            .unwrap_or_else(|e| panic!("{ctx}: flush failed: {e}"));
        assert_holds(&s, &model, &format!("{ctx}, after flush"));
        if let Some(durable) = &durable {
            let kept = durable();
            assert_eq!(kept.len(), model.len(), "{ctx}: size kept after flush");
            assert!(kept == model, "{ctx}: the bytes kept after flush differ");
        }
        drop(s);
        if let Some(durable) = &durable {
            assert!(
                durable() == model,
                "{ctx}: the bytes kept after the storage went"
            );
        }
    }
    // A flush of a storage nothing was written to.
    let Subject { storage: mut s, .. } = fresh(b"qdirty");
    s.flush()
        .unwrap_or_else(|e| panic!("{what}: flush without writes failed: {e}"));
    assert_holds(
        &s,
        b"qdirty",
        &format!("{what}, after a flush without writes"),
    );
}

/// The suite of a storage that refuses writes: reads as [`check_storage`]'s, and every write
/// of at least one byte fails and leaves the file as it was. `fresh(bytes)` makes a read-only
/// storage holding exactly `bytes`.
pub fn check_read_only_storage<S: StorageUnderTest>(
    what: &str,
    mut fresh: impl FnMut(&[u8]) -> Subject<S>,
) {
    for init in initial_contents() {
        let ctx = format!("{what} ({} bytes, read-only)", init.len());
        let ctx = ctx.as_str();
        let Subject {
            storage: mut s,
            durable,
        } = fresh(&init);
        assert_holds(&s, &init, ctx);
        let len = init.len() as u64;
        for off in [0, len / 2, len, len + 4096] {
            assert!(
                s.write_all_at(b"x", off).is_err(),
                "{ctx}: a write at {off} succeeded"
            );
            assert!(
                s.write_all_vectored_at(&[b"ab", b"", b"c"], off).is_err(),
                "{ctx}: a vectored write at {off} succeeded"
            );
            assert_holds(&s, &init, &format!("{ctx}, after a write at {off}"));
        }
        assert_short_read(&s, &init, len, 1, true, ctx);
        drop(s);
        if let Some(durable) = &durable {
            assert!(durable() == init, "{ctx}: the file changed");
        }
    }
}
