//! TLS for the tests: certificate authorities and certificates made with `openssl` in the
//! layouts nbdkit/qemu (server) and libnbd/qemu (client) read, and the client configuration
//! the raw NBD client (`super::nbd::RawClient::start_tls`) speaks STARTTLS with (for a
//! long-lived bystander connection and for what real clients never send).
//!
//! Must never: write outside the test's directory, or wait without a deadline (every
//! socket read has a timeout).

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore};

use super::nbd::{run_ok, RawClient};

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

/// The hand-driven NBD client over TCP or TLS: the one raw client, in `super::nbd`.
pub type Wire<S = TcpStream> = RawClient<S>;

pub const REP_ERR_TLS_REQD: u32 = (1 << 31) + 5;
