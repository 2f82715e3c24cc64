//! Data for unit tests, written once: bytes that look random to zstd and to the eye.
//!
//! Must never: be compiled outside `cfg(test)`.

/// `len` bytes of xorshift noise from `seed` (the same seed, the same bytes); zstd cannot
/// shrink them.
pub(crate) fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}
