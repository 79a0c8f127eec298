//! The in-memory mirror of QEMU's dirty-bitmap layer (docs/design.md, 'QEMU's bitmap state
//! model'; include/qdirty.h), checked
//! without QEMU against independent models: a per-granule `Vec<bool>` for the bits, an
//! independent SHA-256 for `x-debug-block-dirty-bitmap-sha256`, and a state model for the flags
//! (successor protocol, busy/readonly/inconsistent checks, recording), transactions and
//! serialization in QEMU's byte layout. Random operation sequences use a deterministic PRNG.

mod common;

use common::{qdirty_runs, Prng, TempDir};
use qdirty::bitmap::{
    BitmapSet, DirtyBitmap, CHECK_ALLOW_RO, CHECK_BUSY, CHECK_DEFAULT, CHECK_INCONSISTENT, CHECK_RO,
};
use qdirty::image::Transaction;
use qdirty::{AddOptions, BitmapId, Error, Image};

const MIB: u64 = 1 << 20;

// ------------------------------------------------------------------------------------------
// Independent SHA-256 (FIPS 180-4), so that the digest is not checked against itself
// ------------------------------------------------------------------------------------------

const K: [u32; 64] = [
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
    0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
    0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
    0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
    0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
    0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
    0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
    0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2,
];

fn sha256_hex(data: &[u8]) -> String {
    let mut h: [u32; 8] = [
        0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab,
        0x5be0cd19,
    ];
    let mut msg = data.to_vec();
    let bitlen = (data.len() as u64).wrapping_mul(8);
    msg.push(0x80);
    while msg.len() % 64 != 56 {
        msg.push(0);
    }
    msg.extend_from_slice(&bitlen.to_be_bytes());
    for block in msg.chunks(64) {
        let mut w = [0u32; 64];
        for i in 0..16 {
            w[i] = u32::from_be_bytes(block[4 * i..4 * i + 4].try_into().unwrap());
        }
        for i in 16..64 {
            let s0 = w[i - 15].rotate_right(7) ^ w[i - 15].rotate_right(18) ^ (w[i - 15] >> 3);
            let s1 = w[i - 2].rotate_right(17) ^ w[i - 2].rotate_right(19) ^ (w[i - 2] >> 10);
            w[i] = w[i - 16]
                .wrapping_add(s0)
                .wrapping_add(w[i - 7])
                .wrapping_add(s1);
        }
        let [mut a, mut b, mut c, mut d, mut e, mut f, mut g, mut hh] = h;
        for i in 0..64 {
            let s1 = e.rotate_right(6) ^ e.rotate_right(11) ^ e.rotate_right(25);
            let ch = (e & f) ^ (!e & g);
            let t1 = hh
                .wrapping_add(s1)
                .wrapping_add(ch)
                .wrapping_add(K[i])
                .wrapping_add(w[i]);
            let s0 = a.rotate_right(2) ^ a.rotate_right(13) ^ a.rotate_right(22);
            let maj = (a & b) ^ (a & c) ^ (b & c);
            let t2 = s0.wrapping_add(maj);
            hh = g;
            g = f;
            f = e;
            e = d.wrapping_add(t1);
            d = c;
            c = b;
            b = a;
            a = t1.wrapping_add(t2);
        }
        for (x, y) in h.iter_mut().zip([a, b, c, d, e, f, g, hh]) {
            *x = x.wrapping_add(y);
        }
    }
    h.iter().map(|x| format!("{x:08x}")).collect()
}

#[test]
fn independent_sha256_known_vectors() {
    assert_eq!(
        sha256_hex(b""),
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    );
    assert_eq!(
        sha256_hex(b"abc"),
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    );
    assert_eq!(
        sha256_hex(b"abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq"),
        "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1"
    );
}

// ------------------------------------------------------------------------------------------
// Bit model: one bool per granule
// ------------------------------------------------------------------------------------------

#[derive(Clone, Debug, PartialEq, Eq)]
struct Model {
    size: u64,
    g: u64,
    bits: Vec<bool>,
}

impl Model {
    fn new(size: u64, g: u64) -> Model {
        Model {
            size,
            g,
            bits: vec![false; size.div_ceil(g) as usize],
        }
    }

    /// Marks [off, off+len) rounded outward, clamped to the size.
    fn set(&mut self, off: u64, len: u64) {
        if len == 0 || off >= self.size {
            return;
        }
        let end = (off + len).min(self.size);
        for k in off / self.g..end.div_ceil(self.g) {
            self.bits[k as usize] = true;
        }
    }

    /// Clears granules [off/g, ceil((off+len)/g)) (callers pass aligned ranges).
    fn reset(&mut self, off: u64, len: u64) {
        let end = (off + len).min(self.size);
        for k in off / self.g..end.div_ceil(self.g) {
            self.bits[k as usize] = false;
        }
    }

    fn clear(&mut self) {
        self.bits.iter_mut().for_each(|b| *b = false);
    }

    fn count(&self) -> u64 {
        self.bits.iter().filter(|b| **b).count() as u64 * self.g
    }

    /// Granule starts of the dirty granules.
    fn starts(&self) -> Vec<u64> {
        (0..self.bits.len() as u64)
            .filter(|&k| self.bits[k as usize])
            .map(|k| k * self.g)
            .collect()
    }

    /// Maximal dirty runs, clipped to the size.
    fn runs(&self) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        let mut k = 0usize;
        while k < self.bits.len() {
            if !self.bits[k] {
                k += 1;
                continue;
            }
            let s = k;
            while k < self.bits.len() && self.bits[k] {
                k += 1;
            }
            let start = s as u64 * self.g;
            let end = (k as u64 * self.g).min(self.size);
            out.push((start, end - start));
        }
        out
    }

    /// Serialized bytes of granules [first, first + n) in QEMU's layout, padded to whole words.
    fn serialize(&self, first: u64, n: u64) -> Vec<u8> {
        let words = n.div_ceil(64);
        let mut out = vec![0u8; (words * 8) as usize];
        for k in 0..n {
            if self.bits.get((first + k) as usize) == Some(&true) {
                out[(k / 8) as usize] |= 1 << (k % 8);
            }
        }
        out
    }

    /// QEMU's sha256: max(ceil(bits/64), 1) little-endian words.
    fn sha256(&self) -> String {
        let n = self.bits.len() as u64;
        let mut bytes = self.serialize(0, n);
        if bytes.is_empty() {
            bytes = vec![0u8; 8];
        }
        sha256_hex(&bytes)
    }

    /// self |= other (any granularity, same size): each dirty granule of other as bytes.
    fn or_from(&mut self, other: &Model) {
        assert_eq!(self.size, other.size);
        for s in other.starts() {
            self.set(s, other.g.min(other.size - s));
        }
    }

    fn truncate(&mut self, new_size: u64) {
        self.size = new_size;
        self.bits.resize(new_size.div_ceil(self.g) as usize, false);
    }

    fn get(&self, off: u64) -> bool {
        off < self.size && self.bits[(off / self.g) as usize]
    }

    /// (dirty at off, run length of that state capped at bytes).
    fn status(&self, off: u64, bytes: u64) -> (bool, u64) {
        let st = self.get(off);
        let mut k = off / self.g + 1;
        while (k as usize) < self.bits.len() && self.bits[k as usize] == st {
            k += 1;
        }
        let run_end = (k * self.g).min(self.size);
        (st, (run_end - off).min(bytes))
    }
}

fn assert_bits(bm: &DirtyBitmap, m: &Model, ctx: &str) {
    assert_eq!(bm.size(), m.size, "{ctx}: size");
    assert_eq!(bm.granularity(), m.g, "{ctx}: granularity");
    assert_eq!(bm.count(), m.count(), "{ctx}: count");
    assert_eq!(qdirty_runs(bm), m.runs(), "{ctx}: dirty runs");
    assert_eq!(bm.sha256().unwrap(), m.sha256(), "{ctx}: sha256");
}

fn expect_err<T: std::fmt::Debug>(r: qdirty::Result<T>, ctx: &str) -> Error {
    match r {
        Ok(v) => panic!("{ctx}: expected an error, got Ok({v:?})"),
        Err(e) => e,
    }
}

fn busy_msg(n: &str) -> String {
    format!("Bitmap '{n}' is currently in use by another operation and cannot be used")
}
fn ro_msg(n: &str) -> String {
    format!("Bitmap '{n}' is readonly and cannot be modified")
}
fn inconsistent_msg(n: &str) -> String {
    format!("Bitmap '{n}' is inconsistent and cannot be used")
}

fn bm(set: &mut BitmapSet, id: BitmapId) -> &DirtyBitmap {
    set.current(id).expect("bitmap exists")
}
fn bm_mut(set: &mut BitmapSet, id: BitmapId) -> &mut DirtyBitmap {
    set.get_mut(id).expect("bitmap exists")
}

// ------------------------------------------------------------------------------------------
// check(): order, messages, hint
// ------------------------------------------------------------------------------------------

#[test]
fn check_order_messages_and_hint() {
    let mut b = DirtyBitmap::new(Some(b"chk"), MIB, 4096).unwrap();
    assert!(b.check(CHECK_DEFAULT).is_ok());
    assert_eq!(CHECK_BUSY, 1);
    assert_eq!(CHECK_RO, 2);
    assert_eq!(CHECK_INCONSISTENT, 4);
    assert_eq!(CHECK_DEFAULT, 7);
    assert_eq!(CHECK_ALLOW_RO, 5);

    // Only persistent bitmaps can be inconsistent (QEMU asserts it).
    let e = expect_err(b.set_inconsistent(), "set_inconsistent on transient");
    assert!(matches!(e, Error::Precondition(_)), "{e:?}");
    assert!(!b.inconsistent() && b.enabled());

    b.set_persistence(true);
    b.set_busy(true);
    b.set_readonly(true);
    b.set_inconsistent().unwrap();
    assert!(b.inconsistent());
    assert!(!b.enabled(), "set_inconsistent also disables");

    let e = expect_err(b.check(CHECK_DEFAULT), "all three");
    assert!(matches!(e, Error::Busy { .. }), "{e:?}");
    assert_eq!(e.to_string(), busy_msg("chk"));
    assert_eq!(e.errno(), libc::EBUSY);
    assert_eq!(e.hint(), None);

    let e = expect_err(
        b.check(CHECK_RO | CHECK_INCONSISTENT),
        "RO before INCONSISTENT",
    );
    assert!(matches!(e, Error::ReadOnlyBitmap { .. }), "{e:?}");
    assert_eq!(e.to_string(), ro_msg("chk"));

    let e = expect_err(b.check(CHECK_INCONSISTENT), "INCONSISTENT");
    assert!(matches!(e, Error::Inconsistent { .. }), "{e:?}");
    assert_eq!(e.to_string(), inconsistent_msg("chk"));
    assert_eq!(
        e.hint(),
        Some("Try block-dirty-bitmap-remove to delete this bitmap from disk")
    );
    assert!(b.check(0).is_ok(), "no flag requested: allowed");

    // ALLOW_RO skips the RO check: busy still wins, then inconsistent.
    b.set_busy(false);
    let e = expect_err(b.check(CHECK_ALLOW_RO), "ALLOW_RO");
    assert!(matches!(e, Error::Inconsistent { .. }), "{e:?}");
    let e = expect_err(b.check(CHECK_DEFAULT), "DEFAULT, not busy");
    assert!(matches!(e, Error::ReadOnlyBitmap { .. }), "{e:?}");
    b.set_readonly(false);
    // remove's checks (BUSY | RO): an inconsistent bitmap may be removed.
    assert!(b.check(CHECK_BUSY | CHECK_RO).is_ok());

    // Anonymous bitmaps are named "(null)", as glib prints NULL.
    let mut a = DirtyBitmap::new(None, MIB, 4096).unwrap();
    a.set_busy(true);
    assert_eq!(
        expect_err(a.check(CHECK_BUSY), "anon").to_string(),
        busy_msg("(null)")
    );
}

#[test]
fn flag_setters_and_persistence() {
    let mut b = DirtyBitmap::new(Some(b"f"), 10 * MIB, 65536).unwrap();
    assert!(b.enabled() && !b.busy() && !b.readonly() && !b.persistent() && !b.skip_store());
    assert!(!b.persistence());
    b.set_persistence(true);
    assert!(b.persistent() && b.persistence());
    b.set_skip_store(true);
    assert!(b.persistent(), "raw flag unchanged by skip_store");
    assert!(!b.persistence(), "persistence = persistent && !skip_store");
    b.set_skip_store(false);
    assert!(b.persistence());
    b.set_persistence(false);
    assert!(!b.persistence());
    b.set_busy(true);
    assert!(b.busy());
    // Busy refuses enable/disable (ALLOW_RO) and clear (DEFAULT).
    assert!(matches!(b.enable(), Err(Error::Busy { .. })));
    assert!(matches!(b.disable(), Err(Error::Busy { .. })));
    assert!(matches!(b.clear(), Err(Error::Busy { .. })));
    // bdrv_set_dirty_bitmap has no busy check.
    b.set_dirty(0, 1).unwrap();
    assert_eq!(b.count(), 65536);
}

// ------------------------------------------------------------------------------------------
// Readonly
// ------------------------------------------------------------------------------------------

#[test]
fn readonly_semantics() {
    let size = 8 * MIB + 4321;
    let mut img = Image::new_memory(size);
    let opts = AddOptions::default();
    let ro = img.add_bitmap(b"ro", 4096, opts).unwrap();
    let rw = img.add_bitmap(b"rw", 65536, opts).unwrap();
    img.set_dirty(100_000, 300_000);
    let mut m_ro = Model::new(size, 4096);
    m_ro.set(100_000, 300_000);
    let mut m_rw = Model::new(size, 65536);
    m_rw.set(100_000, 300_000);

    img.bitmap_mut(ro).unwrap().set_readonly(true);
    assert!(img.bitmaps().has_readonly());

    // enable / disable allowed (ALLOW_RO).
    img.bitmap_mut(ro).unwrap().disable().unwrap();
    img.bitmap_mut(ro).unwrap().enable().unwrap();
    // clear, direct set and reset, merge into: refused with QEMU's message.
    let e = expect_err(img.bitmap_mut(ro).unwrap().clear(), "clear readonly");
    assert_eq!(e.to_string(), ro_msg("ro"));
    assert_eq!(e.errno(), libc::EPERM);
    assert!(matches!(
        img.bitmap_mut(ro).unwrap().set_dirty(0, 1),
        Err(Error::ReadOnlyBitmap { .. })
    ));
    assert!(matches!(
        img.bitmap_mut(ro).unwrap().reset_dirty(0, 4096),
        Err(Error::ReadOnlyBitmap { .. })
    ));
    let e = expect_err(img.merge_bitmap(b"ro", b"rw"), "merge into readonly");
    assert_eq!(e.to_string(), ro_msg("ro"));
    assert!(matches!(
        img.bitmap_mut(ro).unwrap().clear_with_backup(),
        Err(Error::ReadOnlyBitmap { .. })
    ));
    // The guest write hook skips the readonly bitmap (QEMU refuses the write before it).
    img.set_dirty(5 * MIB, 10);
    m_rw.set(5 * MIB, 10);
    // merge from a readonly source is allowed.
    img.merge_bitmap(b"rw", b"ro").unwrap();
    m_rw.or_from(&m_ro);
    assert_bits(
        img.bitmap_current(ro).unwrap(),
        &m_ro,
        "readonly bitmap untouched",
    );
    assert_bits(img.bitmap_current(rw).unwrap(), &m_rw, "rw bitmap");
    // remove refused (BUSY | RO), release (memory only, no check in QEMU) allowed.
    let e = expect_err(img.remove_bitmap(b"ro"), "remove readonly");
    assert_eq!(e.to_string(), ro_msg("ro"));
    assert!(img.find_bitmap(b"ro").is_some());
    img.release_bitmap(ro).unwrap();
    assert!(img.find_bitmap(b"ro").is_none());
    assert!(!img.bitmaps().has_readonly());
}

// ------------------------------------------------------------------------------------------
// Successor protocol
// ------------------------------------------------------------------------------------------

#[test]
fn successor_of_enabled_bitmap_then_abdicate() {
    let size = 16 * MIB + 512;
    let mut set = BitmapSet::new(size);
    let b = set.create(Some(b"b"), 65536).unwrap();
    let other = set.create(Some(b"other"), 4096).unwrap();
    bm_mut(&mut set, other).disable().unwrap();
    bm_mut(&mut set, b).set_persistence(true);
    set.set_dirty(0, 200_000);
    let mut before = Model::new(size, 65536);
    before.set(0, 200_000);
    assert_bits(bm(&mut set, b), &before, "b before");

    let s = set.create_successor(b).unwrap();
    // Parent: frozen = disabled + busy, with a successor.
    let p = bm(&mut set, b);
    assert!(!p.enabled() && p.busy() && p.has_successor());
    assert_eq!(p.successor(), Some(s));
    // Successor: anonymous, same granularity, inherits enabled, not busy, not persistent.
    let c = bm(&mut set, s);
    assert_eq!(c.name(), None);
    assert_eq!(c.granularity(), 65536);
    assert!(c.enabled() && !c.busy() && !c.persistent() && !c.has_successor());
    assert_eq!(c.count(), 0);
    assert!(
        set.recording(b),
        "frozen parent with an enabled successor records"
    );
    assert!(set.recording(s));
    // The successor is at the head of the list (newest first) and queried without a name.
    assert_eq!(set.ids(), vec![s, other, b]);
    let q = set.query().unwrap();
    assert_eq!(q.len(), 3);
    assert_eq!(q[0].id, s);
    assert_eq!(q[0].name, None);
    assert!(q[0].recording && !q[0].busy && !q[0].persistent);
    assert_eq!(q[2].name.as_deref(), Some(&b"b"[..]));
    assert!(q[2].recording && q[2].busy && q[2].persistent);
    assert_eq!(q[2].count, before.count());
    assert!(!q[1].recording);

    // Guest writes go only to the successor.
    set.set_dirty(8 * MIB, 1);
    let mut during = Model::new(size, 65536);
    during.set(8 * MIB, 1);
    assert_bits(
        bm(&mut set, b),
        &before,
        "frozen parent unchanged by writes",
    );
    assert_bits(bm(&mut set, s), &during, "successor got the write");
    // Refusals while frozen.
    assert!(matches!(
        bm_mut(&mut set, b).clear(),
        Err(Error::Busy { .. })
    ));
    let e = expect_err(set.create_successor(b), "second successor");
    assert_eq!(e.to_string(), busy_msg("b"));
    let e = expect_err(set.release(b), "release frozen");
    assert!(matches!(e, Error::Held { .. }), "{e:?}");
    assert_eq!(e.errno(), libc::EBUSY);
    let e = expect_err(set.truncate(size / 2), "truncate while frozen");
    assert!(matches!(e, Error::Precondition(_)), "{e:?}");
    assert_eq!(set.size(), size);

    // abdicate: the successor takes name and persistence, the parent and its bits go.
    let n = set.abdicate(b).unwrap();
    assert_eq!(n, s);
    assert!(set.get(b).is_none());
    assert_eq!(set.find(b"b"), Some(s));
    let c = bm(&mut set, s);
    assert_eq!(c.name(), Some(&b"b"[..]));
    assert!(c.persistent() && c.enabled() && !c.busy() && !c.has_successor());
    assert_bits(c, &during, "abdicated bitmap holds only the writes since");
    assert_eq!(set.ids(), vec![s, other]);
    // No successor any more.
    let e = expect_err(set.abdicate(s), "abdicate without successor");
    assert_eq!(
        e.to_string(),
        "Cannot relinquish control if there's no successor present"
    );
    let e = expect_err(set.reclaim(s), "reclaim without successor");
    assert_eq!(
        e.to_string(),
        "Cannot reclaim a successor when none is present"
    );
    assert!(matches!(
        set.enable_successor(s),
        Err(Error::Precondition(_))
    ));
}

#[test]
fn successor_reclaim_and_enable_successor() {
    let size = 5 * MIB + 777;
    let mut set = BitmapSet::new(size);
    let b = set.create(Some(b"b"), 4096).unwrap();
    set.set_dirty(MIB, 10_000);
    let mut m = Model::new(size, 4096);
    m.set(MIB, 10_000);

    // Enabled parent: reclaim ORs the successor back, parent enabled again, not busy.
    let s = set.create_successor(b).unwrap();
    set.set_dirty(3 * MIB + 5, 9000);
    let mut w = Model::new(size, 4096);
    w.set(3 * MIB + 5, 9000);
    assert_bits(bm(&mut set, s), &w, "successor");
    assert_eq!(set.reclaim(b).unwrap(), b);
    assert!(set.get(s).is_none());
    m.or_from(&w);
    let p = bm(&mut set, b);
    assert_bits(p, &m, "reclaimed parent");
    assert!(p.enabled() && !p.busy() && !p.has_successor());
    assert_eq!(set.ids(), vec![b]);

    // Disabled parent: successor disabled, nothing records; enable_successor starts recording;
    // reclaim leaves the parent enabled (it takes the successor's state).
    bm_mut(&mut set, b).disable().unwrap();
    let s = set.create_successor(b).unwrap();
    assert!(!bm(&mut set, s).enabled());
    assert!(!set.recording(b));
    set.set_dirty(0, 1);
    assert_eq!(bm(&mut set, s).count(), 0);
    assert_bits(bm(&mut set, b), &m, "frozen disabled parent");
    set.enable_successor(b).unwrap();
    assert!(bm(&mut set, s).enabled());
    assert!(!bm(&mut set, b).enabled(), "the parent stays disabled");
    assert!(set.recording(b));
    assert!(set
        .query()
        .unwrap()
        .iter()
        .any(|q| q.id == b && q.recording));
    set.set_dirty(size - 1, 1);
    m.set(size - 1, 1);
    set.reclaim(b).unwrap();
    let p = bm(&mut set, b);
    assert_bits(p, &m, "reclaim after enable_successor");
    assert!(p.enabled() && !p.busy());

    // create_successor on a busy bitmap: the BUSY message.
    bm_mut(&mut set, b).set_busy(true);
    let e = expect_err(set.create_successor(b), "busy");
    assert!(matches!(e, Error::Busy { .. }));
    assert_eq!(e.to_string(), busy_msg("b"));
    assert_eq!(set.len(), 1, "nothing created");
    bm_mut(&mut set, b).set_busy(false);
    // A frozen bitmap whose busy flag was dropped: "already has one".
    let s = set.create_successor(b).unwrap();
    bm_mut(&mut set, b).set_busy(false);
    let e = expect_err(set.create_successor(b), "already has one");
    assert_eq!(
        e.to_string(),
        "Cannot create a successor for a bitmap that already has one"
    );
    assert_eq!(set.len(), 2);
    // Release is still refused: it has a successor.
    assert!(set.release(b).is_err());
    set.reclaim(b).unwrap();
    assert!(set.get(s).is_none());
    set.release(b).unwrap();
    assert!(set.is_empty());
}

// ------------------------------------------------------------------------------------------
// release / truncate / iterators
// ------------------------------------------------------------------------------------------

#[test]
fn release_refusals() {
    let mut set = BitmapSet::new(4 * MIB);
    let a = set.create(Some(b"a"), 4096).unwrap();
    assert!(matches!(
        set.create(Some(b"a"), 512),
        Err(Error::BitmapExists { .. })
    ));
    bm_mut(&mut set, a).set_busy(true);
    assert!(matches!(set.release(a), Err(Error::Held { .. })));
    bm_mut(&mut set, a).set_busy(false);
    let it = set.iter_new(a).unwrap();
    assert_eq!(bm(&mut set, a).active_iterators(), 1);
    assert!(matches!(set.release(a), Err(Error::Held { .. })));
    set.iter_free(it);
    assert_eq!(bm(&mut set, a).active_iterators(), 0);
    let gone = set.release(a).unwrap();
    assert_eq!(gone.name(), Some(&b"a"[..]));
    assert!(set.get(a).is_none());
    assert!(set.release(a).is_err(), "released twice");
}

#[test]
fn truncate_shrink_and_grow() {
    let g = 4096;
    let size = 10 * g + 1000; // 11 granules, the last one partial
    let mut set = BitmapSet::new(size);
    let a = set.create(Some(b"a"), g).unwrap();
    let b = set.create(Some(b"b"), 512).unwrap();
    set.set_dirty(0, size);
    let mut ma = Model::new(size, g);
    ma.set(0, size);
    let mut mb = Model::new(size, 512);
    mb.set(0, size);

    // Shrink to an end inside granule 5: granule 5 keeps its bit, 6.. are dropped.
    let new = 5 * g + 1;
    set.truncate(new).unwrap();
    ma.truncate(new);
    mb.truncate(new);
    assert_eq!(set.size(), new);
    assert_bits(bm(&mut set, a), &ma, "a shrunk");
    assert_bits(bm(&mut set, b), &mb, "b shrunk");
    assert!(bm(&mut set, a).get(5 * g));
    assert_eq!(
        bm(&mut set, a).count(),
        6 * g,
        "granule containing the new end kept"
    );
    assert_eq!(ma.runs(), vec![(0, new)]);

    // Grow: the new space is clean, the kept bits stay.
    let grown = 40 * g + 3;
    set.truncate(grown).unwrap();
    ma.truncate(grown);
    mb.truncate(grown);
    assert_bits(bm(&mut set, a), &ma, "a grown");
    assert_bits(bm(&mut set, b), &mb, "b grown");
    assert!(!bm(&mut set, a).get(6 * g));
    // New bits can be set over the new space.
    set.set_dirty(grown - 1, 1);
    ma.set(grown - 1, 1);
    mb.set(grown - 1, 1);
    assert_bits(bm(&mut set, a), &ma, "a after write at the new end");
    assert_bits(bm(&mut set, b), &mb, "b after write at the new end");

    // Refused (nothing changes) while busy, frozen or iterated.
    let sha = bm(&mut set, a).sha256().unwrap();
    bm_mut(&mut set, b).set_busy(true);
    assert!(matches!(set.truncate(g), Err(Error::Precondition(_))));
    bm_mut(&mut set, b).set_busy(false);
    let s = set.create_successor(a).unwrap();
    assert!(matches!(set.truncate(g), Err(Error::Precondition(_))));
    set.reclaim(a).unwrap();
    assert!(set.get(s).is_none());
    let it = set.iter_new(b).unwrap();
    assert!(matches!(set.truncate(g), Err(Error::Precondition(_))));
    set.iter_free(it);
    assert_eq!(set.size(), grown);
    assert_eq!(bm(&mut set, a).sha256().unwrap(), sha);
    assert_bits(bm(&mut set, b), &mb, "b unchanged by refused truncates");

    // Shrink to 0 and back.
    set.truncate(0).unwrap();
    assert_eq!(bm(&mut set, a).count(), 0);
    assert_eq!(bm(&mut set, a).sha256().unwrap(), sha256_hex(&[0u8; 8]));
    set.truncate(3 * g).unwrap();
    assert_bits(bm(&mut set, a), &Model::new(3 * g, g), "regrown from 0");
}

#[test]
fn iterators_next_seek_free() {
    let g = 65536;
    let size = 3 * MIB + 12345;
    let mut set = BitmapSet::new(size);
    let a = set.create(Some(b"a"), g).unwrap();
    let mut m = Model::new(size, g);
    for &(o, l) in &[(70_000, 1), (200_000, 200_000), (MIB + 1, 1), (size - 1, 1)] {
        set.set_dirty(o, l);
        m.set(o, l);
    }
    let mut it = set.iter_new(a).unwrap();
    assert_eq!(it.bitmap(), a);
    let mut got = Vec::new();
    while let Some(o) = set.iter_next(&mut it).unwrap() {
        got.push(o);
    }
    assert_eq!(got, m.starts(), "granule starts in order");
    assert_eq!(set.iter_next(&mut it).unwrap(), None, "stays at the end");

    // Seek into the middle of a dirty granule: that granule comes next.
    let starts = m.starts();
    set.iter_seek(&mut it, starts[2] + 123).unwrap();
    assert_eq!(set.iter_next(&mut it).unwrap(), Some(starts[2]));
    assert_eq!(set.iter_next(&mut it).unwrap(), Some(starts[3]));
    // Seek backwards to 0 restarts.
    set.iter_seek(&mut it, 0).unwrap();
    assert_eq!(set.iter_next(&mut it).unwrap(), Some(starts[0]));
    // Resets ahead are respected; sets behind are not seen.
    let victim = starts[1];
    bm_mut(&mut set, a).reset_dirty(victim, g).unwrap();
    m.reset(victim, g);
    set.set_dirty(0, 1);
    m.set(0, 1);
    assert_eq!(set.iter_next(&mut it).unwrap(), Some(starts[2]));
    // Seek to the last byte (inside the partial last granule).
    set.iter_seek(&mut it, size - 1).unwrap();
    assert_eq!(set.iter_next(&mut it).unwrap(), Some((size - 1) / g * g));
    assert_eq!(set.iter_next(&mut it).unwrap(), None);
    // Seek beyond the end is refused (QEMU asserts).
    assert!(matches!(
        set.iter_seek(&mut it, size + g),
        Err(Error::Precondition(_))
    ));
    // Seek inside a clean area finds the next dirty granule.
    set.iter_seek(&mut it, MIB / 2).unwrap();
    assert_eq!(set.iter_next(&mut it).unwrap(), Some(MIB));
    // Two iterators count.
    let it2 = set.iter_new(a).unwrap();
    assert_eq!(bm(&mut set, a).active_iterators(), 2);
    set.iter_free(it);
    set.iter_free(it2);
    assert_eq!(bm(&mut set, a).active_iterators(), 0);
    assert_bits(bm(&mut set, a), &m, "after iteration");

    // Empty bitmap: None at once.
    let e = set.create(Some(b"e"), 512).unwrap();
    let mut it = set.iter_new(e).unwrap();
    assert_eq!(set.iter_next(&mut it).unwrap(), None);
    set.iter_free(it);
}

#[test]
fn status_matches_model() {
    let mut rng = Prng::new(77);
    for &(g, size) in &[(512u64, 300_001u64), (4096, 2 * MIB + 3), (65536, 10 * MIB)] {
        let mut b = DirtyBitmap::new(Some(b"s"), size, g).unwrap();
        let mut m = Model::new(size, g);
        for _ in 0..40 {
            let o = rng.below(size);
            let l = 1 + rng.below(size / 20);
            b.set_dirty(o, l.min(size - o)).unwrap();
            m.set(o, l.min(size - o));
        }
        for _ in 0..500 {
            let o = rng.below(size);
            let bytes = 1 + rng.below(size - o);
            let got = b.status(o, bytes).unwrap();
            assert_eq!(got, m.status(o, bytes), "status({o}, {bytes}) g={g}");
            if m.get(o) {
                assert!(got.0, "dirty start reports true (2022 fix)");
            }
            assert!(got.1 >= 1 && got.1 <= bytes);
        }
        assert!(matches!(b.status(0, 0), Err(Error::Precondition(_))));
        assert!(matches!(b.status(size - 1, 2), Err(Error::Precondition(_))));
        assert_eq!(b.status(size - 1, 1).unwrap(), m.status(size - 1, 1));
    }
}

// ------------------------------------------------------------------------------------------
// clear / merge with backup
// ------------------------------------------------------------------------------------------

#[test]
fn clear_and_merge_with_backup_restore_exactly() {
    let size = 7 * MIB + 99;
    let mut rng = Prng::new(5);
    let mut a = DirtyBitmap::new(Some(b"a"), size, 4096).unwrap();
    let mut src = DirtyBitmap::new(Some(b"src"), size, 512).unwrap();
    let mut ma = Model::new(size, 4096);
    let mut ms = Model::new(size, 512);
    for _ in 0..30 {
        let o = rng.below(size);
        let l = (1 + rng.below(100_000)).min(size - o);
        a.set_dirty(o, l).unwrap();
        ma.set(o, l);
        let o = rng.below(size);
        let l = (1 + rng.below(100_000)).min(size - o);
        src.set_dirty(o, l).unwrap();
        ms.set(o, l);
    }
    let sha = a.sha256().unwrap();
    assert_eq!(sha, ma.sha256());

    let backup = a.clear_with_backup().unwrap();
    assert_eq!(a.count(), 0);
    assert_bits(&a, &Model::new(size, 4096), "cleared");
    a.restore(backup).unwrap();
    assert_bits(&a, &ma, "restored after clear");

    let backup = a.merge_with_backup(&src).unwrap();
    let mut merged = ma.clone();
    merged.or_from(&ms);
    assert_bits(&a, &merged, "merged (finer source, coarser target)");
    a.restore(backup).unwrap();
    assert_bits(&a, &ma, "restored after merge");
    assert_eq!(a.sha256().unwrap(), sha);

    // Finer target, coarser source.
    let backup = src.merge_with_backup(&a).unwrap();
    let mut m2 = ms.clone();
    m2.or_from(&ma);
    assert_bits(&src, &m2, "merged into finer");
    src.restore(backup).unwrap();
    assert_bits(&src, &ms, "restored finer");

    // Refusals: busy target, busy source, inconsistent, readonly target, size mismatch.
    let other = DirtyBitmap::new(Some(b"o"), size + 512, 4096).unwrap();
    let e = expect_err(a.merge_with_backup(&other), "size mismatch");
    assert_eq!(
        e.to_string(),
        format!(
            "Bitmaps are of different sizes (destination size is {size}, source size is {}) and can't be merged",
            size + 512
        )
    );
    src.set_busy(true);
    assert_eq!(
        expect_err(a.merge_with_backup(&src), "busy src").to_string(),
        busy_msg("src")
    );
    src.set_busy(false);
    src.set_readonly(true);
    let backup = a.merge_with_backup(&src).expect("readonly source allowed");
    a.restore(backup).unwrap();
    a.set_readonly(true);
    assert!(matches!(
        a.clear_with_backup(),
        Err(Error::ReadOnlyBitmap { .. })
    ));
    assert!(matches!(
        a.merge_with_backup(&src),
        Err(Error::ReadOnlyBitmap { .. })
    ));
    a.set_readonly(false);
    a.set_busy(true);
    assert!(matches!(a.clear_with_backup(), Err(Error::Busy { .. })));
    a.set_busy(false);
    a.set_persistence(true);
    a.set_inconsistent().unwrap();
    assert!(matches!(
        a.clear_with_backup(),
        Err(Error::Inconsistent { .. })
    ));
    assert!(matches!(
        src.merge_with_backup(&a),
        Err(Error::ReadOnlyBitmap { .. })
    ));
    src.set_readonly(false);
    assert!(matches!(
        src.merge_with_backup(&a),
        Err(Error::Inconsistent { .. })
    ));
    assert_bits(&src, &ms, "src unchanged by refusals");
}

// ------------------------------------------------------------------------------------------
// Serialization and sha256
// ------------------------------------------------------------------------------------------

#[test]
fn serialization_layout_and_round_trip() {
    let mut rng = Prng::new(11);
    for &g in &[512u64, 4096, 65536] {
        let align = 64 * g;
        let size = 5 * align + 3 * g + 100; // partial last word and partial last granule
        let granules = size.div_ceil(g);
        let mut b = DirtyBitmap::new(Some(b"ser"), size, g).unwrap();
        let mut m = Model::new(size, g);
        for _ in 0..25 {
            let o = rng.below(size);
            let l = (1 + rng.below(6 * g)).min(size - o);
            b.set_dirty(o, l).unwrap();
            m.set(o, l);
        }
        b.set_dirty(size - 1, 1).unwrap();
        m.set(size - 1, 1);
        assert_eq!(b.serialization_align(), align, "align = 64 granules");
        assert_eq!(
            b.serialization_size(0, size).unwrap(),
            granules.div_ceil(64) * 8
        );
        assert_eq!(b.serialization_size(align, 2 * align).unwrap(), 16);
        assert_eq!(
            b.serialization_size(5 * align, size - 5 * align).unwrap(),
            8
        );
        assert_eq!(b.serialization_size(0, 0).unwrap(), 0);

        // Whole bitmap: granule k is bit k%8 of byte k/8.
        let mut whole = vec![0u8; b.serialization_size(0, size).unwrap() as usize];
        b.serialize_part(&mut whole, 0, size).unwrap();
        assert_eq!(whole, m.serialize(0, granules), "layout g={g}");
        for k in 0..granules {
            let bit = whole[(k / 8) as usize] >> (k % 8) & 1 == 1;
            assert_eq!(bit, m.bits[k as usize]);
        }
        // sha256 = sha of the whole serialization (padded to words).
        assert_eq!(b.sha256().unwrap(), sha256_hex(&whole));

        // Chunks of 1 and 2 alignment units, into fresh bitmaps.
        for chunk in [align, 2 * align] {
            let mut fresh = DirtyBitmap::new(Some(b"dst"), size, g).unwrap();
            fresh.set_dirty(0, size).unwrap(); // must be overwritten
            let mut off = 0;
            while off < size {
                let len = chunk.min(size - off);
                let n = b.serialization_size(off, len).unwrap() as usize;
                let mut buf = vec![0xAAu8; n];
                b.serialize_part(&mut buf, off, len).unwrap();
                let first = off / g;
                let cnt = len.div_ceil(g);
                assert_eq!(buf, m.serialize(first, cnt), "chunk at {off} g={g}");
                fresh.deserialize_part(&buf, off, len, false).unwrap();
                off += len;
            }
            fresh.deserialize_finish();
            assert_bits(&fresh, &m, &format!("round trip g={g} chunk={chunk}"));
            assert_eq!(fresh.sha256().unwrap(), b.sha256().unwrap());
        }

        // Misaligned chunks are refused.
        let mut buf = vec![0u8; 64];
        for (o, l) in [(g, align), (0, align + g), (align / 2, align / 2)] {
            let e = expect_err(b.serialize_part(&mut buf, o, l), "misaligned serialize");
            assert!(matches!(e, Error::Precondition(_)), "{e:?}");
            let e = expect_err(b.serialization_size(o, l), "misaligned size");
            assert!(matches!(e, Error::Precondition(_)), "{e:?}");
            let mut c = b.clone();
            let e = expect_err(
                c.deserialize_part(&buf, o, l, true),
                "misaligned deserialize",
            );
            assert!(matches!(e, Error::Precondition(_)), "{e:?}");
            assert!(matches!(
                c.deserialize_zeroes(o, l, true),
                Err(Error::Precondition(_))
            ));
            assert!(matches!(
                c.deserialize_ones(o, l, true),
                Err(Error::Precondition(_))
            ));
            assert_bits(&c, &m, "unchanged by refused deserialize");
        }
        // Beyond the end.
        assert!(matches!(
            b.serialize_part(&mut buf, 5 * align, align),
            Err(Error::Precondition(_))
        ));
        // Buffer too small.
        let mut small = vec![0u8; 8];
        assert!(matches!(
            b.serialize_part(&mut small, 0, 2 * align),
            Err(Error::InvalidArgument(_))
        ));

        // deserialize_ones over the last (partial) chunk: nothing past the end.
        let mut c = DirtyBitmap::new(Some(b"ones"), size, g).unwrap();
        let last = 5 * align;
        c.deserialize_ones(last, size - last, true).unwrap();
        let mut mo = Model::new(size, g);
        mo.set(last, size - last);
        assert_bits(&c, &mo, "ones over the last chunk masked");
        c.deserialize_ones(0, last, false).unwrap();
        c.deserialize_finish();
        let mut all = Model::new(size, g);
        all.set(0, size);
        assert_bits(&c, &all, "all ones");
        assert_eq!(qdirty_runs(&c), vec![(0, size)]);
        let mut ser = vec![0u8; c.serialization_size(last, size - last).unwrap() as usize];
        c.serialize_part(&mut ser, last, size - last).unwrap();
        assert_eq!(ser, all.serialize(last / g, granules - last / g));
        // deserialize_zeroes of one middle unit.
        c.deserialize_zeroes(align, align, true).unwrap();
        all.reset(align, align);
        assert_bits(&c, &all, "zeroes in the middle");

        // Readonly bitmaps refuse deserialization.
        c.set_readonly(true);
        assert!(matches!(
            c.deserialize_zeroes(0, align, true),
            Err(Error::ReadOnlyBitmap { .. })
        ));
    }
}

#[test]
fn sha256_edge_sizes() {
    // Size 0 hashes one zero word.
    let z = DirtyBitmap::new(None, 0, 512).unwrap();
    assert_eq!(z.sha256().unwrap(), sha256_hex(&[0u8; 8]));
    // One granule, 64 granules, 65 granules, with the last bit set.
    for &(size, g) in &[
        (1u64, 512u64),
        (64 * 512, 512),
        (64 * 512 + 1, 512),
        (1 << 30, 65536),
    ] {
        let mut b = DirtyBitmap::new(Some(b"h"), size, g).unwrap();
        let mut m = Model::new(size, g);
        assert_eq!(b.sha256().unwrap(), m.sha256(), "empty size={size}");
        b.set_dirty(size - 1, 1).unwrap();
        m.set(size - 1, 1);
        assert_bits(&b, &m, &format!("last bit size={size}"));
    }
}

// ------------------------------------------------------------------------------------------
// Standalone bitmaps (Image::new_memory)
// ------------------------------------------------------------------------------------------

#[test]
fn standalone_image_does_everything_but_persistence() {
    let size = 12 * MIB + 512;
    let mut img = Image::new_memory(size);
    assert_eq!(img.size(), size);
    assert_eq!(img.default_granularity(), 65536);
    assert!(!img.read_only());
    let e = expect_err(
        img.add_bitmap(
            b"p",
            4096,
            AddOptions {
                persistent: true,
                ..AddOptions::default()
            },
        ),
        "persistent on standalone",
    );
    assert!(matches!(e, Error::CannotStore { .. }), "{e:?}");
    assert_eq!(e.errno(), libc::ENOTSUP);
    assert!(
        e.to_string()
            .starts_with("Can't make bitmap 'p' persistent in "),
        "{e}"
    );
    assert!(img.find_bitmap(b"p").is_none(), "nothing created");

    let d = img.add_bitmap(b"d", 0, AddOptions::default()).unwrap();
    assert_eq!(img.bitmap_current(d).unwrap().granularity(), 65536);
    let f = img
        .add_bitmap(
            b"f",
            512,
            AddOptions {
                disabled: true,
                ..AddOptions::default()
            },
        )
        .unwrap();
    assert!(!img.bitmap_current(f).unwrap().enabled());
    assert!(matches!(
        img.add_bitmap(b"d", 512, AddOptions::default()),
        Err(Error::BitmapExists { .. })
    ));
    assert!(matches!(
        img.add_bitmap(b"", 512, AddOptions::default()),
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(
        img.add_bitmap(b"x", 1000, AddOptions::default()),
        Err(Error::InvalidArgument(_))
    ));

    img.set_dirty(MIB, 1);
    img.set_dirty(size - 10, 100); // clamped to the disk
    let mut md = Model::new(size, 65536);
    md.set(MIB, 1);
    md.set(size - 10, 100);
    let mut mf = Model::new(size, 512);
    assert_bits(img.bitmap_current(d).unwrap(), &md, "d");
    assert_bits(img.bitmap_current(f).unwrap(), &mf, "disabled f");
    img.merge_bitmap(b"f", b"d").unwrap();
    mf.or_from(&md);
    assert_bits(img.bitmap_current(f).unwrap(), &mf, "f after merge");
    assert!(matches!(
        img.merge_bitmap(b"f", b"nope"),
        Err(Error::BitmapNotFound { .. })
    ));
    assert_eq!(
        expect_err(img.merge_bitmap(b"nope", b"d"), "nf").to_string(),
        "Dirty bitmap 'nope' not found"
    );

    // External source from another standalone image; size mismatch refused.
    let mut other = Image::new_memory(size);
    let o = other.add_bitmap(b"o", 4096, AddOptions::default()).unwrap();
    other.set_dirty(5 * MIB, 5000);
    let mut mo = Model::new(size, 4096);
    mo.set(5 * MIB, 5000);
    img.merge_bitmap_from(b"d", &mut other, b"o").unwrap();
    md.or_from(&mo);
    assert_bits(
        img.bitmap_current(d).unwrap(),
        &md,
        "d after external merge",
    );
    let mut small = {
        let mut s = Image::new_memory(size - 512);
        s.add_bitmap(b"s", 4096, AddOptions::default()).unwrap();
        s
    };
    assert!(matches!(
        img.merge_bitmap_from(b"d", &mut small, b"s"),
        Err(Error::SizeMismatch { .. })
    ));
    assert_bits(
        img.bitmap_current(d).unwrap(),
        &md,
        "unchanged by refused merge",
    );
    assert_bits(other.bitmap_current(o).unwrap(), &mo, "source untouched");

    // Query.
    let q = img.query().unwrap();
    assert_eq!(q.len(), 2);
    assert_eq!(q[0].name.as_deref(), Some(&b"f"[..]));
    assert_eq!(q[0].count, mf.count());
    assert_eq!(q[0].granularity, 512);
    assert!(!q[0].recording && !q[0].busy && !q[0].persistent && !q[0].inconsistent);
    assert_eq!(q[1].name.as_deref(), Some(&b"d"[..]));
    assert!(q[1].recording);

    // Truncate.
    img.truncate(size / 2).unwrap();
    md.truncate(size / 2);
    mf.truncate(size / 2);
    assert_bits(img.bitmap_current(d).unwrap(), &md, "d truncated");
    assert_bits(img.bitmap_current(f).unwrap(), &mf, "f truncated");
    assert_eq!(img.size(), size / 2);

    // Reopen and store have nothing to do; remove and release work.
    img.reopen(false).unwrap();
    img.reopen(true).unwrap();
    assert!(img.store_bitmaps().is_err());
    img.remove_stored_bitmap(b"d").unwrap();
    img.remove_bitmap(b"d").unwrap();
    assert!(img.find_bitmap(b"d").is_none());
    assert!(matches!(
        img.remove_bitmap(b"d"),
        Err(Error::BitmapNotFound { .. })
    ));
    img.bitmap_mut(f).unwrap().set_busy(true);
    assert!(matches!(img.remove_bitmap(b"f"), Err(Error::Busy { .. })));
    assert!(img.release_bitmap(f).is_err());
    img.bitmap_mut(f).unwrap().set_busy(false);
    img.release_bitmap(f).unwrap();
    assert!(img.bitmap_ids().is_empty());
    img.close().unwrap();
}

// ------------------------------------------------------------------------------------------
// Transactions
// ------------------------------------------------------------------------------------------

/// Everything observable about an image's bitmaps, in list order.
#[derive(Debug, PartialEq, Eq)]
struct Snap {
    id: BitmapId,
    name: Option<Vec<u8>>,
    granularity: u64,
    enabled: bool,
    busy: bool,
    readonly: bool,
    persistent: bool,
    skip_store: bool,
    inconsistent: bool,
    successor: Option<BitmapId>,
    count: u64,
    sha256: String,
}

fn snap(img: &mut Image) -> Vec<Snap> {
    img.bitmap_ids()
        .into_iter()
        .map(|id| {
            let b = img.bitmap_current(id).unwrap();
            Snap {
                id,
                name: b.name().map(<[u8]>::to_vec),
                granularity: b.granularity(),
                enabled: b.enabled(),
                busy: b.busy(),
                readonly: b.readonly(),
                persistent: b.persistent(),
                skip_store: b.skip_store(),
                inconsistent: b.inconsistent(),
                successor: b.successor(),
                count: b.count(),
                sha256: b.sha256().unwrap(),
            }
        })
        .collect()
}

fn filled_memory_image(size: u64, seed: u64, specs: &[(&str, u64, bool)]) -> Image {
    let mut img = Image::new_memory(size);
    let mut rng = Prng::new(seed);
    for &(name, g, disabled) in specs {
        img.add_bitmap(name.as_bytes(), g, AddOptions::default())
            .unwrap();
        for _ in 0..6 {
            let o = rng.below(size);
            img.set_dirty(o, 1 + rng.below(300_000));
        }
        if disabled {
            let id = img.find_bitmap(name.as_bytes()).unwrap();
            img.bitmap_mut(id).unwrap().disable().unwrap();
        }
    }
    img
}

const SPECS: &[(&str, u64, bool)] = &[
    ("a", 512, false),
    ("b", 65536, true),
    ("c", 4096, false),
    ("d", 1 << 20, true),
    ("e", 4096, false),
];

#[test]
fn transaction_failing_action_then_abort_restores_exactly() {
    let size = 20 * MIB + 512;
    let mut img = filled_memory_image(size, 21, SPECS);
    let before = snap(&mut img);
    let a_model_sha = img
        .bitmap_current(img.find_bitmap(b"a").unwrap())
        .unwrap()
        .sha256()
        .unwrap();

    let mut t = Transaction::new();
    let new = t
        .add(&mut img, b"new", 4096, AddOptions::default())
        .unwrap();
    assert!(img.bitmap_current(new).is_ok(), "add prepared at once");
    t.clear(&mut img, b"a").unwrap();
    assert_eq!(
        img.bitmap_current(img.find_bitmap(b"a").unwrap())
            .unwrap()
            .count(),
        0,
        "clear prepared at once"
    );
    t.disable(&mut img, b"c").unwrap();
    assert!(!img
        .bitmap_current(img.find_bitmap(b"c").unwrap())
        .unwrap()
        .enabled());
    t.enable(&mut img, b"b").unwrap();
    assert!(img
        .bitmap_current(img.find_bitmap(b"b").unwrap())
        .unwrap()
        .enabled());
    t.merge(&mut img, b"d", None, b"e").unwrap();
    t.merge(&mut img, b"new", None, b"d").unwrap();
    t.remove(&mut img, b"e").unwrap();
    let e_id = img.find_bitmap(b"e").unwrap();
    let eb = img.bitmap_current(e_id).unwrap();
    assert!(
        eb.busy() && eb.skip_store(),
        "remove prepared: busy, skip_store"
    );
    assert_eq!(t.len(), 7);
    // Failing actions leave the earlier ones prepared.
    let err = expect_err(t.merge(&mut img, b"d", None, b"missing"), "missing source");
    assert_eq!(err.to_string(), "Dirty bitmap 'missing' not found");
    let err = expect_err(t.merge(&mut img, b"c", None, b"e"), "busy source");
    assert_eq!(err.to_string(), busy_msg("e"));
    let err = expect_err(t.clear(&mut img, b"e"), "clear of a removed bitmap");
    assert_eq!(err.to_string(), busy_msg("e"));
    let err = expect_err(
        t.add(&mut img, b"a", 512, AddOptions::default()),
        "duplicate add",
    );
    assert!(matches!(err, Error::BitmapExists { .. }));
    assert_eq!(t.len(), 7);
    assert!(img.find_bitmap(b"new").is_some());

    t.abort(&mut [&mut img]).unwrap();
    assert!(t.is_empty());
    assert_eq!(
        snap(&mut img),
        before,
        "abort restores every bitmap exactly"
    );
    assert_eq!(
        img.bitmap_current(img.find_bitmap(b"a").unwrap())
            .unwrap()
            .sha256()
            .unwrap(),
        a_model_sha
    );
    assert!(img.find_bitmap(b"new").is_none(), "abort of add removes it");
}

#[test]
fn transaction_commit_makes_actions_final() {
    let size = 9 * MIB;
    let mut img = filled_memory_image(size, 3, SPECS);
    let before = snap(&mut img);
    let find = |img: &Image, n: &str| img.find_bitmap(n.as_bytes()).unwrap();
    let model_of = |img: &mut Image, n: &str| {
        let b = img
            .bitmap_current(img.find_bitmap(n.as_bytes()).unwrap())
            .unwrap();
        let mut m = Model::new(size, b.granularity());
        for (o, l) in qdirty_runs(b) {
            m.set(o, l);
        }
        m
    };
    let mut md = model_of(&mut img, "d");
    md.or_from(&model_of(&mut img, "a"));
    let mut t = Transaction::new();
    t.add(&mut img, b"n", 512, AddOptions::default()).unwrap();
    t.clear(&mut img, b"c").unwrap();
    t.merge(&mut img, b"d", None, b"a").unwrap();
    t.disable(&mut img, b"a").unwrap();
    t.enable(&mut img, b"d").unwrap();
    t.remove(&mut img, b"b").unwrap();
    t.commit(&mut [&mut img]).unwrap();
    assert!(t.is_empty());
    assert!(img.find_bitmap(b"b").is_none(), "commit of remove releases");
    assert_eq!(img.bitmap_current(find(&img, "c")).unwrap().count(), 0);
    assert_bits(
        img.bitmap_current(find(&img, "d")).unwrap(),
        &md,
        "merged d",
    );
    assert!(img.bitmap_current(find(&img, "d")).unwrap().enabled());
    assert!(!img.bitmap_current(find(&img, "a")).unwrap().enabled());
    assert!(img.find_bitmap(b"n").is_some());
    assert_ne!(snap(&mut img), before);
    // An abort after commit has nothing to undo.
    t.abort(&mut [&mut img]).unwrap();
    assert!(img.find_bitmap(b"n").is_some());
}

#[test]
fn transaction_refusals_follow_checks() {
    let size = 4 * MIB;
    let mut img = filled_memory_image(size, 9, SPECS);
    let a = img.find_bitmap(b"a").unwrap();
    let c = img.find_bitmap(b"c").unwrap();
    img.bitmap_mut(a).unwrap().set_readonly(true);
    img.bitmap_mut(c).unwrap().set_busy(true);
    let before = snap(&mut img);
    let mut t = Transaction::new();
    assert!(matches!(
        t.clear(&mut img, b"a"),
        Err(Error::ReadOnlyBitmap { .. })
    ));
    assert!(matches!(
        t.merge(&mut img, b"a", None, b"b"),
        Err(Error::ReadOnlyBitmap { .. })
    ));
    assert!(matches!(
        t.remove(&mut img, b"a"),
        Err(Error::ReadOnlyBitmap { .. })
    ));
    assert!(matches!(t.clear(&mut img, b"c"), Err(Error::Busy { .. })));
    assert!(matches!(t.enable(&mut img, b"c"), Err(Error::Busy { .. })));
    assert!(matches!(t.remove(&mut img, b"c"), Err(Error::Busy { .. })));
    assert!(matches!(
        t.disable(&mut img, b"zz"),
        Err(Error::BitmapNotFound { .. })
    ));
    assert_eq!(t.len(), 0);
    assert_eq!(snap(&mut img), before);
    // Readonly bitmaps may be enabled/disabled and merged from.
    t.disable(&mut img, b"a").unwrap();
    t.merge(&mut img, b"b", None, b"a").unwrap();
    assert_eq!(t.len(), 2);
    t.abort(&mut [&mut img]).unwrap();
    assert_eq!(snap(&mut img), before);
}

#[test]
fn transaction_across_images_needs_all_images() {
    let size = 6 * MIB + 512;
    let mut i1 = filled_memory_image(size, 31, &[("t", 4096, false), ("u", 512, true)]);
    let mut i2 = filled_memory_image(size, 32, &[("s", 65536, false)]);
    let b1 = snap(&mut i1);
    let b2 = snap(&mut i2);
    let mut mt = {
        let b = i1.bitmap_current(i1.find_bitmap(b"t").unwrap()).unwrap();
        let mut m = Model::new(size, 4096);
        for (o, l) in qdirty_runs(b) {
            m.set(o, l);
        }
        m
    };
    let ms = {
        let b = i2.bitmap_current(i2.find_bitmap(b"s").unwrap()).unwrap();
        let mut m = Model::new(size, 65536);
        for (o, l) in qdirty_runs(b) {
            m.set(o, l);
        }
        m
    };
    mt.or_from(&ms);

    let mut t = Transaction::new();
    t.merge(&mut i1, b"t", Some(&mut i2), b"s").unwrap();
    t.clear(&mut i2, b"s").unwrap();
    t.enable(&mut i1, b"u").unwrap();
    let mut ids = t.images();
    ids.sort_unstable();
    let mut want = vec![i1.uid(), i2.uid()];
    want.sort_unstable();
    assert_eq!(ids, want);
    assert_bits(
        i1.bitmap_current(i1.find_bitmap(b"t").unwrap()).unwrap(),
        &mt,
        "cross-image merge prepared",
    );
    let mid1 = snap(&mut i1);
    let mid2 = snap(&mut i2);

    // Without every image: Precondition, nothing changes, the actions stay prepared.
    let e = expect_err(t.commit(&mut [&mut i1]), "commit without i2");
    assert!(matches!(e, Error::Precondition(_)), "{e:?}");
    let e = expect_err(t.abort(&mut [&mut i2]), "abort without i1");
    assert!(matches!(e, Error::Precondition(_)), "{e:?}");
    assert_eq!(t.len(), 3);
    assert_eq!(snap(&mut i1), mid1);
    assert_eq!(snap(&mut i2), mid2);

    t.abort(&mut [&mut i2, &mut i1]).unwrap();
    assert_eq!(snap(&mut i1), b1);
    assert_eq!(snap(&mut i2), b2);

    // And the same, committed.
    let mut t = Transaction::new();
    t.merge(&mut i1, b"t", Some(&mut i2), b"s").unwrap();
    t.clear(&mut i2, b"s").unwrap();
    t.commit(&mut [&mut i1, &mut i2]).unwrap();
    assert_bits(
        i1.bitmap_current(i1.find_bitmap(b"t").unwrap()).unwrap(),
        &mt,
        "committed cross-image merge",
    );
    assert_eq!(
        i2.bitmap_current(i2.find_bitmap(b"s").unwrap())
            .unwrap()
            .count(),
        0
    );
}

#[test]
fn transaction_remove_and_add_on_a_real_file() {
    let tmp = TempDir::new("mirror-txn");
    let path = tmp.join("t.qcow2");
    let size = 32 * MIB;
    Image::create(&path, size, 0).unwrap();
    let popts = AddOptions {
        persistent: true,
        ..AddOptions::default()
    };
    {
        let mut img = Image::open(&path, true).unwrap();
        img.add_bitmap(b"p", 65536, popts).unwrap();
        img.add_bitmap(b"keep", 4096, popts).unwrap();
        img.set_dirty(MIB, 3 * MIB);
        img.set_dirty(20 * MIB + 7, 1);
        img.close().unwrap();
    }
    let sha_p = {
        let mut img = Image::open(&path, false).unwrap();
        let s = img
            .bitmap_current(img.find_bitmap(b"p").unwrap())
            .unwrap()
            .sha256()
            .unwrap();
        img.close().unwrap();
        s
    };

    // Abort of remove: the bitmap comes back persistent and is stored again on close.
    {
        let mut img = Image::open(&path, true).unwrap();
        let mut t = Transaction::new();
        t.remove(&mut img, b"p").unwrap();
        t.add(&mut img, b"q", 65536, popts).unwrap();
        let p = img.find_bitmap(b"p").unwrap();
        assert!(img.bitmap_current(p).unwrap().busy());
        assert!(!img.bitmap_current(p).unwrap().persistence());
        t.abort(&mut [&mut img]).unwrap();
        let b = img.bitmap_current(p).unwrap();
        assert!(!b.busy() && !b.skip_store() && b.persistent() && b.persistence());
        assert_eq!(b.sha256().unwrap(), sha_p);
        assert!(img.find_bitmap(b"q").is_none(), "abort of add");
        img.close().unwrap();
    }
    {
        let mut img = Image::open(&path, false).unwrap();
        let p = img
            .find_bitmap(b"p")
            .expect("aborted remove: stored again on close");
        assert_eq!(img.bitmap_current(p).unwrap().sha256().unwrap(), sha_p);
        assert!(img.find_bitmap(b"q").is_none(), "aborted add not stored");
        assert!(img.find_bitmap(b"keep").is_some());
        img.close().unwrap();
    }

    // Commit of remove: gone from memory and from the file.
    {
        let mut img = Image::open(&path, true).unwrap();
        let mut t = Transaction::new();
        t.remove(&mut img, b"p").unwrap();
        t.commit(&mut [&mut img]).unwrap();
        assert!(img.find_bitmap(b"p").is_none());
        img.close().unwrap();
    }
    let img = Image::open(&path, false).unwrap();
    assert!(img.find_bitmap(b"p").is_none());
    assert!(img.find_bitmap(b"keep").is_some());
    img.close().unwrap();
}

#[test]
fn transaction_random_sequences_abort_exactly() {
    let size = 3 * MIB + 512;
    let names = ["a", "b", "c", "d", "e"];
    for seed in 0..20u64 {
        let mut rng = Prng::new(1000 + seed);
        let mut img = filled_memory_image(size, seed, SPECS);
        let before = snap(&mut img);
        let mut t = Transaction::new();
        let mut ok = 0;
        for step in 0..12 {
            let n = names[rng.below(names.len() as u64) as usize].as_bytes();
            let r = match rng.below(6) {
                0 => t
                    .add(
                        &mut img,
                        format!("n{step}").as_bytes(),
                        512 << rng.below(8),
                        AddOptions::default(),
                    )
                    .map(drop),
                1 => t.clear(&mut img, n),
                2 => t.enable(&mut img, n),
                3 => t.disable(&mut img, n),
                4 => {
                    let s = names[rng.below(names.len() as u64) as usize].as_bytes();
                    t.merge(&mut img, n, None, s)
                }
                _ => t.remove(&mut img, n),
            };
            if r.is_ok() {
                ok += 1;
            }
            assert_eq!(t.len(), ok, "seed {seed} step {step}");
        }
        t.abort(&mut [&mut img]).unwrap();
        assert_eq!(snap(&mut img), before, "seed {seed}: abort");
    }
}

// ------------------------------------------------------------------------------------------
// Random operation sequences on a BitmapSet against a state model
// ------------------------------------------------------------------------------------------

#[derive(Clone, Debug)]
struct MBm {
    id: BitmapId,
    name: Option<String>,
    m: Model,
    enabled: bool,
    busy: bool,
    persistent: bool,
    successor: Option<BitmapId>,
}

struct MSet {
    size: u64,
    list: Vec<MBm>, // newest first
}

impl MSet {
    fn idx(&self, id: BitmapId) -> usize {
        self.list.iter().position(|b| b.id == id).unwrap()
    }
    fn get(&self, id: BitmapId) -> &MBm {
        &self.list[self.idx(id)]
    }
    fn get_mut(&mut self, id: BitmapId) -> &mut MBm {
        let i = self.idx(id);
        &mut self.list[i]
    }
    fn recording(&self, b: &MBm) -> bool {
        b.enabled || b.successor.is_some_and(|s| self.get(s).enabled)
    }
    fn named(&self) -> Vec<BitmapId> {
        self.list
            .iter()
            .filter(|b| b.name.is_some())
            .map(|b| b.id)
            .collect()
    }
}

fn compare(set: &mut BitmapSet, ms: &MSet, ctx: &str) {
    assert_eq!(set.size(), ms.size, "{ctx}: size");
    assert_eq!(
        set.ids(),
        ms.list.iter().map(|b| b.id).collect::<Vec<_>>(),
        "{ctx}: list order"
    );
    let q = set.query().unwrap();
    assert_eq!(q.len(), ms.list.len());
    for (mb, qi) in ms.list.iter().zip(&q) {
        let c = format!("{ctx}: bitmap {:?} #{}", mb.name, mb.id.0);
        let b = bm(set, mb.id);
        assert_eq!(
            b.name().map(|n| String::from_utf8_lossy(n).into_owned()),
            mb.name,
            "{c}: name"
        );
        assert_eq!(b.enabled(), mb.enabled, "{c}: enabled");
        assert_eq!(b.busy(), mb.busy, "{c}: busy");
        assert_eq!(b.persistent(), mb.persistent, "{c}: persistent");
        assert_eq!(b.successor(), mb.successor, "{c}: successor");
        assert_bits(b, &mb.m, &c);
        // query snapshot
        assert_eq!(qi.id, mb.id);
        assert_eq!(
            qi.name
                .as_ref()
                .map(|n| String::from_utf8_lossy(n).into_owned()),
            mb.name,
            "{c}: query name"
        );
        assert_eq!(qi.count, mb.m.count(), "{c}: query count");
        assert_eq!(qi.granularity, mb.m.g, "{c}: query granularity");
        assert_eq!(qi.recording, ms.recording(mb), "{c}: query recording");
        assert_eq!(set.recording(mb.id), ms.recording(mb), "{c}: recording");
        assert_eq!(qi.busy, mb.busy, "{c}: query busy");
        assert_eq!(qi.persistent, mb.persistent, "{c}: query persistent");
        assert!(!qi.inconsistent);
    }
}

fn pick(rng: &mut Prng, v: &[BitmapId]) -> Option<BitmapId> {
    if v.is_empty() {
        None
    } else {
        Some(v[rng.below(v.len() as u64) as usize])
    }
}

fn random_sequence(seed: u64, steps: usize) {
    let mut rng = Prng::new(seed);
    let size = 2 * MIB + rng.below(2 * MIB);
    let mut set = BitmapSet::new(size);
    let mut ms = MSet {
        size,
        list: Vec::new(),
    };
    let grans = [512u64, 1024, 4096, 65536, MIB];
    let mut counter = 0;
    for step in 0..steps {
        let op = rng.below(15);
        let ctx = format!("seed {seed} step {step} op {op}");
        let named = ms.named();
        match op {
            0 | 1 if ms.list.len() < 8 => {
                counter += 1;
                let name = format!("b{counter}");
                let g = grans[rng.below(grans.len() as u64) as usize];
                let id = set.create(Some(name.as_bytes()), g).unwrap();
                let disabled = rng.below(2) == 0;
                if disabled {
                    bm_mut(&mut set, id).disable().unwrap();
                }
                let persistent = rng.below(2) == 0;
                bm_mut(&mut set, id).set_persistence(persistent);
                ms.list.insert(
                    0,
                    MBm {
                        id,
                        name: Some(name.clone()),
                        m: Model::new(ms.size, g),
                        enabled: !disabled,
                        busy: false,
                        persistent,
                        successor: None,
                    },
                );
                assert!(matches!(
                    set.create(Some(name.as_bytes()), 512),
                    Err(Error::BitmapExists { .. })
                ));
            }
            2..=4 => {
                // Guest write hook.
                let o = rng.below(ms.size + 8192);
                let l = rng.below(200_000);
                set.set_dirty(o, l);
                for b in &mut ms.list {
                    if b.enabled {
                        b.m.set(o, l);
                    }
                }
            }
            5 => {
                let Some(id) = pick(&mut rng, &named) else {
                    continue;
                };
                let o = rng.below(ms.size);
                let l = rng.below(ms.size - o + 1);
                bm_mut(&mut set, id).set_dirty(o, l).unwrap();
                ms.get_mut(id).m.set(o, l);
                // Aligned reset somewhere.
                let g = ms.get(id).m.g;
                let ro = rng.below(ms.size.div_ceil(g)) * g;
                let rl = if rng.below(2) == 0 {
                    ms.size - ro
                } else {
                    (rng.below(20) * g).min(ms.size - ro)
                };
                let rl = if rl % g != 0 && ro + rl != ms.size {
                    rl / g * g
                } else {
                    rl
                };
                bm_mut(&mut set, id).reset_dirty(ro, rl).unwrap();
                ms.get_mut(id).m.reset(ro, rl);
                // Unaligned reset refused.
                if g > 512 && ms.size > g {
                    assert!(matches!(
                        bm_mut(&mut set, id).reset_dirty(g / 2, g),
                        Err(Error::Precondition(_))
                    ));
                }
            }
            6 => {
                let Some(id) = pick(&mut rng, &named) else {
                    continue;
                };
                let r = bm_mut(&mut set, id).clear();
                if ms.get(id).busy {
                    assert!(matches!(r, Err(Error::Busy { .. })), "{ctx}");
                } else {
                    r.unwrap();
                    ms.get_mut(id).m.clear();
                }
            }
            7 => {
                let Some(id) = pick(&mut rng, &named) else {
                    continue;
                };
                let en = rng.below(2) == 0;
                let b = bm_mut(&mut set, id);
                let r = if en { b.enable() } else { b.disable() };
                if ms.get(id).busy {
                    assert!(matches!(r, Err(Error::Busy { .. })), "{ctx}");
                } else {
                    r.unwrap();
                    ms.get_mut(id).enabled = en;
                }
            }
            8 => {
                let Some(id) = pick(&mut rng, &named) else {
                    continue;
                };
                let r = set.create_successor(id);
                let p = ms.get(id).clone();
                if p.busy {
                    let e = expect_err(r, &ctx);
                    assert_eq!(e.to_string(), busy_msg(p.name.as_deref().unwrap()));
                } else if p.successor.is_some() {
                    let e = expect_err(r, &ctx);
                    assert_eq!(
                        e.to_string(),
                        "Cannot create a successor for a bitmap that already has one"
                    );
                } else {
                    let s = r.unwrap();
                    ms.list.insert(
                        0,
                        MBm {
                            id: s,
                            name: None,
                            m: Model::new(ms.size, p.m.g),
                            enabled: p.enabled,
                            busy: false,
                            persistent: false,
                            successor: None,
                        },
                    );
                    let pm = ms.get_mut(id);
                    pm.enabled = false;
                    pm.busy = true;
                    pm.successor = Some(s);
                }
            }
            9 => {
                let Some(id) = pick(&mut rng, &named) else {
                    continue;
                };
                let r = set.abdicate(id);
                match ms.get(id).successor {
                    None => {
                        expect_err(r, &ctx);
                    }
                    Some(s) => {
                        assert_eq!(r.unwrap(), s);
                        let p = ms.list.remove(ms.idx(id));
                        let c = ms.get_mut(s);
                        c.name = p.name;
                        c.persistent = p.persistent;
                    }
                }
            }
            10 => {
                let Some(id) = pick(&mut rng, &named) else {
                    continue;
                };
                let r = set.reclaim(id);
                match ms.get(id).successor {
                    None => {
                        expect_err(r, &ctx);
                    }
                    Some(s) => {
                        assert_eq!(r.unwrap(), id);
                        let c = ms.list.remove(ms.idx(s));
                        let p = ms.get_mut(id);
                        p.m.or_from(&c.m);
                        p.enabled = c.enabled;
                        p.busy = false;
                        p.successor = None;
                    }
                }
            }
            11 => {
                let Some(id) = pick(&mut rng, &named) else {
                    continue;
                };
                if rng.below(2) == 0 {
                    let r = set.enable_successor(id);
                    match ms.get(id).successor {
                        None => assert!(r.is_err(), "{ctx}"),
                        Some(s) => {
                            r.unwrap();
                            ms.get_mut(s).enabled = true;
                        }
                    }
                } else if ms.get(id).successor.is_none() {
                    // NBD-export-style lock without a successor.
                    let busy = !ms.get(id).busy;
                    bm_mut(&mut set, id).set_busy(busy);
                    ms.get_mut(id).busy = busy;
                }
            }
            12 => {
                let (Some(t), Some(s)) = (pick(&mut rng, &named), pick(&mut rng, &named)) else {
                    continue;
                };
                let src = bm(&mut set, s).clone();
                let before = bm(&mut set, t).sha256().unwrap();
                let r = set.merge(t, &src, false);
                let (tb, sb) = (ms.get(t).clone(), ms.get(s).clone());
                if sb.busy {
                    let e = expect_err(r, &ctx);
                    assert_eq!(e.to_string(), busy_msg(sb.name.as_deref().unwrap()));
                    assert_eq!(bm(&mut set, t).sha256().unwrap(), before);
                } else if tb.busy {
                    let e = expect_err(r, &ctx);
                    assert_eq!(e.to_string(), busy_msg(tb.name.as_deref().unwrap()));
                    assert_eq!(bm(&mut set, t).sha256().unwrap(), before);
                } else {
                    assert!(r.unwrap().is_none());
                    ms.get_mut(t).m.or_from(&sb.m);
                }
            }
            13 => {
                let new = 1 + rng.below(4 * MIB);
                let r = set.truncate(new);
                if ms.list.iter().any(|b| b.busy || b.successor.is_some()) {
                    assert!(matches!(r, Err(Error::Precondition(_))), "{ctx}");
                } else {
                    r.unwrap();
                    ms.size = new;
                    for b in &mut ms.list {
                        b.m.truncate(new);
                    }
                }
            }
            _ => {
                // Iterate a random bitmap (successors too), or release a named one.
                let all: Vec<BitmapId> = ms.list.iter().map(|b| b.id).collect();
                if rng.below(3) == 0 {
                    let Some(id) = pick(&mut rng, &named) else {
                        continue;
                    };
                    let r = set.release(id);
                    let b = ms.get(id);
                    if b.busy || b.successor.is_some() {
                        assert!(matches!(r, Err(Error::Held { .. })), "{ctx}");
                    } else {
                        r.unwrap();
                        ms.list.remove(ms.idx(id));
                    }
                } else if let Some(id) = pick(&mut rng, &all) {
                    let mut it = set.iter_new(id).unwrap();
                    let mut got = Vec::new();
                    while let Some(o) = set.iter_next(&mut it).unwrap() {
                        got.push(o);
                    }
                    set.iter_free(it);
                    assert_eq!(got, ms.get(id).m.starts(), "{ctx}: iteration");
                }
            }
        }
        compare(&mut set, &ms, &ctx);
    }
}

#[test]
fn random_sequences_match_the_model() {
    for seed in 1..=6 {
        random_sequence(seed, 250);
    }
}

#[test]
fn write_hook_skips_disabled_readonly_inconsistent_and_clamps() {
    let size = MIB + 100;
    let mut set = BitmapSet::new(size);
    let en = set.create(Some(b"en"), 512).unwrap();
    let dis = set.create(Some(b"dis"), 512).unwrap();
    let ro = set.create(Some(b"ro"), 512).unwrap();
    let inc = set.create(Some(b"inc"), 512).unwrap();
    let anon = set.create(None, 4096).unwrap();
    bm_mut(&mut set, dis).disable().unwrap();
    bm_mut(&mut set, ro).set_readonly(true);
    bm_mut(&mut set, inc).set_persistence(true);
    bm_mut(&mut set, inc).set_inconsistent().unwrap();
    assert!(set.has_named());
    set.set_dirty(size - 50, 10_000);
    set.set_dirty(size, 10);
    set.set_dirty(0, 0);
    let mut m = Model::new(size, 512);
    m.set(size - 50, 10_000);
    assert_bits(bm(&mut set, en), &m, "enabled");
    let mut ma = Model::new(size, 4096);
    ma.set(size - 50, 50);
    assert_bits(
        bm(&mut set, anon),
        &ma,
        "anonymous enabled bitmaps record too",
    );
    for id in [dis, ro] {
        assert_eq!(bm(&mut set, id).count(), 0);
    }
    // An inconsistent bitmap has no bits: it reads as entirely dirty, never clean.
    assert_eq!(bm(&mut set, inc).count(), size.div_ceil(512) * 512);
    let q = set.query().unwrap();
    let qi = q.iter().find(|q| q.id == inc).unwrap();
    assert!(qi.inconsistent && qi.persistent && !qi.recording);
    assert_eq!(q.iter().find(|q| q.id == anon).unwrap().name, None);
    assert_eq!(set.find(b"(null)"), None);
}

/// A successor belongs to its parent until abdicate or reclaim: releasing it on its own must be
/// refused (QEMU never does it; its invariants say a successor lives exactly as long as the
/// parent is frozen). Today `release(successor)` succeeds, after which `reclaim(parent)` panics
/// and `abdicate(parent)` drops the parent and its bits and returns an error.
#[test]
fn release_of_a_successor_is_refused() {
    let mut set = BitmapSet::new(MIB);
    let b = set.create(Some(b"b"), 4096).unwrap();
    set.set_dirty(0, 1);
    let s = set.create_successor(b).unwrap();
    assert!(
        set.release(s).is_err(),
        "release of a successor must be refused"
    );
    set.reclaim(b).unwrap();
    assert_eq!(bm(&mut set, b).count(), 4096);
}
