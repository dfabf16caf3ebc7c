//! Throwaway certificates for TLS tests, made with the `openssl` command: a CA, a server
//! certificate for 127.0.0.1 and localhost, and a client certificate for mutual TLS.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::process::unique_dir;

/// How long the certificates are valid; a test run is far shorter.
const VALID_DAYS: &str = "30";
/// Every key is on the P-256 curve: fast to make, and both OpenSSL and rustls take it.
const CURVE: &str = "ec_paramgen_curve:prime256v1";

/// A CA and the server and client certificates it signed, all PEM files in a fresh directory,
/// which is removed on drop. Share it between servers through an `Arc`.
#[derive(Debug)]
pub struct TestCerts {
    dir: PathBuf,
}

impl TestCerts {
    /// Makes the CA (a self-signed P-256 certificate), a server certificate with
    /// subjectAltName `IP:127.0.0.1, DNS:localhost`, and a client certificate. About 60 ms.
    /// Panics if `openssl` is missing or fails.
    pub fn generate() -> TestCerts {
        let dir = unique_dir("certs");
        fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
        let certs = TestCerts { dir };
        run(Command::new("openssl")
            .args(["req", "-x509", "-newkey", "ec", "-pkeyopt", CURVE, "-nodes"])
            .args(["-days", VALID_DAYS, "-subj", "/CN=Ferry test CA"])
            .args(["-addext", "basicConstraints=critical,CA:TRUE"])
            .args(["-addext", "keyUsage=critical,keyCertSign,cRLSign"])
            .arg("-keyout")
            .arg(certs.dir.join("ca.key"))
            .arg("-out")
            .arg(certs.ca_file()));
        // The server certificate may also act as a client (a Redis node talking to another).
        certs.sign(
            "server",
            "localhost",
            "subjectAltName=IP:127.0.0.1,DNS:localhost\n\
             extendedKeyUsage=serverAuth,clientAuth\n\
             basicConstraints=CA:FALSE\n",
        );
        certs.sign(
            "client",
            "ferry-test-client",
            "extendedKeyUsage=clientAuth\nbasicConstraints=CA:FALSE\n",
        );
        certs
    }

    /// The CA certificate, which clients and servers trust.
    pub fn ca_file(&self) -> PathBuf {
        self.dir.join("ca.crt")
    }

    /// The server certificate, for `127.0.0.1` and `localhost`.
    pub fn server_cert(&self) -> PathBuf {
        self.dir.join("server.crt")
    }

    pub fn server_key(&self) -> PathBuf {
        self.dir.join("server.key")
    }

    /// The client certificate, for servers that require one (mutual TLS).
    pub fn client_cert(&self) -> PathBuf {
        self.dir.join("client.crt")
    }

    pub fn client_key(&self) -> PathBuf {
        self.dir.join("client.key")
    }

    /// The CA certificate's PEM bytes.
    pub fn ca_pem(&self) -> Vec<u8> {
        read(&self.ca_file())
    }

    /// What the `redis` crate needs to connect over TLS to a kit server: the CA as the only
    /// root, and the client certificate for mutual TLS. Also installs ring as the process's
    /// rustls crypto provider if there is none yet, which a rustls client needs.
    pub fn redis_certificates(&self) -> redis::TlsCertificates {
        let _ = rustls::crypto::ring::default_provider().install_default();
        redis::TlsCertificates {
            client_tls: Some(redis::ClientTlsConfig {
                client_cert: read(&self.client_cert()),
                client_key: read(&self.client_key()),
            }),
            root_cert: Some(self.ca_pem()),
        }
    }

    /// Makes `<name>.key` and `<name>.crt` signed by the CA, with the extensions in `extensions`
    /// (an `openssl x509 -extfile`).
    fn sign(&self, name: &str, common_name: &str, extensions: &str) {
        let path = |extension: &str| self.dir.join(format!("{name}.{extension}"));
        fs::write(path("ext"), extensions)
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", path("ext").display()));
        run(Command::new("openssl")
            .args(["req", "-newkey", "ec", "-pkeyopt", CURVE, "-nodes"])
            .args(["-subj", &format!("/CN={common_name}")])
            .arg("-keyout")
            .arg(path("key"))
            .arg("-out")
            .arg(path("csr")));
        run(Command::new("openssl")
            .args(["x509", "-req", "-days", VALID_DAYS, "-CAcreateserial"])
            .arg("-in")
            .arg(path("csr"))
            .arg("-CA")
            .arg(self.ca_file())
            .arg("-CAkey")
            .arg(self.dir.join("ca.key"))
            .arg("-CAserial")
            .arg(self.dir.join("ca.srl"))
            .arg("-extfile")
            .arg(path("ext"))
            .arg("-out")
            .arg(path("crt")));
    }
}

impl Drop for TestCerts {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// Runs an `openssl` command; panics with its error output if it fails.
fn run(command: &mut Command) {
    let output = command.stdin(Stdio::null()).output().unwrap_or_else(|e| {
        panic!("cannot run `openssl` ({e}); the TLS tests need the openssl command on PATH")
    });
    assert!(
        output.status.success(),
        "{command:?} failed with {}: {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
}

fn read(path: &Path) -> Vec<u8> {
    fs::read(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}
