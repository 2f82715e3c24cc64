//! TLS for the tests: certificate authorities and certificates made with `openssl` in the
//! layouts nbdkit/qemu (server) and libnbd/qemu (client) read, and a hand-driven NBD
//! client that speaks STARTTLS through rustls (for a long-lived bystander connection and
//! for what real clients never send).
//!
//! Must never: write outside the test's directory, or wait without a deadline (every
//! socket read has a timeout).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, StreamOwned};

use super::nbd::{run_ok, wire};

/// A certificate authority: its key and self-signed certificate.
pub struct Ca {
    pub key: PathBuf,
    pub cert: PathBuf,
}

fn openssl(args: &[&str]) {
    run_ok(Command::new("openssl").args(args));
}

impl Ca {
    /// A new CA named `name` in `dir`.
    pub fn new(dir: &Path, name: &str) -> Ca {
        std::fs::create_dir_all(dir).unwrap();
        let key = dir.join(format!("{name}-ca.key"));
        let cert = dir.join(format!("{name}-ca.pem"));
        openssl(&[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            key.to_str().unwrap(),
            "-out",
            cert.to_str().unwrap(),
            "-subj",
            &format!("/CN={name} test CA"),
            "-days",
            "2",
        ]);
        Ca { key, cert }
    }

    /// Issues a certificate for `cn` into `cert`/`key`, valid for `days` from now
    /// (negative: already expired), for a server (`localhost`, `127.0.0.1`) or a client.
    pub fn issue(&self, key: &Path, cert: &Path, cn: &str, days: i32, server: bool) {
        let csr = cert.with_extension("csr");
        let ext = cert.with_extension("ext");
        openssl(&[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            key.to_str().unwrap(),
            "-out",
            csr.to_str().unwrap(),
            "-subj",
            &format!("/CN={cn}"),
        ]);
        let extensions = if server {
            "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n"
        } else {
            "extendedKeyUsage=clientAuth\n"
        };
        std::fs::write(&ext, extensions).unwrap();
        openssl(&[
            "x509",
            "-req",
            "-in",
            csr.to_str().unwrap(),
            "-CA",
            self.cert.to_str().unwrap(),
            "-CAkey",
            self.key.to_str().unwrap(),
            "-CAcreateserial",
            "-days",
            &days.to_string(),
            "-extfile",
            ext.to_str().unwrap(),
            "-out",
            cert.to_str().unwrap(),
        ]);
    }

    /// A server credentials directory (`server-cert.pem`, `server-key.pem`,
    /// `ca-cert.pem`: this CA, which client certificates must chain to).
    pub fn server_dir(&self, dir: &Path, days: i32) -> PathBuf {
        std::fs::create_dir_all(dir).unwrap();
        self.issue(
            &dir.join("server-key.pem"),
            &dir.join("server-cert.pem"),
            "localhost",
            days,
            true,
        );
        std::fs::copy(&self.cert, dir.join("ca-cert.pem")).unwrap();
        dir.to_path_buf()
    }

    /// A client directory for libnbd's `tls-certificates=` and qemu's `tls-creds-x509`:
    /// `ca-cert.pem` (this CA, which the server certificate must chain to) and, if
    /// `client_cert_from` is given, `client-cert.pem` / `client-key.pem` issued by it.
    pub fn client_dir(&self, dir: &Path, client_cert_from: Option<&Ca>) -> PathBuf {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::copy(&self.cert, dir.join("ca-cert.pem")).unwrap();
        if let Some(issuer) = client_cert_from {
            issuer.issue(
                &dir.join("client-key.pem"),
                &dir.join("client-cert.pem"),
                "tinylag test client",
                2,
                false,
            );
        }
        dir.to_path_buf()
    }
}

/// A rustls client configuration trusting the CA in `dir/ca-cert.pem`, presenting
/// `dir/client-cert.pem` if there is one.
pub fn client_config(dir: &Path) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    for ca in CertificateDer::pem_file_iter(dir.join("ca-cert.pem")).unwrap() {
        roots.add(ca.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let cert = dir.join("client-cert.pem");
    let config = if cert.exists() {
        let chain = CertificateDer::pem_file_iter(&cert)
            .unwrap()
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = PrivateKeyDer::from_pem_file(dir.join("client-key.pem")).unwrap();
        builder.with_client_auth_cert(chain, key).unwrap()
    } else {
        builder.with_no_client_auth()
    };
    Arc::new(config)
}

/// One option reply: (option, reply type, data).
pub type OptionReply = (u32, u32, Vec<u8>);

/// A hand-driven NBD client over any byte stream (plain TCP, or TLS after STARTTLS).
pub struct Wire<S: Read + Write> {
    pub stream: S,
}

/// A TCP connection with read and write timeouts.
pub fn connect(port: u16) -> TcpStream {
    let stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    stream
        .set_write_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    stream
}

impl Wire<TcpStream> {
    /// Connects, reads the greeting and answers fixed newstyle without zeroes.
    pub fn greet(port: u16) -> Self {
        let mut wire = Wire {
            stream: connect(port),
        };
        assert_eq!(wire.u64(), wire::NBDMAGIC);
        assert_eq!(wire.u64(), wire::IHAVEOPT);
        assert_eq!(wire.u16(), 3);
        wire.send(&(wire::C_FIXED_NEWSTYLE | wire::C_NO_ZEROES).to_be_bytes());
        wire
    }

    /// `NBD_OPT_STARTTLS`, then the TLS handshake with `config`.
    pub fn start_tls(
        mut self,
        config: Arc<ClientConfig>,
    ) -> Result<Wire<StreamOwned<ClientConnection, TcpStream>>, String> {
        self.send_option(wire::OPT_STARTTLS, &[]);
        let (option, reply, data) = self.option_reply();
        assert_eq!(option, wire::OPT_STARTTLS);
        if reply != wire::REP_ACK {
            return Err(format!(
                "STARTTLS refused with {reply:#x}: {}",
                String::from_utf8_lossy(&data)
            ));
        }
        let name = ServerName::try_from("localhost").unwrap();
        let mut conn = ClientConnection::new(config, name).unwrap();
        let mut stream = self.stream;
        while conn.is_handshaking() {
            conn.complete_io(&mut stream)
                .map_err(|e| format!("TLS handshake: {e}"))?;
        }
        Ok(Wire {
            stream: StreamOwned::new(conn, stream),
        })
    }
}

pub const REP_ERR_TLS_REQD: u32 = (1 << 31) + 5;

impl<S: Read + Write> Wire<S> {
    pub fn send(&mut self, buf: &[u8]) {
        self.stream.write_all(buf).expect("send");
        self.stream.flush().expect("flush");
    }

    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        let mut buf = vec![0; len];
        self.stream
            .read_exact(&mut buf)
            .expect("read from the server");
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

    pub fn send_option(&mut self, option: u32, data: &[u8]) {
        let mut buf = Vec::new();
        buf.extend_from_slice(&wire::IHAVEOPT.to_be_bytes());
        buf.extend_from_slice(&option.to_be_bytes());
        buf.extend_from_slice(&(data.len() as u32).to_be_bytes());
        buf.extend_from_slice(data);
        self.send(&buf);
    }

    pub fn option_reply(&mut self) -> OptionReply {
        assert_eq!(self.u64(), wire::OPTION_REPLY_MAGIC);
        let option = self.u32();
        let reply_type = self.u32();
        let len = self.u32() as usize;
        (option, reply_type, self.bytes(len))
    }

    /// `NBD_OPT_GO` for `export`; `Ok(size)` or `Err(reply type)`.
    pub fn go(&mut self, export: &str) -> Result<u64, u32> {
        let mut data = Vec::new();
        data.extend_from_slice(&(export.len() as u32).to_be_bytes());
        data.extend_from_slice(export.as_bytes());
        data.extend_from_slice(&0u16.to_be_bytes());
        self.send_option(wire::OPT_GO, &data);
        let mut size = None;
        loop {
            let (_, reply, data) = self.option_reply();
            match reply {
                wire::REP_INFO if data[..2] == wire::INFO_EXPORT.to_be_bytes() => {
                    size = Some(u64::from_be_bytes(data[2..10].try_into().unwrap()));
                }
                wire::REP_INFO => {}
                wire::REP_ACK => return Ok(size.expect("ACK without NBD_INFO_EXPORT")),
                other => return Err(other),
            }
        }
    }

    fn request(&mut self, command: u16, offset: u64, len: u32, payload: &[u8]) {
        let mut buf = Vec::with_capacity(28 + payload.len());
        buf.extend_from_slice(&wire::REQUEST_MAGIC.to_be_bytes());
        buf.extend_from_slice(&0u16.to_be_bytes());
        buf.extend_from_slice(&command.to_be_bytes());
        buf.extend_from_slice(&7u64.to_be_bytes());
        buf.extend_from_slice(&offset.to_be_bytes());
        buf.extend_from_slice(&len.to_be_bytes());
        buf.extend_from_slice(payload);
        self.send(&buf);
    }

    fn reply_error(&mut self) -> u32 {
        assert_eq!(self.u32(), wire::SIMPLE_REPLY_MAGIC);
        let error = self.u32();
        assert_eq!(self.u64(), 7, "reply handle");
        error
    }

    /// A WRITE in transmission; the test fails unless it succeeds.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        self.request(wire::CMD_WRITE, offset, data.len() as u32, data);
        assert_eq!(self.reply_error(), 0, "write at {offset}");
    }

    /// A READ in transmission; the test fails unless it succeeds.
    pub fn read(&mut self, offset: u64, len: u32) -> Vec<u8> {
        self.request(wire::CMD_READ, offset, len, &[]);
        assert_eq!(self.reply_error(), 0, "read at {offset}");
        self.bytes(len as usize)
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
