//! Fast incompressible bytes for the benchmark journal generators (`examples/*_bench_journal.rs`
//! include this file): xorshift64*, seeded, so a run is repeatable.
//!
//! Must never: be used where randomness matters for safety; it only has to defeat zstd.

use bytes::Bytes;

/// xorshift64*: fast incompressible bytes.
pub struct Noise(pub u64);

impl Noise {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub fn bytes(&mut self, len: usize) -> Bytes {
        let mut buf = Vec::with_capacity(len + 8);
        while buf.len() < len {
            buf.extend_from_slice(&self.next().to_le_bytes());
        }
        buf.truncate(len);
        Bytes::from(buf)
    }
}
