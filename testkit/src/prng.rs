//! The pseudo-random numbers of the tests and benchmarks: one generator, seeded by each test, so
//! that a failure replays exactly.

/// A small deterministic PRNG (xorshift64*).
pub struct Prng(u64);

impl Prng {
    /// A generator whose sequence depends only on `seed` (any value, 0 included).
    pub fn new(seed: u64) -> Prng {
        Prng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    /// The next 64 pseudo-random bits.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform-ish in [0, n).
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next_u64() % n
        }
    }
    /// Uniform-ish index into a slice of `len` elements: [0, len), 0 for an empty one.
    pub fn index(&mut self, len: usize) -> usize {
        self.below(len as u64) as usize
    }
}
