//! NBD test harness: an in-process tinylag NBD server over file targets in a temp
//! directory, real client programs run with a timeout, and guards that kill or unmount
//! what a test started even when it fails.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection, StreamOwned};
use tinylag::block::file::{self, FileOptions};
use tinylag::nbd::{bind, serve, BudgetStatus, BufferBudget, Export, ListenAddr, NbdServer};

/// The teardown steps, here for the tests that import them with the NBD helpers.
pub use super::teardown::Cleanup;

/// How long any one client command may run before the test fails.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(120);

/// One export of a [`TestServer`]: a sparse file of `size` bytes.
#[derive(Clone, Debug)]
pub struct ExportSpec {
    pub name: &'static str,
    pub size: u64,
    pub block_size: u32,
    pub read_only: bool,
    pub description: &'static str,
}

impl ExportSpec {
    pub fn new(name: &'static str, size: u64) -> Self {
        Self {
            name,
            size,
            block_size: 512,
            read_only: false,
            description: "",
        }
    }
}

/// A tinylag NBD server running on its own tokio runtime in this process.
pub struct TestServer {
    pub dir: tempfile::TempDir,
    pub addr: ListenAddr,
    runtime: Option<tokio::runtime::Runtime>,
    /// The server's buffer budget (the default cap), kept to read what connections hold.
    buffers: BufferBudget,
    shutdown: tokio::sync::watch::Sender<bool>,
    task: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
}

impl TestServer {
    /// Serves `exports` (the first is the default) on a Unix socket in a temp dir.
    pub fn start(exports: &[ExportSpec]) -> Self {
        Self::start_on(exports, None)
    }

    /// Serves `exports` on 127.0.0.1 with a port the system picks.
    pub fn start_tcp(exports: &[ExportSpec]) -> Self {
        Self::start_on(exports, Some("tcp:127.0.0.1:0"))
    }

    fn start_on(exports: &[ExportSpec], tcp: Option<&str>) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let runtime = test_runtime();
        // The engine `serve` would pick: io_uring where it works, the thread pool with
        // TINYLAG_IO_ENGINE=threads (scripts/test runs these suites both ways).
        let engine = tinylag::block::engine::select()
            .expect("TINYLAG_IO_ENGINE")
            .engine;
        let mut list = Vec::new();
        for spec in exports {
            let path = dir.path().join(format!("{}.img", spec.name));
            file::create_sparse(&path, spec.size).expect("create image");
            // The io_uring engine completes requests on the runtime it is opened in.
            let _entered = runtime.enter();
            let device = file::open(
                &path,
                FileOptions {
                    read_only: spec.read_only,
                    engine,
                    ..FileOptions::new(spec.block_size)
                },
            )
            .expect("open image");
            list.push(Export {
                name: spec.name.to_owned(),
                description: spec.description.to_owned(),
                device,
            });
        }
        Self::serve_exports_on(runtime, dir, list, tcp)
    }

    /// Serves ready-made `exports` (the first is the default) on a Unix socket in `dir`,
    /// or on `tcp` if given.
    pub fn serve_exports(dir: tempfile::TempDir, exports: Vec<Export>, tcp: Option<&str>) -> Self {
        Self::serve_exports_on(test_runtime(), dir, exports, tcp)
    }

    /// [`TestServer::serve_exports`] on `runtime` (from [`test_runtime`]), for exports whose
    /// devices had to be opened on it (the io_uring engine completes on its runtime).
    pub fn serve_exports_on(
        runtime: tokio::runtime::Runtime,
        dir: tempfile::TempDir,
        exports: Vec<Export>,
        tcp: Option<&str>,
    ) -> Self {
        init_tracing();
        let default = exports[0].name.clone();
        let buffers = BufferBudget::default();
        let server = Arc::new(
            NbdServer::new(exports, &default)
                .expect("server")
                .with_buffer_budget(buffers.clone()),
        );
        let addr: ListenAddr = match tcp {
            Some(a) => a.parse().expect("tcp addr"),
            None => ListenAddr::Unix(dir.path().join("nbd.sock")),
        };
        let listener = runtime.block_on(bind(&addr)).expect("bind");
        let addr = listener.local_addr().clone();
        let (shutdown, rx) = tokio::sync::watch::channel(false);
        let task = runtime.spawn(serve(listener, server, rx));
        Self {
            dir,
            addr,
            runtime: Some(runtime),
            buffers,
            shutdown,
            task: Some(task),
        }
    }

    /// What the server's connections hold of its buffer budget now: every connection
    /// holds its socket buffers until it has ended, so this tells when the server has
    /// noticed that clients went away.
    pub fn buffered(&self) -> BudgetStatus {
        self.buffers.status()
    }

    /// The socket path (Unix servers only).
    pub fn socket(&self) -> &Path {
        match &self.addr {
            ListenAddr::Unix(path) => path,
            ListenAddr::Tcp(_) => panic!("not a unix server"),
        }
    }

    /// The backing file of an export.
    pub fn image(&self, name: &str) -> PathBuf {
        self.dir.path().join(format!("{name}.img"))
    }

    /// An NBD URI for `export` ("" = the default export), as qemu and libnbd take it.
    pub fn uri(&self, export: &str) -> String {
        match &self.addr {
            ListenAddr::Unix(path) => format!("nbd+unix:///{export}?socket={}", path.display()),
            ListenAddr::Tcp(addr) => format!("nbd://{addr}/{export}"),
        }
    }

    /// Shuts the server down and checks that `serve` returned cleanly within `within`.
    pub fn stop(&mut self, within: Duration) {
        let _ = self.shutdown.send(true);
        let task = self.task.take().expect("task");
        let runtime = self.runtime.as_ref().expect("runtime");
        let result = runtime
            .block_on(async { tokio::time::timeout(within, task).await })
            .expect("serve did not return within the grace period")
            .expect("serve task panicked");
        result.expect("serve failed");
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
        if let Some(runtime) = self.runtime.take() {
            if let Some(task) = self.task.take() {
                let _ = runtime
                    .block_on(async { tokio::time::timeout(Duration::from_secs(15), task).await });
            }
            runtime.shutdown_timeout(Duration::from_secs(5));
        }
    }
}

fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "tinylag=info".into()),
        )
        .with_test_writer()
        .with_ansi(false)
        .try_init();
}

/// A child process killed by pid (and reaped) on drop.
pub struct ChildGuard {
    child: Option<Child>,
    what: String,
}

impl ChildGuard {
    pub fn spawn(cmd: &mut Command) -> Self {
        let what = format!("{cmd:?}");
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
        Self {
            child: Some(child),
            what,
        }
    }

    pub fn id(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap_or(0)
    }

    /// Waits for the child to exit by itself.
    pub fn wait(mut self, timeout: Duration) -> Output {
        let child = self.child.take().expect("child");
        wait_output(child, &self.what, timeout)
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Runs `cmd` to completion with piped output; the test fails if it outlives `timeout`.
pub fn run(cmd: &mut Command, timeout: Duration) -> Output {
    let what = format!("{cmd:?}");
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
    wait_output(child, &what, timeout)
}

fn wait_output(mut child: Child, what: &str, timeout: Duration) -> Output {
    // Drain the pipes on threads so a chatty child never blocks on a full pipe.
    let drain = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut p) = pipe {
                let _ = p.read_to_end(&mut buf);
            }
            buf
        })
    };
    let out = drain(
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let err = drain(
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait().expect("try_wait") {
            Some(status) => break status,
            None if Instant::now() > deadline => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("{what} did not finish within {timeout:?}");
            }
            None => std::thread::sleep(Duration::from_millis(20)),
        }
    };
    Output {
        status,
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    }
}

/// Runs `cmd` and fails the test (showing its output) unless it exits with 0.
pub fn run_ok(cmd: &mut Command) -> Output {
    let what = format!("{cmd:?}");
    let out = run(cmd, CLIENT_TIMEOUT);
    assert!(
        out.status.success(),
        "{what} failed with {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// `qemu-io -f raw` with each of `commands` as one `-c`; returns stdout + stderr.
///
/// qemu-io exits 0 even when a command inside fails, so callers that expect success
/// should use [`qemu_io_ok`], which also rejects the failure messages qemu-io prints.
pub fn qemu_io(uri: &str, commands: &[&str]) -> (bool, String) {
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "raw"]);
    for c in commands {
        cmd.args(["-c", c]);
    }
    cmd.arg(uri);
    let out = run(&mut cmd, CLIENT_TIMEOUT);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let failed = !out.status.success()
        || text.contains("failed")
        || text.contains("error")
        || text.contains("Error");
    (!failed, text)
}

/// Like [`qemu_io`], but the test fails unless every command succeeded.
pub fn qemu_io_ok(uri: &str, commands: &[&str]) -> String {
    let (ok, text) = qemu_io(uri, commands);
    assert!(ok, "qemu-io {commands:?} on {uri} failed:\n{text}");
    text
}

/// Deterministic pseudo-random bytes (xorshift), so failures can be reproduced.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        out.extend_from_slice(&state.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// NBD wire constants the raw test client needs (the server's own are private).
pub mod wire {
    pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
    pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
    pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
    pub const REQUEST_MAGIC: u32 = 0x2560_9513;
    pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
    pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
    pub const C_FIXED_NEWSTYLE: u32 = 1;
    pub const C_NO_ZEROES: u32 = 2;
    pub const OPT_EXPORT_NAME: u32 = 1;
    pub const OPT_ABORT: u32 = 2;
    pub const OPT_LIST: u32 = 3;
    pub const OPT_STARTTLS: u32 = 5;
    pub const OPT_INFO: u32 = 6;
    pub const OPT_GO: u32 = 7;
    pub const OPT_STRUCTURED_REPLY: u32 = 8;
    pub const OPT_LIST_META_CONTEXT: u32 = 9;
    pub const OPT_SET_META_CONTEXT: u32 = 10;
    pub const OPT_EXTENDED_HEADERS: u32 = 11;
    pub const REP_ACK: u32 = 1;
    pub const REP_SERVER: u32 = 2;
    pub const REP_INFO: u32 = 3;
    pub const REP_META_CONTEXT: u32 = 4;
    pub const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
    pub const REP_ERR_INVALID: u32 = (1 << 31) + 3;
    pub const REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;
    pub const REP_ERR_TOO_BIG: u32 = (1 << 31) + 9;
    pub const INFO_EXPORT: u16 = 0;
    pub const INFO_NAME: u16 = 1;
    pub const INFO_DESCRIPTION: u16 = 2;
    pub const INFO_BLOCK_SIZE: u16 = 3;
    pub const CMD_READ: u16 = 0;
    pub const CMD_WRITE: u16 = 1;
    pub const CMD_DISC: u16 = 2;
    pub const CMD_FLUSH: u16 = 3;
    pub const CMD_TRIM: u16 = 4;
    pub const CMD_CACHE: u16 = 5;
    pub const CMD_WRITE_ZEROES: u16 = 6;
    pub const CMD_BLOCK_STATUS: u16 = 7;
    pub const FLAG_FUA: u16 = 1;
    pub const FLAG_DF: u16 = 4;
    pub const FLAG_REQ_ONE: u16 = 8;
    pub const REPLY_FLAG_DONE: u16 = 1;
    pub const REPLY_TYPE_NONE: u16 = 0;
    pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
    pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
    pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
    pub const REPLY_TYPE_ERROR: u16 = (1 << 15) + 1;
    pub const FLAG_READ_ONLY: u16 = 2;
    pub const FLAG_SEND_DF: u16 = 1 << 7;
    pub const EPERM: u32 = 1;
    pub const EINVAL: u32 = 22;
    pub const ENOSPC: u32 = 28;
}

/// A hand-driven NBD client, for sending what real clients never would: over a Unix socket
/// (the default), over TCP, or over TLS after `NBD_OPT_STARTTLS` (`super::tls` makes the
/// client configuration). The one raw client of the tests: every protocol helper is written
/// once, for any byte stream. Every read has a timeout, so a server that stops answering
/// fails the test instead of hanging it.
pub struct RawClient<S: Read + Write = UnixStream> {
    /// The byte stream, for a test that sends and reads in bulk.
    pub stream: S,
}

/// One option reply: (option, reply type, data).
pub type OptionReply = (u32, u32, Vec<u8>);

impl RawClient<UnixStream> {
    /// Connects and reads the 18-byte greeting, checking its magics and flags.
    pub fn connect(socket: &Path) -> Self {
        let stream = UnixStream::connect(socket).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        RawClient::greeted(stream)
    }

    /// Connects, negotiates fixed newstyle without zeroes and enters transmission on
    /// `export` with `NBD_OPT_GO`; returns (size, transmission flags).
    pub fn go(socket: &Path, export: &str) -> (Self, u64, u16) {
        let mut client = Self::connect(socket);
        client.send_u32(wire::C_FIXED_NEWSTYLE | wire::C_NO_ZEROES);
        let (size, flags) = client
            .info_or_go(wire::OPT_GO, export, &[wire::INFO_BLOCK_SIZE])
            .unwrap_or_else(|(t, msg)| panic!("OPT_GO refused with {t:#x}: {msg}"));
        (client, size, flags)
    }

    /// The socket itself, for a test that sends and reads in bulk.
    pub fn stream(&mut self) -> &mut UnixStream {
        &mut self.stream
    }

    /// Closes both directions, as a client that dies would.
    pub fn hang_up(self) {
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
    }
}

impl RawClient<TcpStream> {
    /// Connects to 127.0.0.1:`port` (read and write timeouts of 20 s) and reads the greeting.
    pub fn connect_tcp(port: u16) -> Self {
        let stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .expect("timeout");
        stream
            .set_write_timeout(Some(Duration::from_secs(20)))
            .expect("timeout");
        RawClient::greeted(stream)
    }

    /// Connects, reads the greeting and answers fixed newstyle without zeroes.
    pub fn greet(port: u16) -> Self {
        let mut client = Self::connect_tcp(port);
        client.send_u32(wire::C_FIXED_NEWSTYLE | wire::C_NO_ZEROES);
        client
    }

    /// `NBD_OPT_STARTTLS`, then the TLS handshake with `config`; the client goes on over TLS.
    pub fn start_tls(
        mut self,
        config: Arc<ClientConfig>,
    ) -> Result<RawClient<StreamOwned<ClientConnection, TcpStream>>, String> {
        self.send_option(wire::OPT_STARTTLS, &[]);
        let (option, reply, data) = self.option_reply();
        assert_eq!(option, wire::OPT_STARTTLS);
        if reply != wire::REP_ACK {
            return Err(format!(
                "STARTTLS refused with {reply:#x}: {}",
                String::from_utf8_lossy(&data)
            ));
        }
        let name = ServerName::try_from("localhost").expect("server name");
        let mut conn = ClientConnection::new(config, name).expect("TLS client");
        let mut stream = self.stream;
        while conn.is_handshaking() {
            conn.complete_io(&mut stream)
                .map_err(|e| format!("TLS handshake: {e}"))?;
        }
        Ok(RawClient {
            stream: StreamOwned::new(conn, stream),
        })
    }
}

impl<S: Read + Write> RawClient<S> {
    /// Wraps a connected stream and reads the 18-byte greeting, checking its magics and
    /// flags (FIXED_NEWSTYLE|NO_ZEROES).
    fn greeted(stream: S) -> Self {
        let mut client = RawClient { stream };
        assert_eq!(client.u64(), wire::NBDMAGIC);
        assert_eq!(client.u64(), wire::IHAVEOPT);
        assert_eq!(client.u16(), 3, "handshake flags FIXED_NEWSTYLE|NO_ZEROES");
        client
    }

    /// `NBD_OPT_GO` for `export` without information requests: `Ok(size)`, or
    /// `Err(reply type)` on an error reply.
    pub fn go_to(&mut self, export: &str) -> Result<u64, u32> {
        self.info_or_go(wire::OPT_GO, export, &[])
            .map(|(size, _)| size)
            .map_err(|(reply, _)| reply)
    }

    /// Sends `NBD_OPT_INFO`/`GO` and reads replies to the final one. `Ok((size, flags))`
    /// on `NBD_REP_ACK`; `Err((reply type, message))` on an error reply.
    pub fn info_or_go(
        &mut self,
        option: u32,
        export: &str,
        requests: &[u16],
    ) -> Result<(u64, u16), (u32, String)> {
        let mut data = Vec::new();
        data.extend_from_slice(&(export.len() as u32).to_be_bytes());
        data.extend_from_slice(export.as_bytes());
        data.extend_from_slice(&(requests.len() as u16).to_be_bytes());
        for r in requests {
            data.extend_from_slice(&r.to_be_bytes());
        }
        self.send_option(option, &data);
        let mut export_info = None;
        loop {
            let (opt, reply_type, data) = self.option_reply();
            assert_eq!(opt, option);
            match reply_type {
                wire::REP_INFO => {
                    let info_type = u16::from_be_bytes([data[0], data[1]]);
                    if info_type == wire::INFO_EXPORT {
                        assert_eq!(data.len(), 12);
                        let size = u64::from_be_bytes(data[2..10].try_into().unwrap());
                        let flags = u16::from_be_bytes([data[10], data[11]]);
                        export_info = Some((size, flags));
                    }
                }
                wire::REP_ACK => return Ok(export_info.expect("ACK without NBD_INFO_EXPORT")),
                t => return Err((t, String::from_utf8_lossy(&data).into_owned())),
            }
        }
    }

    pub fn send_option(&mut self, option: u32, data: &[u8]) {
        let mut buf = Vec::new();
        buf.extend_from_slice(&wire::IHAVEOPT.to_be_bytes());
        buf.extend_from_slice(&option.to_be_bytes());
        buf.extend_from_slice(&(data.len() as u32).to_be_bytes());
        buf.extend_from_slice(data);
        self.send(&buf);
    }

    /// Reads one option reply header and its data.
    pub fn option_reply(&mut self) -> OptionReply {
        assert_eq!(self.u64(), wire::OPTION_REPLY_MAGIC);
        let option = self.u32();
        let reply_type = self.u32();
        let len = self.u32() as usize;
        (option, reply_type, self.bytes(len))
    }

    /// Sends a request header (and `payload`, which may be shorter than `length` on
    /// purpose).
    pub fn request(
        &mut self,
        flags: u16,
        command: u16,
        handle: u64,
        offset: u64,
        length: u32,
        payload: &[u8],
    ) {
        let mut buf = Vec::with_capacity(28 + payload.len());
        buf.extend_from_slice(&wire::REQUEST_MAGIC.to_be_bytes());
        buf.extend_from_slice(&flags.to_be_bytes());
        buf.extend_from_slice(&command.to_be_bytes());
        buf.extend_from_slice(&handle.to_be_bytes());
        buf.extend_from_slice(&offset.to_be_bytes());
        buf.extend_from_slice(&length.to_be_bytes());
        buf.extend_from_slice(payload);
        self.send(&buf);
    }

    /// Sends `NBD_OPT_LIST_META_CONTEXT` or `SET_META_CONTEXT` for `export` with `queries`
    /// and reads the replies: `Ok` with each context's (ID, name) on `NBD_REP_ACK`, `Err`
    /// with (reply type, message) on an error reply.
    pub fn meta_context(
        &mut self,
        option: u32,
        export: &str,
        queries: &[&str],
    ) -> Result<Vec<(u32, String)>, (u32, String)> {
        let mut data = Vec::new();
        data.extend_from_slice(&(export.len() as u32).to_be_bytes());
        data.extend_from_slice(export.as_bytes());
        data.extend_from_slice(&(queries.len() as u32).to_be_bytes());
        for q in queries {
            data.extend_from_slice(&(q.len() as u32).to_be_bytes());
            data.extend_from_slice(q.as_bytes());
        }
        self.send_option(option, &data);
        let mut contexts = Vec::new();
        loop {
            let (opt, reply_type, data) = self.option_reply();
            assert_eq!(opt, option);
            match reply_type {
                wire::REP_META_CONTEXT => {
                    let id = u32::from_be_bytes(data[..4].try_into().unwrap());
                    contexts.push((id, String::from_utf8(data[4..].to_vec()).unwrap()));
                }
                wire::REP_ACK => return Ok(contexts),
                t => return Err((t, String::from_utf8_lossy(&data).into_owned())),
            }
        }
    }

    /// Reads one structured reply chunk: (flags, type, handle, payload).
    pub fn chunk(&mut self) -> (u16, u16, u64, Vec<u8>) {
        assert_eq!(
            self.u32(),
            wire::STRUCTURED_REPLY_MAGIC,
            "structured reply magic"
        );
        let flags = self.u16();
        let chunk_type = self.u16();
        let handle = self.u64();
        let len = self.u32() as usize;
        (flags, chunk_type, handle, self.bytes(len))
    }

    /// Reads a structured error chunk (the last of its reply) for `handle`: (error, message).
    pub fn error_chunk(&mut self, handle: u64) -> (u32, String) {
        let (flags, chunk_type, h, payload) = self.chunk();
        assert_eq!(h, handle);
        assert_eq!(chunk_type, wire::REPLY_TYPE_ERROR, "an error chunk");
        assert_eq!(flags & wire::REPLY_FLAG_DONE, wire::REPLY_FLAG_DONE);
        let error = u32::from_be_bytes(payload[..4].try_into().unwrap());
        let len = u16::from_be_bytes([payload[4], payload[5]]) as usize;
        assert_eq!(payload.len(), 6 + len);
        (error, String::from_utf8(payload[6..].to_vec()).unwrap())
    }

    /// Reads a simple reply header: (error, handle).
    pub fn reply(&mut self) -> (u32, u64) {
        assert_eq!(self.u32(), wire::SIMPLE_REPLY_MAGIC, "simple reply magic");
        let error = self.u32();
        (error, self.u64())
    }

    /// Writes `data` at `offset` and expects success.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        self.request(
            0,
            wire::CMD_WRITE,
            0x1000 + offset,
            offset,
            data.len() as u32,
            data,
        );
        assert_eq!(self.reply(), (0, 0x1000 + offset), "write at {offset}");
    }

    /// Reads `len` bytes at `offset` and expects success.
    pub fn read(&mut self, offset: u64, len: u32) -> Vec<u8> {
        self.request(0, wire::CMD_READ, 0x2000 + offset, offset, len, &[]);
        assert_eq!(self.reply(), (0, 0x2000 + offset), "read at {offset}");
        self.bytes(len as usize)
    }

    /// Sends a request expected to fail, and returns the error value of its reply.
    pub fn failing(
        &mut self,
        flags: u16,
        command: u16,
        offset: u64,
        length: u32,
        payload: &[u8],
    ) -> u32 {
        self.request(flags, command, 0xbad, offset, length, payload);
        let (error, handle) = self.reply();
        assert_eq!(handle, 0xbad);
        error
    }

    /// Expects the server to have closed the connection (EOF or reset), after
    /// discarding anything it sent first.
    pub fn expect_closed(&mut self) {
        let mut buf = [0u8; 4096];
        loop {
            match self.stream.read(&mut buf) {
                Ok(0) => return,
                Ok(_) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return,
                // A read with a receive timeout returns EINTR instead of restarting when the
                // thread is interrupted (seen once in 60 runs of nbd_bad_input): read again.
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => panic!("expected the server to close the connection, got {e}"),
            }
        }
    }

    pub fn send(&mut self, buf: &[u8]) {
        self.stream.write_all(buf).expect("send");
        self.stream.flush().expect("flush");
    }

    pub fn send_u32(&mut self, v: u32) {
        self.send(&v.to_be_bytes());
    }

    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        self.stream.read_exact(&mut buf).expect("read from server");
        buf
    }

    pub fn u16(&mut self) -> u16 {
        u16::from_be_bytes(self.bytes(2).try_into().unwrap())
    }

    pub fn u32(&mut self) -> u32 {
        u32::from_be_bytes(self.bytes(4).try_into().unwrap())
    }

    pub fn u64(&mut self) -> u64 {
        u64::from_be_bytes(self.bytes(8).try_into().unwrap())
    }

    /// After sending an option: `false` once its reply has been read, `true` if the server
    /// closed the connection instead.
    pub fn closed_by_server_or_reply(&mut self) -> bool {
        let mut magic = [0u8; 8];
        match self.stream.read_exact(&mut magic) {
            Ok(()) => {
                assert_eq!(u64::from_be_bytes(magic), wire::OPTION_REPLY_MAGIC);
                let _option = self.u32();
                let _reply = self.u32();
                let len = self.u32() as usize;
                self.bytes(len);
                false
            }
            Err(_) => true,
        }
    }

    /// Everything the server sends until it closes the connection (the test fails if it
    /// does not close within the read timeout).
    pub fn until_closed(&mut self) -> Vec<u8> {
        let mut all = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match self.stream.read(&mut buf) {
                Ok(0) => return all,
                Ok(n) => all.extend_from_slice(&buf[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    panic!("the server did not close the connection")
                }
                Err(_) => return all,
            }
        }
    }

    /// Whether the server has closed the connection (EOF or reset) within the read
    /// timeout; panics if it sends anything instead.
    pub fn closed_by_server(&mut self) -> bool {
        let mut byte = [0u8; 1];
        match self.stream.read(&mut byte) {
            Ok(0) => true,
            Ok(_) => panic!("the server sent data where it should have closed"),
            Err(e) => !matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ),
        }
    }
}

/// The runtime a [`TestServer`] runs on (two workers, like a small machine).
pub fn test_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

/// fio's nbd engine: random writes of 4-64 KiB in `size` bytes from `offset`.
pub fn fio_cmd(uri: &str, workdir: &Path, offset: u64, size: u64, seconds: u64) -> Command {
    let mut cmd = Command::new("fio");
    cmd.current_dir(workdir).args([
        "--name=load",
        "--ioengine=nbd",
        &format!("--uri={uri}"),
        "--rw=randwrite",
        "--bsrange=4k-64k",
        "--iodepth=8",
        &format!("--offset={offset}"),
        &format!("--size={size}"),
        "--time_based",
        &format!("--runtime={seconds}"),
        "--norandommap",
        "--randrepeat=0",
        "--output-format=json",
    ]);
    cmd
}
