//! Deterministic randomness from indices, never from threads: one permutation per
//! (seed, epoch), one stream per (seed, epoch, pair index).

/// SplitMix64 step (Steele, Lea, Flood 2014): a fast, well-mixed 64-bit generator.
fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

pub struct Rng(u64);

impl Rng {
    /// A stream keyed by a tuple of integers (order matters).
    pub fn keyed(parts: &[u64]) -> Self {
        let mut s = 0x6E63_705F_646C_6472u64; // "ncp_dldr"
        for p in parts {
            let mut t = s ^ p.wrapping_mul(0xD6E8_FEB8_6659_FD93);
            s = splitmix64(&mut t);
        }
        Rng(s)
    }

    pub fn next_u64(&mut self) -> u64 {
        splitmix64(&mut self.0)
    }

    /// Uniform integer in [0, n) (n > 0), by the multiply-shift map.
    pub fn below(&mut self, n: u64) -> u64 {
        ((self.next_u64() as u128 * n as u128) >> 64) as u64
    }

    /// Uniform float in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

const PERM_TAG: u64 = 0x7065_726D; // "perm"
const SAMPLE_TAG: u64 = 0x6175_6720; // "aug "

/// The permutation of 0..n for (seed, epoch) (Fisher-Yates).
pub fn permutation(n: usize, seed: u64, epoch: u64) -> Vec<u32> {
    let mut p: Vec<u32> = (0..n as u32).collect();
    let mut r = Rng::keyed(&[PERM_TAG, seed, epoch]);
    for i in (1..n).rev() {
        let j = r.below(i as u64 + 1) as usize;
        p.swap(i, j);
    }
    p
}

/// The augmentation stream of one pair in one epoch.
pub fn sample_rng(seed: u64, epoch: u64, index: u64) -> Rng {
    Rng::keyed(&[SAMPLE_TAG, seed, epoch, index])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permutation_is_a_permutation_and_depends_on_epoch() {
        let a = permutation(1000, 7, 0);
        let mut s = a.clone();
        s.sort();
        assert_eq!(s, (0..1000).collect::<Vec<u32>>());
        assert_eq!(a, permutation(1000, 7, 0));
        assert_ne!(a, permutation(1000, 7, 1));
        assert_ne!(a, permutation(1000, 8, 0));
    }

    #[test]
    fn below_is_in_range_and_roughly_uniform() {
        let mut r = Rng::keyed(&[1]);
        let mut counts = [0u32; 4];
        for _ in 0..40_000 {
            counts[r.below(4) as usize] += 1;
        }
        for c in counts {
            assert!((9_000..11_000).contains(&c), "{counts:?}");
        }
    }
}
