//! `tinylag journal verify` through the real binary: a journal with every record kind
//! (VERIFY included) passes; a flipped byte in a segment body, which `journal inspect`
//! (indexes only) does not notice, fails naming the object; so does a segment of an older
//! writer epoch after a newer one.

mod support;

use bytes::Bytes;
use support::replay::{now_ns, run, TestJournal};
use tinylag::journal::segment::encode_segment;
use tinylag::journal::VerifyChecksum;
use tinylag::journal::{Op, Record};

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

async fn journal_with_every_kind(dir: &std::path::Path) -> TestJournal {
    let mut j = TestJournal::create(dir, 16 << 20, 7).await;
    let data = j.data(64 << 10);
    j.append(vec![
        Op::Epoch { epoch: 1 },
        Op::Write {
            offset: 0,
            data: data.clone(),
        },
        Op::Mark {
            name: "before".into(),
        },
        Op::Verify {
            offset: 0,
            len: 1 << 20,
            checksum: VerifyChecksum::of(&data),
        },
    ])
    .await;
    j.append_random(50).await;
    j.append(vec![
        Op::ResyncBegin,
        Op::ResyncData {
            offset: 4096,
            data: Bytes::from(vec![7u8; 8192]),
        },
        Op::ResyncEnd,
    ])
    .await;
    j.append_random(50).await;
    j
}

#[tokio::test]
async fn a_flipped_body_byte_fails_naming_the_object_while_inspect_passes() {
    let dir = tempfile::tempdir().unwrap();
    let j = journal_with_every_kind(&dir.path().join("j")).await;

    let out = run(&args(&["journal", "verify", "--journal", j.uri()]));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("4 segments"), "{stdout}");
    assert!(stdout.contains("every checksum is good"), "{stdout}");

    // VERIFY round-trips and is listed by inspect.
    let out = run(&args(&[
        "journal",
        "inspect",
        "--journal",
        j.uri(),
        "--json",
    ]));
    assert!(out.status.success());
    let listing = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(listing.contains("\"VERIFY\""), "{listing}");

    // Flip one byte inside segment 1's body (payloads start right after the 72-byte header).
    let (key, path) = j.segment_file(1);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[72 + 100] ^= 0x40;
    std::fs::write(&path, &bytes).unwrap();

    let out = run(&args(&["journal", "inspect", "--journal", j.uri()]));
    assert!(
        out.status.success(),
        "inspect reads only indexes and does not see body damage"
    );
    let out = run(&args(&["journal", "verify", "--journal", j.uri()]));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains(&key), "the error names {key}: {stderr}");
    assert!(stderr.contains("CRC"), "{stderr}");

    // Starting after the damage passes again.
    let out = run(&args(&[
        "journal",
        "verify",
        "--journal",
        j.uri(),
        "--from-seq",
        "2",
        "--json",
    ]));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["segments"], 2);
    assert_eq!(report["next_seq"], 4);
}

#[tokio::test]
async fn a_late_segment_of_an_older_epoch_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut j = TestJournal::create(&dir.path().join("j"), 16 << 20, 8).await;
    let ts = now_ns();
    // Epoch 2 wrote seq 0; seq 1 then comes from epoch 1: a fenced writer's late upload.
    for (seq, epoch) in [(0u64, 2u64), (1, 1)] {
        let record = Record {
            lsn: j.next_lsn,
            timestamp_ns: ts,
            dev: 0,
            op: Op::Write {
                offset: 0,
                data: Bytes::from(vec![seq as u8; 4096]),
            },
        };
        let body = encode_segment(j.manifest.uuid, epoch, seq, j.next_lsn, &[record]).unwrap();
        j.store
            .put_if_absent(&j.manifest.segment_key(seq), body)
            .await
            .unwrap();
        j.next_lsn += 1;
    }
    let out = run(&args(&["journal", "verify", "--journal", j.uri()]));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    let (key, _) = j.segment_file(1);
    assert!(stderr.contains(&key), "{stderr}");
    assert!(stderr.contains("epoch 1 after epoch 2"), "{stderr}");
}
