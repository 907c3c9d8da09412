//! Deterministic hashing and seed expansion, shared by the crates that need the same bytes on
//! every machine: weight and data fingerprints, seeded tiny-model weights, and the state of the
//! samplers' random generator (`scheduler::SeededRng`).
//!
//! * [`Fnv64`]: FNV-1a, 64 bits (a cheap, stable digest; not for security).
//! * [`SplitMix64`]: Steele, Lea and Flood's SplitMix64, the usual way to turn one 64-bit seed
//!   into a stream of well-mixed words.
//!
//! ```
//! let mut h = seeded::Fnv64::new();
//! h.feed(b"unet.conv_in.weight");
//! let mut s = seeded::SplitMix64::new(h.finish());
//! assert_ne!(s.next_u64(), s.next_u64());
//! ```

/// FNV-1a, 64 bits.
///
/// ```
/// let mut h = seeded::Fnv64::new();
/// h.feed(b"a");
/// assert_eq!(h.finish(), 0xaf63dc4c8601ec8c);
/// ```
#[derive(Debug, Clone)]
pub struct Fnv64(u64);

impl Fnv64 {
    const OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x100_0000_01b3;

    /// The offset basis.
    pub fn new() -> Self {
        Fnv64(Self::OFFSET_BASIS)
    }

    /// The offset basis xor `seed`: a family of hashes, one per seed.
    pub fn with_seed(seed: u64) -> Self {
        Fnv64(Self::OFFSET_BASIS ^ seed)
    }

    /// Mixes in `bytes`.
    pub fn feed(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 ^= b as u64;
            self.0 = self.0.wrapping_mul(Self::PRIME);
        }
    }

    /// The hash so far.
    pub fn finish(&self) -> u64 {
        self.0
    }
}

impl Default for Fnv64 {
    fn default() -> Self {
        Self::new()
    }
}

/// Where the values of fresh weights come from: the one generator a model constructor is given
/// (never Burn's global one), so a new model is a function of its seed alone, on any backend.
/// Values are asked for in the order the constructor documents.
///
/// ```
/// use seeded::Init;
/// let mut rng = seeded::SplitMix64::new(7);
/// let w = rng.uniform(4, 0.5);
/// assert!(w.len() == 4 && w.iter().all(|v| v.abs() <= 0.5));
/// ```
pub trait Init {
    /// `n` values uniform in `[-bound, bound)`.
    fn uniform(&mut self, n: usize, bound: f64) -> Vec<f32>;
}

impl Init for SplitMix64 {
    fn uniform(&mut self, n: usize, bound: f64) -> Vec<f32> {
        (0..n).map(|_| (((self.next_u64() >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0) * bound) as f32).collect()
    }
}

/// SplitMix64: a 64-bit state advanced by the golden-ratio increment, each output mixed.
///
/// ```
/// let mut s = seeded::SplitMix64::new(0);
/// assert_eq!(s.next_u64(), 0xe220a8397b1dcdaf);
/// let u = s.next_open01();
/// assert!(u > 0.0 && u <= 1.0);
/// ```
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    /// A stream from `seed`.
    pub fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }

    /// The next 64 bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// 53 random bits as a float in (0, 1]: never 0, so `ln` of it is finite (Box-Muller).
    pub fn next_open01(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 1.0) / (1u64 << 53) as f64
    }
}
