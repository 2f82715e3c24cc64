//! Hostile and broken NBD clients, written by hand on raw sockets. Each bad input must
//! get the error the spec asks for (or close only its own connection), must not change
//! the device, and must not disturb a bystander connection that keeps reading and
//! writing in between.

mod support;

use std::os::unix::fs::FileExt;
use std::process::Command;
use std::time::Duration;

use support::nbd::wire::*;
use support::nbd::*;

const MIB: u64 = 1 << 20;
/// Larger than the 32 MiB maximum payload, so an oversized read can be in range.
const SIZE: u64 = 40 * MIB;
/// The bystander works in the last 64 KiB; everything before stays as initialised.
const BYSTANDER_AT: u64 = SIZE - (64 << 10);
const BYSTANDER_LEN: usize = 64 << 10;
/// Length of the known pattern written at the start of each image before clients come.
const INITIAL_LEN: usize = MIB as usize;

/// A server with a pre-filled export, and a bystander connection that must stay healthy.
struct Scene {
    server: TestServer,
    bystander: RawClient,
    initial: Vec<u8>,
    round: u64,
    /// What the server held of its buffer budget with the bystander the only connection.
    bystander_held: u64,
}

impl Scene {
    fn new(extra: &[ExportSpec]) -> Self {
        let mut specs = vec![ExportSpec {
            description: "the disk",
            ..ExportSpec::new("disk", SIZE)
        }];
        specs.extend_from_slice(extra);
        let server = TestServer::start(&specs);
        let initial = pattern(999, INITIAL_LEN);
        for spec in &specs {
            let file = std::fs::OpenOptions::new()
                .write(true)
                .open(server.image(spec.name))
                .unwrap();
            file.write_all_at(&initial, 0).unwrap();
        }
        let (bystander, size, _) = RawClient::go(server.socket(), "disk");
        assert_eq!(size, SIZE);
        // Before its first request, the bystander holds only its connection's buffers.
        let bystander_held = server.buffered().held;
        let mut scene = Self {
            server,
            bystander,
            initial,
            round: 0,
            bystander_held,
        };
        scene.check();
        scene
    }

    /// The bystander writes a fresh pattern to its region and reads it back.
    fn check(&mut self) {
        self.round += 1;
        let data = pattern(self.round, BYSTANDER_LEN);
        self.bystander.write(BYSTANDER_AT, &data);
        assert!(
            self.bystander.read(BYSTANDER_AT, BYSTANDER_LEN as u32) == data,
            "bystander read back wrong data in round {}",
            self.round
        );
        // And it still sees the untouched initial data.
        assert!(self.bystander.read(0, 4096) == self.initial[..4096]);
    }

    /// Final checks: the bystander and a real client are still served, and no rejected
    /// request changed any image.
    fn finish(mut self, images: &[&str]) {
        self.check();
        let expected_tail = pattern(self.round, BYSTANDER_LEN);
        let read_tail = format!("read -P 0 {INITIAL_LEN} 64k");
        qemu_io_ok(&self.server.uri("disk"), &[read_tail.as_str()]);
        for name in images {
            let image = std::fs::read(self.server.image(name)).unwrap();
            assert_eq!(image.len() as u64, SIZE);
            assert!(
                image[..INITIAL_LEN] == self.initial[..],
                "{name}: the initial data changed"
            );
            let tail_start = if *name == "disk" {
                BYSTANDER_AT as usize
            } else {
                SIZE as usize
            };
            assert!(
                image[INITIAL_LEN..tail_start].iter().all(|&b| b == 0),
                "{name}: bytes changed outside any accepted write"
            );
            if *name == "disk" {
                assert!(image[tail_start..] == expected_tail[..]);
            }
        }
    }

    fn connect(&self) -> RawClient {
        RawClient::connect(self.server.socket())
    }

    fn go(&self, export: &str) -> RawClient {
        RawClient::go(self.server.socket(), export).0
    }
}

#[test]
fn handshake_garbage_closes_only_that_connection() {
    let mut scene = Scene::new(&[]);

    // Client flags the server never offered.
    let mut c = scene.connect();
    c.send_u32(C_FIXED_NEWSTYLE | 0x8000_0000);
    c.expect_closed();
    scene.check();

    // Not NBD at all: an HTTP request where the client flags should be.
    let mut c = scene.connect();
    c.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    c.expect_closed();
    scene.check();

    // An option without the IHAVEOPT magic.
    let mut c = scene.connect();
    c.send_u32(C_FIXED_NEWSTYLE | C_NO_ZEROES);
    c.send(&[0x42; 16]);
    c.expect_closed();
    scene.check();

    // An option claiming 4 GiB of data: refused with TOO_BIG, then closed.
    let mut c = scene.connect();
    c.send_u32(C_FIXED_NEWSTYLE | C_NO_ZEROES);
    let mut header = Vec::new();
    header.extend_from_slice(&IHAVEOPT.to_be_bytes());
    header.extend_from_slice(&OPT_GO.to_be_bytes());
    header.extend_from_slice(&u32::MAX.to_be_bytes());
    c.send(&header);
    let (option, reply, _) = c.option_reply();
    assert_eq!((option, reply), (OPT_GO, REP_ERR_TOO_BIG));
    c.expect_closed();
    scene.check();

    // An option whose data never fully arrives.
    let mut c = scene.connect();
    c.send_u32(C_FIXED_NEWSTYLE | C_NO_ZEROES);
    let mut header = Vec::new();
    header.extend_from_slice(&IHAVEOPT.to_be_bytes());
    header.extend_from_slice(&OPT_GO.to_be_bytes());
    header.extend_from_slice(&100u32.to_be_bytes());
    header.extend_from_slice(&[0; 10]);
    c.send(&header);
    c.hang_up();
    scene.check();

    // NBD_OPT_EXPORT_NAME cannot report errors: an unknown name ends the session.
    let mut c = scene.connect();
    c.send_u32(C_FIXED_NEWSTYLE | C_NO_ZEROES);
    c.send_option(OPT_EXPORT_NAME, b"nosuch");
    c.expect_closed();
    scene.check();

    // A client without fixed newstyle cannot parse option replies: closing is all we can do.
    let mut c = scene.connect();
    c.send_u32(0);
    c.send_option(OPT_LIST, &[]);
    c.expect_closed();
    scene.check();

    // A client that leaves right after the greeting.
    scene.connect().hang_up();
    scene.check();

    scene.finish(&["disk"]);
}

#[test]
fn handshake_errors_are_answered_and_negotiation_goes_on() {
    let mut scene = Scene::new(&[ExportSpec {
        description: "second",
        ..ExportSpec::new("other", SIZE)
    }]);
    let mut c = scene.connect();
    c.send_u32(C_FIXED_NEWSTYLE | C_NO_ZEROES);

    // Options we do not implement: ERR_UNSUP, and the session continues.
    for (option, data) in [
        (99u32, &b"whatever"[..]),
        (OPT_STARTTLS, &[][..]),
        (OPT_EXTENDED_HEADERS, &[][..]),
    ] {
        c.send_option(option, data);
        let (o, reply, _) = c.option_reply();
        assert_eq!((o, reply), (option, REP_ERR_UNSUP), "option {option}");
    }
    scene.check();

    // Malformed NBD_OPT_GO / INFO data: ERR_INVALID.
    let name_too_long = [0, 0, 0x03, 0xe8, b'd', b'i', b's', b'k', 0, 0];
    let count_mismatch = [0, 0, 0, 0, 0, 2, 0, 3];
    for data in [&[1, 2, 3][..], &name_too_long[..], &count_mismatch[..]] {
        for option in [OPT_INFO, OPT_GO] {
            c.send_option(option, data);
            let (o, reply, message) = c.option_reply();
            assert_eq!((o, reply), (option, REP_ERR_INVALID), "{data:?}");
            assert!(!message.is_empty(), "error replies carry a message");
        }
    }
    // NBD_OPT_LIST takes no data.
    c.send_option(OPT_LIST, b"junk");
    assert_eq!(c.option_reply().1, REP_ERR_INVALID);
    scene.check();

    // The export list.
    c.send_option(OPT_LIST, &[]);
    let mut names = Vec::new();
    loop {
        let (o, reply, data) = c.option_reply();
        assert_eq!(o, OPT_LIST);
        if reply == REP_ACK {
            break;
        }
        assert_eq!(reply, REP_SERVER);
        let len = u32::from_be_bytes(data[..4].try_into().unwrap()) as usize;
        names.push(String::from_utf8(data[4..4 + len].to_vec()).unwrap());
    }
    assert_eq!(names, ["disk", "other"]);

    // An unknown export through INFO/GO is an error reply, not a disconnect.
    for option in [OPT_INFO, OPT_GO] {
        let err = c.info_or_go(option, "nosuch", &[]).unwrap_err();
        assert_eq!(err.0, REP_ERR_UNKNOWN);
        assert!(err.1.contains("nosuch"), "{}", err.1);
    }

    // INFO on the default export answers every information request.
    let mut data = vec![0, 0, 0, 0, 0, 3];
    for info in [INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE] {
        data.extend_from_slice(&info.to_be_bytes());
    }
    c.send_option(OPT_INFO, &data);
    let mut seen = Vec::new();
    loop {
        let (_, reply, data) = c.option_reply();
        if reply == REP_ACK {
            break;
        }
        assert_eq!(reply, REP_INFO);
        let info = u16::from_be_bytes([data[0], data[1]]);
        match info {
            INFO_EXPORT => {
                assert_eq!(&data[2..10], &SIZE.to_be_bytes());
            }
            INFO_NAME => assert_eq!(&data[2..], b"disk"),
            INFO_DESCRIPTION => assert_eq!(&data[2..], b"the disk"),
            INFO_BLOCK_SIZE => {
                let words: Vec<u32> = data[2..]
                    .chunks(4)
                    .map(|w| u32::from_be_bytes(w.try_into().unwrap()))
                    .collect();
                assert_eq!(words, [512, 4096, 32 << 20]);
            }
            other => panic!("unexpected info {other}"),
        }
        seen.push(info);
    }
    seen.sort();
    assert_eq!(
        seen,
        [INFO_EXPORT, INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE]
    );
    scene.check();

    // After all that, GO still works and the connection serves data.
    let (size, flags) = c.info_or_go(OPT_GO, "other", &[]).unwrap();
    assert_eq!(size, SIZE);
    assert_eq!(flags & FLAG_READ_ONLY, 0);
    assert!(c.read(0, 4096) == scene.initial[..4096]);

    // ABORT is acknowledged, then the server closes.
    let mut c = scene.connect();
    c.send_u32(C_FIXED_NEWSTYLE | C_NO_ZEROES);
    c.send_option(OPT_ABORT, &[]);
    assert_eq!(c.option_reply().1, REP_ACK);
    c.expect_closed();

    scene.finish(&["disk", "other"]);
}

#[test]
fn bad_requests_get_error_replies_and_the_connection_goes_on() {
    let mut scene = Scene::new(&[]);
    let mut c = scene.go("disk");
    let junk = vec![0xee; 1024];

    // Out of range: EINVAL for reads, trims and zeroes, ENOSPC for writes; wrapping
    // offsets are out of range too.
    assert_eq!(c.failing(0, CMD_READ, SIZE, 512, &[]), EINVAL);
    assert_eq!(c.failing(0, CMD_READ, SIZE - 512, 1024, &[]), EINVAL);
    assert_eq!(c.failing(0, CMD_READ, u64::MAX - 511, 1024, &[]), EINVAL);
    assert_eq!(c.failing(0, CMD_WRITE, SIZE, 1024, &junk), ENOSPC);
    assert_eq!(c.failing(0, CMD_WRITE, SIZE - 512, 1024, &junk), ENOSPC);
    assert_eq!(c.failing(0, CMD_TRIM, SIZE - 512, 1024, &[]), EINVAL);
    assert_eq!(c.failing(0, CMD_WRITE_ZEROES, SIZE, 512, &[]), EINVAL);
    assert!(c.read(0, 4096) == scene.initial[..4096]);
    scene.check();

    // Not aligned to the 512-byte minimum block size.
    assert_eq!(c.failing(0, CMD_READ, 100, 512, &[]), EINVAL);
    assert_eq!(c.failing(0, CMD_READ, 0, 100, &[]), EINVAL);
    assert_eq!(c.failing(0, CMD_WRITE, 0, 100, &junk[..100]), EINVAL);
    assert_eq!(c.failing(0, CMD_WRITE, 256, 512, &junk[..512]), EINVAL);
    assert_eq!(c.failing(0, CMD_TRIM, 0, 700, &[]), EINVAL);
    assert_eq!(c.failing(0, CMD_WRITE_ZEROES, 4000, 512, &[]), EINVAL);
    assert!(c.read(0, 4096) == scene.initial[..4096]);
    scene.check();

    // Larger than the 32 MiB maximum payload (though inside the device).
    assert_eq!(c.failing(0, CMD_READ, 0, (32 << 20) + 512, &[]), EINVAL);
    // Exactly the maximum is fine.
    let big = c.read(0, 32 << 20);
    assert!(big[..INITIAL_LEN] == scene.initial[..]);
    scene.check();

    // Unknown commands and flags.
    assert_eq!(c.failing(0, CMD_CACHE, 0, 512, &[]), EINVAL);
    assert_eq!(c.failing(0, CMD_BLOCK_STATUS, 0, 512, &[]), EINVAL);
    assert_eq!(c.failing(0, 42, 0, 512, &[]), EINVAL);
    assert_eq!(c.failing(FLAG_DF, CMD_READ, 0, 512, &[]), EINVAL);
    assert_eq!(c.failing(0x8000, CMD_READ, 0, 512, &[]), EINVAL);
    // NO_HOLE belongs to WRITE_ZEROES only; the write's payload is still consumed.
    assert_eq!(c.failing(2, CMD_WRITE, 0, 512, &junk[..512]), EINVAL);
    assert!(c.read(0, 4096) == scene.initial[..4096]);
    scene.check();

    // Zero-length requests succeed and change nothing.
    c.request(0, CMD_READ, 7, 0, 0, &[]);
    assert_eq!(c.reply(), (0, 7));
    c.request(0, CMD_WRITE, 8, 0, 0, &[]);
    assert_eq!(c.reply(), (0, 8));

    // A burst of bad requests in flight at once; each gets its own reply.
    for h in 0..50u64 {
        c.request(0, CMD_READ, 100 + h, SIZE + h * 512, 512, &[]);
        c.request(0, CMD_WRITE, 200 + h, 1, 512, &junk[..512]);
    }
    let mut handles: Vec<u64> = (0..100)
        .map(|_| {
            let (error, handle) = c.reply();
            assert_eq!(error, EINVAL, "handle {handle}");
            handle
        })
        .collect();
    handles.sort();
    let expected: Vec<u64> = (100..150).chain(200..250).collect();
    assert_eq!(handles, expected);
    assert!(c.read(0, 4096) == scene.initial[..4096]);

    // FLUSH with FUA set (some clients do) is accepted.
    c.request(FLAG_FUA, CMD_FLUSH, 9, 0, 0, &[]);
    assert_eq!(c.reply(), (0, 9));

    // A clean disconnect.
    c.request(0, CMD_DISC, 10, 0, 0, &[]);
    c.expect_closed();
    scene.finish(&["disk"]);
}

#[test]
fn stream_breaking_requests_close_only_their_connection() {
    let mut scene = Scene::new(&[]);

    // A request header without the request magic: the stream cannot be trusted.
    let mut c = scene.go("disk");
    c.send(&[0x77; 28]);
    c.expect_closed();
    scene.check();

    // A write announcing more than the maximum payload: answered, then closed, since
    // its payload cannot be skipped sensibly.
    let mut c = scene.go("disk");
    c.request(0, CMD_WRITE, 5, 0, (32 << 20) + 512, &[0xee; 4096]);
    assert_eq!(c.reply(), (EINVAL, 5));
    c.expect_closed();
    scene.check();

    // A client that dies half-way through a write payload: nothing is written.
    let mut c = scene.go("disk");
    c.request(0, CMD_WRITE, 6, 0, 64 << 10, &[0xee; 32 << 10]);
    c.hang_up();
    scene.check();

    // A client that dies half-way through a request header.
    let mut c = scene.go("disk");
    c.send(&REQUEST_MAGIC.to_be_bytes());
    c.send(&[0; 6]);
    c.hang_up();
    scene.check();

    // A client that sends requests and leaves without reading the replies.
    let mut c = scene.go("disk");
    for h in 0..64 {
        c.request(0, CMD_READ, h, 0, 64 << 10, &[]);
    }
    c.hang_up();
    scene.check();

    // Once the server has ended every hung-up connection (their buffers are given back: the
    // bystander alone holds what it held at the start), prove it is still whole.
    let bystander_alone = scene.bystander_held;
    support::procs::wait_for(
        "the server to end the hung-up connections",
        Duration::from_secs(10),
        || {
            let now = scene.server.buffered();
            if now.held == bystander_alone {
                Ok(())
            } else {
                Err(format!("{now:?}, the bystander alone {bystander_alone}"))
            }
        },
    );
    scene.finish(&["disk"]);
}

#[test]
fn read_only_export_refuses_every_change() {
    let mut scene = Scene::new(&[ExportSpec {
        read_only: true,
        ..ExportSpec::new("frozen", SIZE)
    }]);
    let (mut c, size, flags) = RawClient::go(scene.server.socket(), "frozen");
    assert_eq!(size, SIZE);
    assert_ne!(flags & FLAG_READ_ONLY, 0, "READ_ONLY advertised");
    let junk = vec![0xee; 4096];
    assert_eq!(c.failing(0, CMD_WRITE, 0, 4096, &junk), EPERM);
    assert_eq!(c.failing(FLAG_FUA, CMD_WRITE, 0, 4096, &junk), EPERM);
    assert_eq!(c.failing(0, CMD_TRIM, 0, 4096, &[]), EPERM);
    assert_eq!(c.failing(0, CMD_WRITE_ZEROES, 0, 4096, &[]), EPERM);
    c.request(0, CMD_FLUSH, 3, 0, 0, &[]);
    assert_eq!(c.reply(), (0, 3));
    assert!(c.read(0, 4096) == scene.initial[..4096]);
    scene.check();

    // qemu-io, a real client, is refused too.
    let (ok, text) = qemu_io(&scene.server.uri("frozen"), &["write -P 0xee 0 4k"]);
    assert!(!ok, "qemu-io wrote to a read-only export:\n{text}");
    // qemu sees READ_ONLY and refuses to open for writing: the flag reached the client.
    assert!(text.contains("Permission denied"), "{text}");
    scene.finish(&["disk", "frozen"]);
}

#[test]
fn old_clients_without_no_zeroes_or_fixed_newstyle_are_served() {
    let mut scene = Scene::new(&[]);
    for client_flags in [0, C_FIXED_NEWSTYLE] {
        let mut c = scene.connect();
        c.send_u32(client_flags);
        c.send_option(OPT_EXPORT_NAME, b"");
        assert_eq!(c.u64(), SIZE);
        let flags = c.u16();
        assert_eq!(flags & 1, 1, "HAS_FLAGS");
        assert_eq!(c.bytes(124), vec![0; 124], "the 124 reserved zero bytes");
        assert!(c.read(0, 4096) == scene.initial[..4096]);
        scene.check();
    }
    // With NO_ZEROES the reply is 10 bytes and a request follows at once.
    let mut c = scene.connect();
    c.send_u32(C_FIXED_NEWSTYLE | C_NO_ZEROES);
    c.send_option(OPT_EXPORT_NAME, b"disk");
    assert_eq!(c.u64(), SIZE);
    c.u16();
    assert!(c.read(0, 512) == scene.initial[..512]);

    let out = run(
        Command::new("nbdinfo").arg(scene.server.uri("")),
        CLIENT_TIMEOUT,
    );
    assert!(out.status.success());
    scene.finish(&["disk"]);
}

/// A meta-context option's data with a length field that lies: `name`, then `count`
/// queries of which only `queries` are present.
fn meta_data(name: &[u8], count: u32, queries: &[&[u8]]) -> Vec<u8> {
    let mut data = Vec::new();
    data.extend_from_slice(&(name.len() as u32).to_be_bytes());
    data.extend_from_slice(name);
    data.extend_from_slice(&count.to_be_bytes());
    for q in queries {
        data.extend_from_slice(&(q.len() as u32).to_be_bytes());
        data.extend_from_slice(q);
    }
    data
}

#[test]
fn structured_replies_and_meta_contexts_refuse_bad_input() {
    let mut scene = Scene::new(&[ExportSpec::new("other", SIZE)]);
    let mut c = scene.connect();
    c.send_u32(C_FIXED_NEWSTYLE | C_NO_ZEROES);

    // Contexts before structured replies: refused (the spec's SHOULD), nothing selected.
    for option in [OPT_LIST_META_CONTEXT, OPT_SET_META_CONTEXT] {
        let err = c
            .meta_context(option, "disk", &["base:allocation"])
            .unwrap_err();
        assert_eq!(err.0, REP_ERR_INVALID, "{err:?}");
        assert!(err.1.contains("STRUCTURED_REPLY"), "{}", err.1);
    }
    // NBD_OPT_STRUCTURED_REPLY takes no data; then it is acknowledged.
    c.send_option(OPT_STRUCTURED_REPLY, b"x");
    assert_eq!(c.option_reply().1, REP_ERR_INVALID);
    c.send_option(OPT_STRUCTURED_REPLY, &[]);
    assert_eq!(c.option_reply().1, REP_ACK);

    // Listing: everything with no query (IDs reserved as 0), the wildcard, a leaf.
    let all = vec![(0, "base:allocation".to_string())];
    assert_eq!(
        c.meta_context(OPT_LIST_META_CONTEXT, "disk", &[]),
        Ok(all.clone())
    );
    assert_eq!(
        c.meta_context(OPT_LIST_META_CONTEXT, "", &["base:"]),
        Ok(all.clone())
    );
    // Unknown namespaces and leaves are ignored, not errors.
    for option in [OPT_LIST_META_CONTEXT, OPT_SET_META_CONTEXT] {
        assert_eq!(
            c.meta_context(
                option,
                "disk",
                &["x-nosuch:thing", "base:nosuch", "qemu:dirty-bitmap:nosuch"]
            ),
            Ok(vec![])
        );
    }

    // Malformed data: ERR_INVALID each time, and negotiation goes on.
    let oversize = vec![b'a'; 4097];
    let mut long_query = b"base:".to_vec();
    long_query.extend_from_slice(&oversize);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("short", vec![0, 0, 0]),
        ("name runs past", meta_data(b"disk", 0, &[])[..6].to_vec()),
        ("huge count", meta_data(b"disk", u32::MAX, &[])),
        ("count beyond", meta_data(b"disk", 3, &[b"base:allocation"])),
        ("oversize name", meta_data(&oversize, 0, &[])),
        ("oversize query", meta_data(b"disk", 1, &[&long_query])),
        ("no namespace", meta_data(b"disk", 1, &[b"allocation"])),
        ("empty namespace", meta_data(b"disk", 1, &[b":allocation"])),
        ("not UTF-8", meta_data(b"disk", 1, &[b"base:\xff"])),
        ("NUL", meta_data(b"disk", 1, &[b"base:a\0b"])),
    ];
    for option in [OPT_LIST_META_CONTEXT, OPT_SET_META_CONTEXT] {
        for (what, data) in &cases {
            let mut data = data.clone();
            if *what == "name runs past" {
                data[3] = 200;
            }
            c.send_option(option, &data);
            let (o, reply, message) = c.option_reply();
            assert_eq!((o, reply), (option, REP_ERR_INVALID), "{what}");
            assert!(!message.is_empty(), "{what}: error replies carry a message");
        }
        let err = c
            .meta_context(option, "nosuch", &["base:allocation"])
            .unwrap_err();
        assert_eq!(err.0, REP_ERR_UNKNOWN);
    }
    scene.check();

    // Contexts set for another export do not carry over to the one chosen.
    let set = c
        .meta_context(OPT_SET_META_CONTEXT, "other", &["base:allocation"])
        .unwrap();
    assert_eq!(set.len(), 1);
    assert_ne!(set[0].0, 0, "a selected context has a real ID");
    let (size, flags) = c.info_or_go(OPT_GO, "disk", &[]).unwrap();
    assert_eq!(size, SIZE);
    assert_ne!(
        flags & FLAG_SEND_DF,
        0,
        "DF offered with structured replies"
    );
    c.request(0, CMD_BLOCK_STATUS, 7, 0, 4096, &[]);
    let (error, message) = c.error_chunk(7);
    assert_eq!(error, EINVAL);
    assert!(message.contains("META_CONTEXT"), "{message}");
    // Reads on a structured connection: one content chunk, errors as error chunks.
    c.request(0, CMD_READ, 8, 0, 4096, &[]);
    let (flags, chunk_type, handle, payload) = c.chunk();
    assert_eq!(
        (flags, chunk_type, handle),
        (REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, 8)
    );
    assert_eq!(&payload[..8], &0u64.to_be_bytes());
    assert!(payload[8..] == scene.initial[..4096]);
    c.request(0, CMD_READ, 9, 8 * MIB, 8192, &[]);
    let (flags, chunk_type, _, payload) = c.chunk();
    assert_eq!(
        (flags, chunk_type),
        (REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_HOLE)
    );
    assert_eq!(
        payload,
        [&(8 * MIB).to_be_bytes()[..], &8192u32.to_be_bytes()].concat()
    );
    c.request(0, CMD_READ, 10, SIZE, 512, &[]);
    assert_eq!(c.error_chunk(10).0, EINVAL);
    c.request(FLAG_REQ_ONE, CMD_READ, 11, 0, 512, &[]);
    assert_eq!(c.error_chunk(11).0, EINVAL);
    scene.check();

    // Contexts requested after GO: option bytes in transmission break the stream, and only
    // this connection is closed.
    let mut data = meta_data(b"disk", 1, &[b"base:allocation"]);
    let mut option = IHAVEOPT.to_be_bytes().to_vec();
    option.extend_from_slice(&OPT_SET_META_CONTEXT.to_be_bytes());
    option.extend_from_slice(&(data.len() as u32).to_be_bytes());
    option.append(&mut data);
    c.send(&option);
    c.expect_closed();
    scene.check();

    // With base:allocation selected for the export chosen: block status past the end, of
    // zero bytes, or with a flag it does not take is EINVAL; REQ_ONE gets one extent.
    let mut c = scene.connect();
    c.send_u32(C_FIXED_NEWSTYLE | C_NO_ZEROES);
    c.send_option(OPT_STRUCTURED_REPLY, &[]);
    assert_eq!(c.option_reply().1, REP_ACK);
    let set = c
        .meta_context(OPT_SET_META_CONTEXT, "", &["base:allocation"])
        .unwrap();
    c.info_or_go(OPT_GO, "disk", &[]).unwrap();
    for (flags, offset, len) in [
        (0, SIZE, 512),
        (0, SIZE - 512, 1024),
        (0, u64::MAX - 511, 1024),
        (0, 0, 0),
        (FLAG_DF, 0, 512),
    ] {
        c.request(flags, CMD_BLOCK_STATUS, 20, offset, len, &[]);
        assert_eq!(c.error_chunk(20).0, EINVAL, "{flags} {offset} {len}");
    }
    c.request(FLAG_REQ_ONE, CMD_BLOCK_STATUS, 21, 0, 4 * MIB as u32, &[]);
    let (flags, chunk_type, _, payload) = c.chunk();
    assert_eq!(
        (flags, chunk_type),
        (REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS)
    );
    assert_eq!(payload.len(), 4 + 8, "one descriptor");
    assert_eq!(&payload[..4], &set[0].0.to_be_bytes());
    let first = u32::from_be_bytes(payload[4..8].try_into().unwrap());
    assert!(first > 0 && first <= 4 * MIB as u32);
    // The whole export: descriptors cover it from the offset, none empty, none past it.
    c.request(0, CMD_BLOCK_STATUS, 22, 0, SIZE as u32, &[]);
    let (_, _, _, payload) = c.chunk();
    let lens: Vec<u64> = payload[4..]
        .chunks(8)
        .map(|d| u64::from(u32::from_be_bytes(d[..4].try_into().unwrap())))
        .collect();
    assert!(lens.iter().all(|&l| l > 0));
    assert!(lens.iter().sum::<u64>() <= SIZE);
    // The start holds the initial data: not a hole.
    assert_eq!(&payload[8..12], &[0, 0, 0, 0]);
    scene.check();

    scene.finish(&["disk", "other"]);
}
