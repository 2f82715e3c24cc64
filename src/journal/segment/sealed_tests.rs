//! Encrypted segments: what the codec seals, that every reader path opens it with the key
//! the segment names, and that nothing opens without it or somewhere else.

use bytes::Bytes;
use uuid::Uuid;

use super::*;
use crate::crypto::{Key, OpenError};
use crate::journal::record::Op;

const KEY: &str = "journal/0/00000000000000000042";
const UNDO_KEY: &str = "undo/00000000000000000042";
const UUID: Uuid = Uuid::from_u128(0x5eed_0000_0000_0000_0000_0000_0000_0001);
const SEQ: u64 = 42;

fn expected() -> Expected {
    Expected {
        uuid: UUID,
        seq: SEQ,
        first_lsn: Some(100),
    }
}

/// Random-looking, incompressible bytes (so a window of them cannot occur by chance).
fn noise(len: usize, seed: u64) -> Bytes {
    let mut state = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        out.extend_from_slice(&state.to_le_bytes());
    }
    out.truncate(len);
    Bytes::from(out)
}

fn records() -> Vec<Record> {
    let ops = vec![
        Op::Epoch { epoch: 3 },
        Op::Write {
            offset: 4096,
            data: noise(4096, 1),
        },
        Op::Write {
            offset: 0,
            data: Bytes::from(vec![7u8; 8192]),
        },
        Op::Mark {
            name: "secret-mark-name".into(),
        },
        Op::Discard {
            offset: 0,
            len: 4096,
        },
        Op::Write {
            offset: 512,
            data: Bytes::new(),
        },
        Op::ResyncBegin,
        Op::ResyncData {
            offset: 8192,
            data: noise(4096, 2),
        },
        Op::ResyncEnd,
    ];
    ops.into_iter()
        .enumerate()
        .map(|(i, op)| Record {
            lsn: 100 + i as u64,
            timestamp_ns: 1_000 + i as u64,
            dev: 0,
            op,
        })
        .collect()
}

fn sealed(key: &Key, kind: crate::crypto::ObjectKind) -> Bytes {
    let mut b = SegmentBuilder::new(UUID, 3, SEQ, 100);
    b.set_sealing(Some(key.clone()));
    b.set_object_kind(kind);
    for r in records() {
        b.push(&r).unwrap();
    }
    let len = b.encoded_len();
    let out = b.finish();
    assert_eq!(out.len(), len, "encoded_len is exact for a sealed segment");
    out
}

fn key(seed: u8) -> Key {
    let k = Key::from_bytes(&[seed; 32]);
    crate::crypto::register(&k);
    k
}

#[test]
fn a_sealed_segment_holds_no_plaintext_window_and_decodes_to_the_same_records() {
    let k = key(0x31);
    let bytes = sealed(&k, crate::crypto::ObjectKind::JournalSegment);
    for r in records() {
        let payload = payload_bytes(&r.op);
        for w in payload.windows(16).step_by(7) {
            assert!(
                !bytes.windows(16).any(|b| b == w),
                "LSN {}: a 16-byte window of the payload is in the object",
                r.lsn
            );
        }
    }
    assert!(!bytes.windows(11).any(|w| w == b"secret-mark"));
    let decoded = decode_segment(KEY, &bytes, &expected()).unwrap();
    assert_eq!(decoded.records, records());
    // The header names the key; plaintext segments keep a zero reserved word.
    assert_eq!(
        u32::from_le_bytes(bytes[68..72].try_into().unwrap()),
        k.id().0
    );
    let plain = encode_segment(UUID, 3, SEQ, 100, &records()).unwrap();
    assert_eq!(&plain[68..72], &[0; 4]);
    assert_eq!(u16::from_le_bytes(plain[10..12].try_into().unwrap()), 0);
}

#[test]
fn ranged_payload_reads_open_one_unit_each() {
    let k = key(0x32);
    let bytes = sealed(&k, crate::crypto::ObjectKind::JournalSegment);
    let index = decode_index_from_tail(KEY, &bytes, bytes.len() as u64, &expected()).unwrap();
    for (entry, record) in index.entries.iter().zip(records()) {
        let range = entry.stored_range();
        let stored = &bytes[range.start as usize..range.end as usize];
        let payload = decode_payload(KEY, entry, stored).unwrap();
        assert_eq!(payload, payload_bytes(&record.op).into_owned());
    }
}

#[test]
fn without_the_key_the_key_id_is_named() {
    // Not registered: as a process without --encryption-key.
    let k = Key::from_bytes(&[0x77; 32]);
    let mut b = SegmentBuilder::new(UUID, 3, SEQ, 100);
    b.set_sealing(Some(k.clone()));
    b.push(&records()[0]).unwrap();
    let bytes = b.finish();
    let err = decode_segment(KEY, &bytes, &expected()).unwrap_err();
    assert!(
        matches!(&err, SegmentError::Sealed { source: OpenError::MissingKey(id), .. } if *id == k.id()),
        "{err}"
    );
    let text = err.to_string();
    assert!(
        text.contains(&k.id().to_string()) && text.contains(KEY),
        "{text}"
    );
}

#[test]
fn a_sealed_segment_moved_elsewhere_does_not_open() {
    let k = key(0x33);
    let undo = sealed(&k, crate::crypto::ObjectKind::UndoSegment);
    assert!(decode_segment(UNDO_KEY, &undo, &expected()).is_ok());
    // An undo segment copied to a journal key: the kind differs.
    let err = decode_segment(KEY, &undo, &expected()).unwrap_err();
    assert!(
        matches!(
            err,
            SegmentError::Sealed {
                source: OpenError::Auth,
                ..
            }
        ),
        "{err}"
    );
    // Another seq's key (the header and index say 42; the reader expects 43 and refuses
    // before or at opening).
    let other = Expected {
        seq: 43,
        ..expected()
    };
    assert!(decode_segment("journal/0/00000000000000000043", &undo, &other).is_err());
}

#[test]
fn every_flipped_byte_of_a_sealed_segment_is_refused() {
    let k = key(0x34);
    let bytes = sealed(&k, crate::crypto::ObjectKind::JournalSegment);
    for i in (0..bytes.len()).step_by(13) {
        let mut t = bytes.to_vec();
        t[i] ^= 0x01;
        assert!(
            decode_segment(KEY, &t, &expected()).is_err(),
            "byte {i} of {} flipped and accepted",
            bytes.len()
        );
    }
}

#[test]
fn a_tampered_payload_with_its_crc_fixed_fails_authentication() {
    // CRCs are not a defence: an attacker can recompute them. The tag is.
    let k = key(0x35);
    let bytes = sealed(&k, crate::crypto::ObjectKind::JournalSegment);
    let index = decode_index_from_tail(KEY, &bytes, bytes.len() as u64, &expected()).unwrap();
    let entry = &index.entries[1];
    let range = entry.stored_range();
    let mut stored = bytes[range.start as usize..range.end as usize].to_vec();
    stored[40] ^= 0x80;
    let err = decode_payload(KEY, entry, &stored).unwrap_err();
    assert!(
        matches!(
            err,
            SegmentError::Sealed {
                source: OpenError::Auth,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("LSN 101"), "{err}");
}

#[test]
fn a_sealed_plug_round_trips() {
    let k = key(0x36);
    let mut b = SegmentBuilder::new(UUID, 3, SEQ, 100);
    b.set_sealing(Some(k));
    let bytes = b.finish_with(FLAG_PLUG, SEQ + 4);
    let d = decode_segment(KEY, &bytes, &expected()).unwrap();
    assert!(d.header.plug && d.records.is_empty());
    assert_eq!(d.header.next_seq, SEQ + 4);
}
