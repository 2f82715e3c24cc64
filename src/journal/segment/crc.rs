//! CRC32C of a concatenation from its parts' CRCs, in a few dozen instructions.
//!
//! A segment's body CRC covers every stored payload, and each record also carries the CRC of
//! its own payload. A raw payload is both, so computing both over its bytes reads them twice;
//! [`combine`] extends the body's CRC by the payload's instead. `crc32c::crc32c_combine`
//! (zlib's algorithm) builds its zero-shift operators anew on every call by squaring 32×32
//! bit matrices, several microseconds for a 4 KiB payload (more than a hardware CRC of the
//! bytes); here the operators for 2^k zero bytes are built once per process, so a combine is
//! one matrix-vector product per set bit of the length (one for 4 KiB).
//!
//! Must never: give a different value than the CRC of the concatenated bytes (tested against
//! it and against the crate's combine).

use std::sync::OnceLock;

/// Operators for 2^k zero bytes exist for k below this: lengths up to 2^48 bytes.
const SHIFTS: usize = 48;

/// A linear map on the 32-bit CRC register over GF(2): column `i` is the image of bit `i`.
type Operator = [u32; 32];

/// `op` applied to `v`.
fn apply(op: &Operator, mut v: u32) -> u32 {
    let mut out = 0;
    let mut i = 0;
    while v != 0 {
        if v & 1 != 0 {
            out ^= op[i];
        }
        v >>= 1;
        i += 1;
    }
    out
}

/// `op` after itself.
fn square(op: &Operator) -> Operator {
    let mut out = [0; 32];
    for (o, &column) in out.iter_mut().zip(op) {
        *o = apply(op, column);
    }
    out
}

/// The operators for 1, 2, 4, … zero bytes.
fn shifts() -> &'static [Operator; SHIFTS] {
    static SHIFTS_TABLE: OnceLock<[Operator; SHIFTS]> = OnceLock::new();
    SHIFTS_TABLE.get_or_init(|| {
        // One zero bit: the register shifts right, feeding the (reflected) polynomial back.
        let mut bit = [0u32; 32];
        bit[0] = 0x82F6_3B78;
        for (i, b) in bit.iter_mut().enumerate().skip(1) {
            *b = 1 << (i - 1);
        }
        let mut op = square(&square(&square(&bit)));
        let mut table = [[0; 32]; SHIFTS];
        for t in table.iter_mut() {
            *t = op;
            op = square(&op);
        }
        table
    })
}

/// The CRC32C of `a ‖ b`, given `crc_a` = CRC32C(a), `crc_b` = CRC32C(b) and `len_b` = |b|.
pub(crate) fn combine(crc_a: u32, crc_b: u32, len_b: usize) -> u32 {
    let table = shifts();
    let mut crc = crc_a;
    let mut len = len_b as u64;
    let mut k = 0;
    while len != 0 {
        if len & 1 != 0 {
            crc = apply(&table[k], crc);
        }
        len >>= 1;
        k += 1;
    }
    crc ^ crc_b
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn combine_is_the_crc_of_the_concatenation(
            a in proptest::collection::vec(any::<u8>(), 0..3000),
            b in proptest::collection::vec(any::<u8>(), 0..9000),
        ) {
            let whole = crc32c::crc32c(&[a.as_slice(), b.as_slice()].concat());
            let (ca, cb) = (crc32c::crc32c(&a), crc32c::crc32c(&b));
            prop_assert_eq!(combine(ca, cb, b.len()), whole);
            prop_assert_eq!(combine(ca, cb, b.len()), crc32c::crc32c_combine(ca, cb, b.len()));
        }
    }

    #[test]
    fn long_lengths_match_the_crates_combine() {
        for len in [4096usize, 65536, 1 << 20, (8 << 20) + 4095, (1 << 40) + 3] {
            assert_eq!(
                combine(0x1234_5678, 0x9abc_def0, len),
                crc32c::crc32c_combine(0x1234_5678, 0x9abc_def0, len),
                "{len}"
            );
        }
    }
}
