//! Bad input to `tinylag serve`: malformed handshakes, out-of-range, unaligned and oversized
//! requests, block status without contexts or past the end, clients that vanish mid-request
//! or with writes or block status requests in flight. Each gets an NBD
//! error or loses only its own connection; a second client keeps writing and reading
//! throughout, the daemon stays in `logging`, and the journal still rebuilds the primary.

mod support;

use std::path::Path;

use support::daemon::{init, Daemon};
use support::nbd::wire::*;
use support::nbd::{pattern, qemu_io_ok, RawClient};
use support::oracle::{assert_same_image, rebuild_local};

const SIZE: u64 = 64 << 20;

/// A client that keeps working while others misbehave.
struct Bystander {
    client: RawClient,
    round: u64,
}

impl Bystander {
    fn check(&mut self) {
        self.round += 1;
        let offset = 32 * 4096 + (self.round % 64) * 65536;
        let data = pattern(self.round, 65536);
        self.client.write(offset, &data);
        assert!(
            self.client.read(offset, 65536) == data,
            "round {}",
            self.round
        );
    }
}

#[test]
fn bad_clients_lose_only_their_own_connection_and_the_journal_stays_whole() {
    let dir = tempfile::tempdir().unwrap();
    let primary = dir.path().join("primary.img");
    let journal = dir.path().join("journal");
    init(journal.to_str().unwrap(), &primary, "64M", &[], &[]);
    let mut daemon = Daemon::start(&primary, journal.to_str().unwrap(), &[], &[]);
    let socket = daemon.socket.clone();
    let mut bystander = Bystander {
        client: RawClient::go(&socket, "").0,
        round: 0,
    };
    bystander.check();

    // Handshakes: unknown client flags, not NBD at all, an option without its magic, an
    // option that claims 4 GiB, an unknown export, a client gone after the greeting.
    let mut c = RawClient::connect(&socket);
    c.send_u32(C_FIXED_NEWSTYLE | 0x8000_0000);
    c.expect_closed();
    bystander.check();
    let mut c = RawClient::connect(&socket);
    c.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    c.expect_closed();
    bystander.check();
    let mut c = RawClient::connect(&socket);
    c.send_u32(C_FIXED_NEWSTYLE | C_NO_ZEROES);
    c.send(&[0x42; 16]);
    c.expect_closed();
    bystander.check();
    let mut c = RawClient::connect(&socket);
    c.send_u32(C_FIXED_NEWSTYLE | C_NO_ZEROES);
    let mut header = Vec::new();
    header.extend_from_slice(&IHAVEOPT.to_be_bytes());
    header.extend_from_slice(&OPT_GO.to_be_bytes());
    header.extend_from_slice(&u32::MAX.to_be_bytes());
    c.send(&header);
    assert_eq!(c.option_reply().1, REP_ERR_TOO_BIG);
    c.expect_closed();
    let mut c = RawClient::connect(&socket);
    c.send_u32(C_FIXED_NEWSTYLE | C_NO_ZEROES);
    assert!(c.info_or_go(OPT_GO, "nosuch", &[]).is_err());
    c.send_option(OPT_ABORT, &[]);
    RawClient::connect(&socket).hang_up();
    bystander.check();

    // Requests: out of range, unaligned to the 4 KiB block, wrapping, unknown; each gets its
    // error and the connection goes on. Nothing of them reaches the primary or the journal.
    let (mut c, size, _) = RawClient::go(&socket, "disk0");
    assert_eq!(size, SIZE);
    let junk = vec![0xee; 8192];
    assert_eq!(c.failing(0, CMD_WRITE, SIZE - 4096, 8192, &junk), ENOSPC);
    assert_eq!(c.failing(0, CMD_WRITE, 512, 4096, &junk[..4096]), EINVAL);
    assert_eq!(c.failing(0, CMD_TRIM, u64::MAX - 4095, 8192, &[]), EINVAL);
    assert_eq!(c.failing(0, CMD_WRITE_ZEROES, SIZE, 4096, &[]), EINVAL);
    assert_eq!(c.failing(0, CMD_READ, SIZE, 4096, &[]), EINVAL);
    assert_eq!(c.failing(0, 42, 0, 4096, &[]), EINVAL);
    c.write(0, &pattern(1, 4096));
    bystander.check();
    // Oversized: more than the 32 MiB maximum payload, inside the device; answered, then
    // that connection is closed.
    c.request(0, CMD_WRITE, 5, 0, (32 << 20) + 4096, &[0xee; 4096]);
    assert_eq!(c.reply(), (EINVAL, 5));
    c.expect_closed();
    bystander.check();

    // A client that dies half-way through a write's payload: nothing of it is written.
    let (mut c, _, _) = RawClient::go(&socket, "");
    c.request(0, CMD_WRITE, 6, 8 << 20, 64 << 10, &[0xee; 32 << 10]);
    c.hang_up();
    // One that dies half-way through a request header.
    let (mut c, _, _) = RawClient::go(&socket, "");
    c.send(&REQUEST_MAGIC.to_be_bytes());
    c.send(&[0; 6]);
    c.hang_up();
    // One that sends many complete writes and leaves without reading a reply: they are
    // applied (or not) whole, and journaled in order with everyone else's.
    let (mut c, _, _) = RawClient::go(&socket, "");
    for h in 0..64u64 {
        c.request(
            0,
            CMD_WRITE,
            h,
            (16 << 20) + h * 4096,
            65536,
            &pattern(h + 100, 65536),
        );
    }
    c.hang_up();
    bystander.check();

    // Block status: refused without contexts (simple reply) and past the end (an error
    // chunk); a client that pipelines block status of the whole disk and leaves without
    // reading the replies costs only its own connection.
    let (mut c, _, _) = RawClient::go(&socket, "");
    assert_eq!(c.failing(0, CMD_BLOCK_STATUS, 0, 4096, &[]), EINVAL);
    let mut c = RawClient::connect(&socket);
    c.send_u32(C_FIXED_NEWSTYLE | C_NO_ZEROES);
    c.send_option(OPT_STRUCTURED_REPLY, &[]);
    assert_eq!(c.option_reply().1, REP_ACK);
    c.meta_context(OPT_SET_META_CONTEXT, "disk0", &["base:allocation"])
        .unwrap();
    c.info_or_go(OPT_GO, "disk0", &[]).unwrap();
    c.request(0, CMD_BLOCK_STATUS, 7, SIZE - 4096, 8192, &[]);
    assert_eq!(c.error_chunk(7).0, EINVAL);
    for h in 0..256u64 {
        c.request(0, CMD_BLOCK_STATUS, h, 0, SIZE as u32, &[]);
    }
    c.hang_up();
    bystander.check();
    qemu_io_ok(
        &daemon.uri(),
        &["write -P 0x5a 40M 1M", "read -P 0x5a 40M 1M"],
    );
    for _ in 0..5 {
        bystander.check();
    }

    let status = daemon.status();
    assert_eq!(status["mode"], "logging", "{status:#}");
    assert_eq!(status["dirty"]["regions"], 0, "{status:#}");
    drop(bystander);
    daemon.stop_ok();
    let image = std::fs::read(&primary).unwrap();
    assert!(
        image[8 << 20..(8 << 20) + (64 << 10)]
            .iter()
            .all(|&b| b == 0),
        "the half-sent write reached the primary"
    );
    let rebuilt = dir.path().join("rebuilt.img");
    rebuild_local(&journal, &rebuilt, None);
    assert_same_image(&rebuilt, Path::new(&primary));
}
