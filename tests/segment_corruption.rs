//! A segment damaged anywhere is refused with an error naming the object, never decoded
//! into wrong records and never a panic: every single-byte flip, every truncation, and
//! objects that belong elsewhere (another device group, seq or LSN range).

use bytes::Bytes;
use tinylag::journal::segment::{
    decode_index_from_tail, decode_segment, encode_plug, encode_segment, read_index, read_segment,
    Expected, SegmentError, HEADER_LEN, TRAILER_LEN,
};
use tinylag::journal::{Op, Record};
use tinylag::store::MemoryStore;
use tinylag::store::ObjectStore;
use uuid::Uuid;

const KEY: &str = "journal/3/00000000000000000007";
const UUID: Uuid = Uuid::from_u128(0x0f0e_0d0c_0b0a_0908_0706_0504_0302_0100);
const SEQ: u64 = 7;
const FIRST_LSN: u64 = 1000;

fn expected() -> Expected {
    Expected {
        uuid: UUID,
        seq: SEQ,
        first_lsn: Some(FIRST_LSN),
    }
}

fn noise(len: usize, mut state: u64) -> Bytes {
    (0..len)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 56) as u8
        })
        .collect::<Vec<u8>>()
        .into()
}

/// A few records of mixed kinds: compressed and raw payloads, a MARK, an EPOCH.
fn records() -> Vec<Record> {
    let text: Bytes = b"tinylag journal segment ".repeat(40).into();
    let ops = [
        Op::Epoch { epoch: 5 },
        Op::Write {
            offset: 4096,
            data: text.clone(),
        },
        Op::Write {
            offset: 0,
            data: noise(300, 1),
        },
        Op::Discard {
            offset: 1 << 20,
            len: 8192,
        },
        Op::Mark {
            name: "before-upgrade".into(),
        },
        Op::WriteZeroes {
            offset: 0,
            len: 4096,
        },
        Op::Flush,
        Op::ResyncBegin,
        Op::ResyncData {
            offset: 65536,
            data: text.slice(..512),
        },
        Op::ResyncEnd,
    ];
    ops.into_iter()
        .enumerate()
        .map(|(i, op)| Record {
            lsn: FIRST_LSN + i as u64,
            timestamp_ns: 1_700_000_000_000_000_000 + 1000 * (i as u64 / 3),
            dev: (i % 2) as u32,
            op,
        })
        .collect()
}

fn segment() -> Bytes {
    let bytes = encode_segment(UUID, 5, SEQ, FIRST_LSN, &records()).expect("encode");
    assert!(
        bytes.len() <= 16 << 10,
        "keep it small: {} bytes",
        bytes.len()
    );
    let index = decode_index_from_tail(KEY, &bytes, bytes.len() as u64, &expected()).unwrap();
    let compressed = index.entries.iter().filter(|e| e.compressed).count();
    let raw = index
        .entries
        .iter()
        .filter(|e| !e.compressed && e.stored_len > 0)
        .count();
    assert!(
        compressed >= 2 && raw >= 2,
        "{compressed} compressed, {raw} raw"
    );
    bytes
}

/// Start of the index: the part of the object a tail read covers is `tail_start..`.
fn tail_start(bytes: &[u8]) -> usize {
    let n = bytes.len();
    let index_len = u32::from_le_bytes(
        bytes[n - TRAILER_LEN..n - TRAILER_LEN + 4]
            .try_into()
            .unwrap(),
    );
    n - TRAILER_LEN - index_len as usize
}

fn assert_refused<T>(what: &str, result: Result<T, SegmentError>) {
    match result {
        Ok(_) => panic!("{what}: accepted"),
        Err(e) => assert!(
            e.to_string().contains(KEY),
            "{what}: message lacks the key: {e}"
        ),
    }
}

fn flip_every_byte(bytes: &[u8]) {
    let expected = expected();
    let tail = tail_start(bytes);
    let mut copy = bytes.to_vec();
    for i in 0..bytes.len() {
        for mask in [0x01u8, 0x02, 0x04, 0x08, 0x10, 0x20, 0x40, 0x80, 0xff] {
            copy[i] ^= mask;
            let what = format!("byte {i} ^ {mask:#04x}");
            assert_refused(&what, decode_segment(KEY, &copy, &expected));
            if i >= tail {
                let size = copy.len() as u64;
                assert_refused(&what, decode_index_from_tail(KEY, &copy, size, &expected));
                // What read_index does: read the tail, and again if it asks for more.
                let from_tail = &copy[tail..];
                match decode_index_from_tail(KEY, from_tail, size, &expected) {
                    Err(SegmentError::TailTooShort { needed }) => {
                        let again = &copy[copy.len() - needed as usize..];
                        assert_refused(&what, decode_index_from_tail(KEY, again, size, &expected));
                    }
                    result => assert_refused(&what, result),
                }
            }
            copy[i] ^= mask;
        }
    }
}

#[test]
fn every_single_byte_flip_is_refused() {
    let bytes = segment();
    assert!(decode_segment(KEY, &bytes, &expected()).is_ok());
    flip_every_byte(&bytes);
}

#[test]
fn every_single_byte_flip_of_a_plug_is_refused() {
    let plug = encode_plug(UUID, 5, SEQ, FIRST_LSN, SEQ + 3);
    assert!(decode_segment(KEY, &plug, &expected()).is_ok());
    flip_every_byte(&plug);
}

#[test]
fn every_truncation_is_refused() {
    let bytes = segment();
    let expected = expected();
    for n in 0..bytes.len() {
        let cut = &bytes[..n];
        let what = format!("first {n} bytes");
        assert_refused(&what, decode_segment(KEY, cut, &expected));
        assert_refused(&what, decode_index_from_tail(KEY, cut, n as u64, &expected));
    }
    let mut longer = bytes.to_vec();
    longer.push(0);
    assert_refused("one byte appended", decode_segment(KEY, &longer, &expected));
}

#[test]
fn a_short_tail_says_exactly_how_much_to_read() {
    let bytes = segment();
    let size = bytes.len() as u64;
    let needed = (bytes.len() - tail_start(&bytes)) as u64;
    for t in 0..needed as usize {
        let tail = &bytes[bytes.len() - t..];
        match decode_index_from_tail(KEY, tail, size, &expected()) {
            Err(SegmentError::TailTooShort { needed: n }) if t < TRAILER_LEN => {
                assert_eq!(n, TRAILER_LEN as u64)
            }
            Err(SegmentError::TailTooShort { needed: n }) => assert_eq!(n, needed),
            other => panic!("tail of {t} bytes: {other:?}"),
        }
    }
    for t in needed as usize..=bytes.len() {
        let tail = &bytes[bytes.len() - t..];
        let index = decode_index_from_tail(KEY, tail, size, &expected()).unwrap();
        assert_eq!(index.entries.len(), records().len());
    }
    assert!(needed as usize <= bytes.len() - HEADER_LEN);
}

#[test]
fn objects_from_elsewhere_get_the_specific_error() {
    let bytes = segment();
    let size = bytes.len() as u64;
    let other_uuid = Expected {
        uuid: Uuid::from_u128(1),
        ..expected()
    };
    let other_seq = Expected {
        seq: SEQ + 1,
        ..expected()
    };
    let other_lsn = Expected {
        first_lsn: Some(FIRST_LSN + 1),
        ..expected()
    };
    for result in [
        decode_segment(KEY, &bytes, &other_uuid).map(drop),
        decode_index_from_tail(KEY, &bytes, size, &other_uuid).map(drop),
    ] {
        let err = result.unwrap_err();
        assert!(
            matches!(&err, SegmentError::ForeignUuid { expected, found, .. }
                if *expected == other_uuid.uuid && *found == UUID),
            "{err}"
        );
        assert!(err.to_string().contains(KEY), "{err}");
    }
    for result in [
        decode_segment(KEY, &bytes, &other_seq).map(drop),
        decode_index_from_tail(KEY, &bytes, size, &other_seq).map(drop),
    ] {
        let err = result.unwrap_err();
        assert!(
            matches!(
                err,
                SegmentError::WrongSeq {
                    expected: 8,
                    found: 7,
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains(KEY), "{err}");
    }
    for result in [
        decode_segment(KEY, &bytes, &other_lsn).map(drop),
        decode_index_from_tail(KEY, &bytes, size, &other_lsn).map(drop),
    ] {
        let err = result.unwrap_err();
        assert!(
            matches!(
                err,
                SegmentError::WrongFirstLsn {
                    expected: 1001,
                    found: 1000,
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains(KEY), "{err}");
    }
    // A reader that does not know the first LSN accepts the segment.
    let any_lsn = Expected {
        first_lsn: None,
        ..expected()
    };
    assert_eq!(
        decode_segment(KEY, &bytes, &any_lsn).unwrap().records,
        records()
    );
}

#[tokio::test]
async fn store_reads_refuse_damage_too() {
    let store = MemoryStore::new();
    let bytes = segment();
    let mut damaged = bytes.to_vec();
    let last = damaged.len() - 1;
    damaged[last] ^= 1;
    store.put_if_absent(KEY, damaged.into()).await.unwrap();
    let err = read_index(&store, KEY, &expected()).await.unwrap_err();
    assert!(
        matches!(
            err,
            SegmentError::BadMagic {
                part: "trailer",
                ..
            }
        ),
        "{err}"
    );
    let err = read_segment(&store, KEY, &expected()).await.unwrap_err();
    assert!(err.to_string().contains(KEY), "{err}");
    assert!(!err.is_not_found());

    let key = "journal/0/00000000000000000008";
    store.put_if_absent(key, bytes).await.unwrap();
    let err = read_segment(
        &store,
        key,
        &Expected {
            seq: 8,
            ..expected()
        },
    )
    .await
    .unwrap_err();
    assert!(matches!(err, SegmentError::WrongSeq { .. }), "{err}");
    assert!(err.to_string().contains(key), "{err}");
}
