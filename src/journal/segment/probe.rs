//! Deciding which payloads are worth offering to zstd before they are pushed into a segment:
//! one policy for the journal writer's records and the replay agent's undo pre-images.
//!
//! The segment codec stores each payload raw unless zstd saves at least 1/8 of it, and it
//! says which per payload (the index entry's `compressed` flag), so a segment with some
//! payloads never offered to zstd is the same format and reads like any other. What this
//! saves is the attempt: a disk of already-compressed or encrypted data gives payloads that
//! never shrink, and trying costs more CPU than everything else done per byte.
//!
//! - A large payload (at least [`SAMPLE_FROM`]) is offered when a sample of it compresses:
//!   [`SAMPLES`] pieces of [`SAMPLE_PIECE`] bytes spread over it, compressed together.
//! - A small payload follows the run: after [`MISSES_BEFORE_SKIP`] payloads in a row that
//!   did not compress, only one in [`RETRY_EVERY`] is offered, until one compresses again.
//!
//! Must never: change what a segment decodes to (this only chooses raw or zstd storage);
//! let a wrong guess cost more than a sample's compression per payload.

/// Payloads at least this long are judged by a sample.
pub(crate) const SAMPLE_FROM: usize = 32 << 10;
/// Bytes per sample piece.
pub(crate) const SAMPLE_PIECE: usize = 2 << 10;
/// Pieces per sample, evenly spread (the first at the payload's start).
pub(crate) const SAMPLES: usize = 4;
/// Small payloads that did not compress, in a row, before the probe starts skipping.
pub(crate) const MISSES_BEFORE_SKIP: u32 = 4;
/// While skipping, one small payload in this many is still offered.
pub(crate) const RETRY_EVERY: u32 = 16;
/// The codec's threshold for storing compressed: zstd must save 1/8.
const WORTH: usize = 8;
/// Shorter payloads are stored raw by the codec anyway.
const MIN_LEN: usize = 64;
/// zstd level of the sample (the codec's).
const LEVEL: i32 = 1;

/// The probe for one undo segment's payloads, in order.
#[derive(Default)]
pub(crate) struct CompressProbe {
    /// Small payloads in a row that were offered and stayed raw.
    misses: u32,
    /// Small payloads skipped since the last one offered.
    skipped: u32,
    /// Created on the first sample; `None` after zstd could not allocate one (then large
    /// payloads are offered, as without a probe).
    compressor: Option<zstd::bulk::Compressor<'static>>,
    sample: Vec<u8>,
    out: Vec<u8>,
}

impl std::fmt::Debug for CompressProbe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CompressProbe")
            .field("misses", &self.misses)
            .field("skipped", &self.skipped)
            .finish()
    }
}

impl CompressProbe {
    pub(crate) fn new() -> Self {
        Self::default()
    }

    /// Whether `payload` should be offered to zstd. A small payload that is offered must be
    /// followed by [`observe`](Self::observe) with what the codec did.
    pub(crate) fn offer(&mut self, payload: &[u8]) -> bool {
        if payload.len() < MIN_LEN {
            return false;
        }
        if payload.len() >= SAMPLE_FROM {
            return self.sample_compresses(payload);
        }
        if self.misses < MISSES_BEFORE_SKIP {
            return true;
        }
        self.skipped += 1;
        if self.skipped >= RETRY_EVERY {
            self.skipped = 0;
            return true;
        }
        false
    }

    /// What the codec did with a small payload that [`offer`](Self::offer) offered.
    pub(crate) fn observe(&mut self, payload_len: usize, compressed: bool) {
        if (MIN_LEN..SAMPLE_FROM).contains(&payload_len) {
            self.misses = if compressed {
                0
            } else {
                self.misses.saturating_add(1)
            };
        }
    }

    fn sample_compresses(&mut self, payload: &[u8]) -> bool {
        self.sample.clear();
        let stride = payload.len() / SAMPLES;
        for i in 0..SAMPLES {
            let start = i * stride;
            let end = (start + SAMPLE_PIECE).min(payload.len());
            self.sample.extend_from_slice(&payload[start..end]);
        }
        if self.compressor.is_none() {
            match zstd::bulk::Compressor::new(LEVEL) {
                Ok(c) => self.compressor = Some(c),
                // Cannot judge: offer it, as the codec would without a probe.
                Err(_) => return true,
            }
        }
        let limit = self.sample.len() - self.sample.len() / WORTH;
        self.out.resize(limit, 0);
        let compressor = self.compressor.as_mut().expect("created above");
        // "Destination too small" is exactly "does not save 1/8".
        compressor
            .compress_to_buffer(&self.sample, &mut self.out[..])
            .is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn noise(len: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    #[test]
    fn large_payloads_are_judged_by_a_sample() {
        let mut p = CompressProbe::new();
        assert!(!p.offer(&noise(1 << 20, 1)), "random bytes are not offered");
        assert!(p.offer(&vec![7u8; 1 << 20]), "a repeated byte is offered");
        // Half data, half zeroes: the sample sees both, and zstd would save a third.
        let mut mixed = noise(1 << 20, 2);
        mixed[1 << 19..].fill(0);
        assert!(p.offer(&mixed));
        assert!(!p.offer(&[1u8; 32]), "too short for zstd to pay");
    }

    #[test]
    fn small_payloads_follow_the_run_and_retry_now_and_then() {
        let mut p = CompressProbe::new();
        let random = noise(4096, 3);
        for _ in 0..MISSES_BEFORE_SKIP {
            assert!(p.offer(&random));
            p.observe(random.len(), false);
        }
        let offered: Vec<bool> = (0..2 * RETRY_EVERY)
            .map(|_| {
                let o = p.offer(&random);
                if o {
                    p.observe(random.len(), false);
                }
                o
            })
            .collect();
        assert_eq!(offered.iter().filter(|&&o| o).count(), 2, "{offered:?}");
        // Once a retried payload compresses, every payload is offered again.
        while !p.offer(&random) {}
        p.observe(random.len(), true);
        assert!((0..MISSES_BEFORE_SKIP).all(|_| p.offer(&random)));
    }
}
