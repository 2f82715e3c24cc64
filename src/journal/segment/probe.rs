//! Deciding which payloads are worth offering to zstd before they are pushed into a segment:
//! one policy for the journal writer's records and the replay agent's undo pre-images.
//!
//! The segment codec stores each payload raw unless zstd saves at least 1/8 of it, and it
//! says which per payload (the index entry's `compressed` flag), so a segment with some
//! payloads never offered to zstd is the same format and reads like any other. What this
//! saves is the attempt: a disk of already-compressed or encrypted data gives payloads that
//! never shrink, and trying costs more CPU than everything else done per byte.
//!
//! - A large payload (at least [`SAMPLE_FROM`]) is offered when a sample of it compresses by
//!   a quarter: [`SAMPLES`] pieces of [`SAMPLE_PIECE`] bytes spread over it, compressed
//!   together.
//! - Small payloads are judged in windows of [`WINDOW`] offered payloads: when a window's
//!   payloads together lost less than a quarter of their bytes, the next [`SKIP`] small
//!   payloads are stored raw, then zstd is tried again; each further window in a row that
//!   does not pay doubles the skip, up to [`MAX_SKIP`], and one that pays resets it. By
//!   bytes, not by payloads in a row: half of fio's 4 KiB buffers shrink by 15 %, which kept
//!   a "misses in a row" rule offering every payload (about 5 µs of zstd per record for 8 %
//!   of the bytes).
//!
//! Why the skip grows: zstd on a 4 KiB payload that does not shrink costs more than
//! everything else the journal does for the record, so even a window of 32 tried per 1,056
//! records (3 %) was 4 to 5 % of a journaled 4 KiB write's CPU in `bench/profile.sh`, with
//! fio's data, of which nothing compressed. At [`MAX_SKIP`] it is 0.1 %; data that starts to
//! compress is noticed within `MAX_SKIP` records (128 MiB of 4 KiB writes).
//!
//! The bar is a quarter ([`PAYS`]), not the codec's 1/8 for one payload: data that saves
//! between the two (fio's buffers save about 15 % in all) cost a zstd call per 4 KiB record,
//! 4 % of a journaled write's CPU in `bench/profile.sh`, and a decompression for every
//! reader, to store 15 % fewer bytes. An offered payload is still stored compressed when it
//! saves 1/8.
//!
//! Must never: change what a segment decodes to (this only chooses raw or zstd storage);
//! let a wrong guess cost more than a sample's compression per payload.

/// Payloads at least this long are judged by a sample.
pub(crate) const SAMPLE_FROM: usize = 32 << 10;
/// Bytes per sample piece.
pub(crate) const SAMPLE_PIECE: usize = 2 << 10;
/// Pieces per sample, evenly spread (the first at the payload's start).
pub(crate) const SAMPLES: usize = 4;
/// Small payloads per judging window.
pub(crate) const WINDOW: u32 = 32;
/// Small payloads stored raw after a window that did not pay, before zstd is tried again.
pub(crate) const SKIP: u32 = 1024;
/// The longest skip, reached after windows in a row that did not pay (`SKIP` doubled).
pub(crate) const MAX_SKIP: u32 = 32 * 1024;
/// zstd is worth offering where it saves at least 1/PAYS of the bytes (see the module
/// documentation for why a quarter, where the codec stores anything that saves 1/8).
const PAYS: usize = 4;
/// Shorter payloads are stored raw by the codec anyway.
const MIN_LEN: usize = 64;
/// zstd level of the sample (the codec's).
const LEVEL: i32 = 1;

/// The probe for a stream of payloads (a writer's records, an undo segment's pre-images),
/// in order.
#[derive(Default)]
pub(crate) struct CompressProbe {
    /// Small payloads offered in the current window, their bytes, and the bytes zstd saved.
    seen: u32,
    offered: u64,
    saved: u64,
    /// Small payloads still to store raw before zstd is tried again (0: offering).
    skipping: u32,
    /// The skip after the next window that does not pay (`SKIP` to `MAX_SKIP`; 0 means
    /// `SKIP`, so the derived default is right).
    next_skip: u32,
    /// Created on the first sample; `None` after zstd could not allocate one (then large
    /// payloads are offered, as without a probe).
    compressor: Option<zstd::bulk::Compressor<'static>>,
    sample: Vec<u8>,
    out: Vec<u8>,
}

impl std::fmt::Debug for CompressProbe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CompressProbe")
            .field("seen", &self.seen)
            .field("skipping", &self.skipping)
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
        if self.skipping > 0 {
            self.skipping -= 1;
            return false;
        }
        true
    }

    /// What the codec did with a small payload that [`offer`](Self::offer) offered: it takes
    /// `stored_len` bytes in the segment (its own length when stored raw).
    pub(crate) fn observe(&mut self, payload_len: usize, stored_len: usize) {
        if !(MIN_LEN..SAMPLE_FROM).contains(&payload_len) {
            return;
        }
        self.seen += 1;
        self.offered += payload_len as u64;
        self.saved += payload_len.saturating_sub(stored_len) as u64;
        if self.seen >= WINDOW {
            if self.saved * (PAYS as u64) < self.offered {
                self.skipping = self.next_skip.max(SKIP);
                self.next_skip = (self.skipping * 2).min(MAX_SKIP);
            } else {
                self.next_skip = SKIP;
            }
            self.seen = 0;
            self.offered = 0;
            self.saved = 0;
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
        let limit = self.sample.len() - self.sample.len() / PAYS;
        self.out.resize(limit, 0);
        let compressor = self.compressor.as_mut().expect("created above");
        // "Destination too small" is exactly "does not save a quarter".
        compressor
            .compress_to_buffer(&self.sample, &mut self.out[..])
            .is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::noise;

    #[test]
    fn large_payloads_are_judged_by_a_sample() {
        let mut p = CompressProbe::new();
        assert!(!p.offer(&noise(1, 1 << 20)), "random bytes are not offered");
        assert!(p.offer(&vec![7u8; 1 << 20]), "a repeated byte is offered");
        // Half data, half zeroes: the sample sees both, and zstd would save a third.
        let mut mixed = noise(2, 1 << 20);
        mixed[1 << 19..].fill(0);
        assert!(p.offer(&mixed));
        assert!(!p.offer(&[1u8; 32]), "too short for zstd to pay");
    }

    /// Offers `n` small payloads of 4 KiB; `stored` gives each offered one's stored length.
    fn feed(p: &mut CompressProbe, n: u32, stored: impl Fn(u32) -> usize) -> u32 {
        let payload = noise(3, 4096);
        let mut offered = 0;
        for i in 0..n {
            if p.offer(&payload) {
                offered += 1;
                p.observe(payload.len(), stored(i));
            }
        }
        offered
    }

    #[test]
    fn small_payloads_that_do_not_pay_are_skipped_then_tried_again() {
        let mut p = CompressProbe::new();
        assert_eq!(
            feed(&mut p, WINDOW, |_| 4096),
            WINDOW,
            "the first window is offered"
        );
        assert_eq!(
            feed(&mut p, SKIP, |_| 4096),
            0,
            "then SKIP payloads are not"
        );
        assert_eq!(
            feed(&mut p, WINDOW, |_| 1024),
            WINDOW,
            "then zstd is tried again"
        );
        assert_eq!(
            feed(&mut p, 4 * WINDOW, |_| 1024),
            4 * WINDOW,
            "and kept while it pays"
        );
    }

    /// Data that never compresses is tried less and less often, down to one window per
    /// MAX_SKIP payloads; a window that pays brings the short skip back.
    #[test]
    fn the_skip_doubles_while_windows_do_not_pay() {
        let mut p = CompressProbe::new();
        let mut skip = SKIP;
        for _ in 0..8 {
            assert_eq!(feed(&mut p, WINDOW, |_| 4096), WINDOW, "a window is tried");
            assert_eq!(
                feed(&mut p, skip - 1, |_| 4096),
                0,
                "then {skip} are skipped"
            );
            assert_eq!(feed(&mut p, 1, |_| 4096), 0);
            skip = (skip * 2).min(MAX_SKIP);
        }
        assert_eq!(skip, MAX_SKIP, "the skip stops growing");
        // A window that pays, then one that does not: back to SKIP.
        assert_eq!(feed(&mut p, WINDOW, |_| 1024), WINDOW);
        assert_eq!(feed(&mut p, WINDOW, |_| 4096), WINDOW);
        assert_eq!(feed(&mut p, SKIP, |_| 4096), 0);
        assert_eq!(feed(&mut p, 1, |_| 4096), 1, "tried again after SKIP");
    }

    /// fio's 4 KiB buffers: every other one shrinks by 15 %, the rest not at all. Under a
    /// "misses in a row" rule zstd never stopped; by bytes the window saves 7.5 %: not enough.
    #[test]
    fn barely_compressible_data_is_judged_by_the_bytes_saved() {
        let mut p = CompressProbe::new();
        let half_shrink = |i: u32| if i % 2 == 0 { 4096 * 85 / 100 } else { 4096 };
        feed(&mut p, WINDOW, half_shrink);
        assert_eq!(feed(&mut p, SKIP, half_shrink), 0);
        // Every payload saving 15 %: the codec would store each compressed, but a window
        // under a quarter stops the attempts.
        let mut q = CompressProbe::new();
        feed(&mut q, WINDOW, |_| 4096 * 85 / 100);
        assert_eq!(feed(&mut q, SKIP, |_| 4096 * 85 / 100), 0);
        // A window saving exactly a quarter keeps zstd on.
        let mut r = CompressProbe::new();
        feed(&mut r, WINDOW, |_| 3072);
        assert_eq!(feed(&mut r, WINDOW, |_| 3072), WINDOW);
    }

    #[test]
    fn large_payloads_do_not_count_in_the_window() {
        let mut p = CompressProbe::new();
        for _ in 0..2 * WINDOW {
            p.observe(1 << 20, 1 << 20);
        }
        assert_eq!(
            feed(&mut p, 1, |_| 4096),
            1,
            "small payloads are still offered"
        );
    }
}
