//! Where the Redis engine connects, and how: one standalone server or a Redis Cluster's seed
//! nodes, plain or TLS (`rediss://`, with a private CA and a client certificate for mTLS), and
//! the ACL user and password, from the URL or from a file.
//!
//! A password never leaves this module in text: `RedisTarget`'s `Debug` redacts it, and errors
//! name what is wrong, never the URL.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Once};

use redis::{ConnectionAddr, ConnectionInfo, IntoConnectionInfo, TlsCertificates};

use crate::engine::EngineError;

/// Where and how to reach Redis.
#[derive(Clone, Default)]
pub struct RedisTarget {
    /// One URL for a standalone server; for a cluster, any number of seed nodes (the rest are
    /// found through them).
    pub urls: Vec<String>,
    /// Treat the URLs as seeds of a Redis Cluster.
    pub cluster: bool,
    /// A password that replaces the URL's (read from a file, so it stays out of the process
    /// list).
    pub password: Option<String>,
    /// PEM file of the certificate authorities to trust for `rediss://`; without it, the
    /// system's roots.
    pub ca_file: Option<PathBuf>,
    /// PEM files of a client certificate and its key, for servers that require mTLS.
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
}

impl RedisTarget {
    /// One standalone server at `url`, with the URL's own credentials.
    pub fn standalone(url: impl Into<String>) -> Self {
        Self {
            urls: vec![url.into()],
            ..Self::default()
        }
    }

    /// A Redis Cluster reached through `seeds`.
    pub fn cluster<S: Into<String>>(seeds: impl IntoIterator<Item = S>) -> Self {
        Self {
            urls: seeds.into_iter().map(Into::into).collect(),
            cluster: true,
            ..Self::default()
        }
    }

    /// Parses and checks everything, reading the certificate files: what the engine connects
    /// with.
    pub(crate) fn resolve(&self) -> Result<Resolved, EngineError> {
        let bad = |reason: &str| EngineError::Internal(format!("Redis settings: {reason}"));
        if self.urls.is_empty() {
            return Err(bad("no Redis URL"));
        }
        if !self.cluster && self.urls.len() > 1 {
            return Err(bad(
                "several URLs are seed nodes of a cluster: add --redis-cluster",
            ));
        }
        let mut nodes = Vec::with_capacity(self.urls.len());
        for url in &self.urls {
            // The redis crate's parse errors do not repeat the URL.
            let info = url
                .as_str()
                .into_connection_info()
                .map_err(|e| bad(&format!("invalid Redis URL: {e}")))?;
            let info = match &self.password {
                Some(password) => {
                    let settings = info.redis_settings().clone().set_password(password);
                    info.set_redis_settings(settings)
                }
                None => info,
            };
            nodes.push(info);
        }
        let tls_of = |info: &ConnectionInfo| match info.addr() {
            ConnectionAddr::TcpTls { insecure, .. } => Some(*insecure),
            _ => None,
        };
        let tls = tls_of(&nodes[0]).is_some();
        if nodes.iter().any(|n| tls_of(n).is_some() != tls) {
            return Err(bad("mixes redis:// and rediss:// URLs"));
        }
        if nodes.iter().any(|n| tls_of(n) == Some(true)) {
            return Err(bad(
                "certificate checks cannot be turned off (#insecure); trust a private CA with \
                 --redis-ca-file",
            ));
        }
        if nodes
            .iter()
            .any(|n| matches!(n.addr(), ConnectionAddr::Unix(_)))
        {
            return Err(bad(
                "Unix sockets are not supported; use redis:// or rediss://",
            ));
        }
        if self.cluster && nodes.iter().any(|n| n.redis_settings().db() != 0) {
            return Err(bad("a Redis Cluster has only database 0"));
        }
        let files = TlsFiles::read(self)?;
        if files.is_some() && !tls {
            return Err(bad(
                "a CA file or client certificate needs rediss:// URLs (TLS)",
            ));
        }
        let tls = if tls {
            install_crypto_provider();
            let files = files.unwrap_or_default();
            Some(Tls {
                config: Arc::new(files.client_config()?),
                certificates: files.certificates(),
            })
        } else {
            None
        };
        Ok(Resolved {
            nodes,
            cluster: self.cluster,
            tls,
        })
    }
}

impl fmt::Debug for RedisTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let urls: Vec<String> = self.urls.iter().map(|u| redact_url(u)).collect();
        f.debug_struct("RedisTarget")
            .field("urls", &urls)
            .field("cluster", &self.cluster)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("ca_file", &self.ca_file)
            .field("client_cert", &self.client_cert)
            .field("client_key", &self.client_key)
            .finish()
    }
}

/// `url` with its password (if any) replaced by `<redacted>`, for logs and debug output.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return "<unparsable URL>".into();
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split_once(':').map_or(userinfo, |(user, _)| user);
            let secret = if userinfo.contains(':') {
                ":<redacted>"
            } else {
                ""
            };
            format!("{scheme}://{user}{secret}@{host}{tail}")
        }
        None => url.to_owned(),
    }
}

/// A checked target.
pub(crate) struct Resolved {
    /// Every URL's connection settings, the password applied.
    pub nodes: Vec<ConnectionInfo>,
    pub cluster: bool,
    pub tls: Option<Tls>,
}

/// The TLS settings, for the redis crate's connections and for the live bus's own.
pub(crate) struct Tls {
    pub config: Arc<rustls::ClientConfig>,
    pub certificates: TlsCertificates,
}

impl Resolved {
    /// A client of the standalone server.
    pub fn client(&self) -> Result<redis::Client, EngineError> {
        let info = self.nodes[0].clone();
        let client = match &self.tls {
            Some(tls) => redis::Client::build_with_tls(info, tls.certificates.clone()),
            None => redis::Client::open(info),
        };
        client.map_err(|e| EngineError::Internal(format!("cannot set up a Redis client: {e}")))
    }

    /// A client of the cluster, through its seeds. Commands are always routed to primaries
    /// (nothing here enables reads from replicas: a replica's stale head would look like data
    /// loss).
    pub fn cluster_client(
        &self,
        store_timeout: std::time::Duration,
    ) -> Result<redis::cluster::ClusterClient, EngineError> {
        let mut builder = redis::cluster::ClusterClientBuilder::new(self.nodes.clone())
            .connection_timeout(store_timeout)
            .response_timeout(store_timeout)
            // MOVED and ASK are followed at once; TRYAGAIN (a slot migrating under a
            // multi-key script) and a failover in progress are retried a few times with
            // short waits, all within the store timeout.
            .retries(6)
            .min_retry_wait(10)
            .max_retry_wait(250);
        if let Some(tls) = &self.tls {
            builder = builder
                .tls(redis::TlsMode::Secure)
                .certs(tls.certificates.clone());
        }
        builder.build().map_err(|e| {
            EngineError::Internal(format!("cannot set up a Redis Cluster client: {e}"))
        })
    }
}

/// The certificate files, read.
#[derive(Default)]
struct TlsFiles {
    ca: Option<Vec<u8>>,
    client: Option<(Vec<u8>, Vec<u8>)>,
}

impl TlsFiles {
    fn read(target: &RedisTarget) -> Result<Option<TlsFiles>, EngineError> {
        let read = |path: &Path, what: &str| {
            std::fs::read(path).map_err(|e| {
                EngineError::Internal(format!("cannot read the {what} {}: {e}", path.display()))
            })
        };
        let ca = target
            .ca_file
            .as_deref()
            .map(|p| read(p, "Redis CA file"))
            .transpose()?;
        let client = match (&target.client_cert, &target.client_key) {
            (Some(cert), Some(key)) => Some((
                read(cert, "Redis client certificate")?,
                read(key, "Redis client key")?,
            )),
            (None, None) => None,
            _ => {
                return Err(EngineError::Internal(
                    "Redis settings: a client certificate needs its key, and the other way round"
                        .into(),
                ));
            }
        };
        Ok((ca.is_some() || client.is_some()).then_some(TlsFiles { ca, client }))
    }

    fn certificates(self) -> TlsCertificates {
        TlsCertificates {
            client_tls: self
                .client
                .map(|(client_cert, client_key)| redis::ClientTlsConfig {
                    client_cert,
                    client_key,
                }),
            root_cert: self.ca,
        }
    }

    /// The same settings as a rustls configuration, for the live bus's connections.
    fn client_config(&self) -> Result<rustls::ClientConfig, EngineError> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};

        let bad = |what: &str, e: &dyn fmt::Display| {
            EngineError::Internal(format!("Redis TLS settings: {what}: {e}"))
        };
        let mut roots = rustls::RootCertStore::empty();
        match &self.ca {
            Some(pem) => {
                for cert in CertificateDer::pem_slice_iter(pem) {
                    let cert = cert.map_err(|e| bad("the CA file is not PEM", &e))?;
                    roots
                        .add(cert)
                        .map_err(|e| bad("a CA certificate is unusable", &e))?;
                }
                if roots.is_empty() {
                    return Err(EngineError::Internal(
                        "Redis TLS settings: the CA file holds no certificate".into(),
                    ));
                }
            }
            None => {
                let native = rustls_native_certs::load_native_certs();
                for cert in native.certs {
                    // A system root that rustls cannot use is skipped, as every client does.
                    let _ = roots.add(cert);
                }
            }
        }
        let builder = rustls::ClientConfig::builder().with_root_certificates(roots);
        match &self.client {
            Some((cert, key)) => {
                let chain = CertificateDer::pem_slice_iter(cert)
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| bad("the client certificate is not PEM", &e))?;
                let key = PrivateKeyDer::from_pem_slice(key)
                    .map_err(|e| bad("the client key is not PEM", &e))?;
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(|e| bad("the client certificate and key do not match", &e))
            }
            None => Ok(builder.with_no_client_auth()),
        }
    }
}

/// rustls needs one process-wide crypto provider; the workspace builds ring's.
fn install_crypto_provider() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // Another part of the process may have installed one already; that one serves.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact_url("rediss://ferry:s3cret@redis.example:6380/0"),
            "rediss://ferry:<redacted>@redis.example:6380/0"
        );
        assert_eq!(
            redact_url("redis://:s3cret@10.0.0.1:6379"),
            "redis://:<redacted>@10.0.0.1:6379"
        );
        assert_eq!(redact_url("redis://ferry@h:1/"), "redis://ferry@h:1/");
        assert_eq!(redact_url("redis://h:1/"), "redis://h:1/");
        assert_eq!(
            redact_url("redis://u:p@ss@h:1/"),
            "redis://u:<redacted>@h:1/"
        );
        assert_eq!(redact_url("nonsense"), "<unparsable URL>");
        let target = RedisTarget {
            password: Some("hunter2".into()),
            ..RedisTarget::standalone("redis://u:s3cret@h:1/")
        };
        let debug = format!("{target:?}");
        assert!(
            !debug.contains("s3cret") && !debug.contains("hunter2"),
            "{debug}"
        );
    }

    #[test]
    fn settings_that_cannot_work_are_refused() {
        let refused = |target: RedisTarget| match target.resolve() {
            Err(EngineError::Internal(reason)) => reason,
            Err(other) => panic!("unexpected {other:?}"),
            Ok(_) => panic!("accepted {target:?}"),
        };
        assert!(refused(RedisTarget::default()).contains("no Redis URL"));
        let two = RedisTarget {
            urls: vec!["redis://a:1".into(), "redis://b:1".into()],
            ..RedisTarget::default()
        };
        assert!(refused(two).contains("--redis-cluster"));
        let mixed = RedisTarget::cluster(["redis://a:1", "rediss://b:1"]);
        assert!(refused(mixed).contains("mixes"));
        assert!(refused(RedisTarget::standalone("rediss://a:1/#insecure")).contains("cannot"));
        assert!(refused(RedisTarget::cluster(["redis://a:1/3"])).contains("database 0"));
        let ca_without_tls = RedisTarget {
            ca_file: Some("/dev/null".into()),
            ..RedisTarget::standalone("redis://a:1")
        };
        assert!(refused(ca_without_tls).contains("rediss://"));
        let cert_without_key = RedisTarget {
            client_cert: Some("/dev/null".into()),
            ..RedisTarget::standalone("rediss://a:1")
        };
        assert!(refused(cert_without_key).contains("its key"));
        let missing = RedisTarget {
            ca_file: Some("/nonexistent/ca.pem".into()),
            ..RedisTarget::standalone("rediss://a:1")
        };
        assert!(refused(missing).contains("cannot read the Redis CA file"));
        let not_pem = RedisTarget {
            ca_file: Some("/dev/null".into()),
            ..RedisTarget::standalone("rediss://a:1")
        };
        assert!(refused(not_pem).contains("no certificate"));
        let bad_url = refused(RedisTarget::standalone("redis://u:s3cret@h:notaport/"));
        assert!(!bad_url.contains("s3cret"), "{bad_url}");
    }
}
