//! How the gateway reaches Redis: `rediss://` with a private CA, mutual TLS, an ACL user with its
//! password in the URL or in a file, and all of it at once on a Redis Cluster. Each test runs
//! a real gateway on real servers and checks that a message goes through the store and live
//! path (pub/sub over the same TLS settings).

mod common;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use ferry_router::testkit::{
    ClusterOptions, RedisAccess, RedisCluster, RedisOptions, RedisServer, TestCerts,
};

const USER: &str = "ferry-app";
const PASSWORD: &str = "pw-4c1d-not-in-logs";

fn tls_server(certs: &Arc<TestCerts>, require_client_cert: bool) -> RedisServer {
    RedisServer::start_with_access(
        RedisOptions::default(),
        RedisAccess {
            tls: Some(Arc::clone(certs)),
            tls_auth_clients: require_client_cert,
            acl: None,
        },
    )
}

fn acl_server() -> RedisServer {
    RedisServer::start_with_access(
        RedisOptions::default(),
        RedisAccess {
            acl: Some((USER.into(), PASSWORD.into())),
            ..RedisAccess::default()
        },
    )
}

/// A file holding `password` and a trailing newline (as `echo` or a Secret volume writes it).
fn password_file(password: &str) -> (tempfile_dir::Dir, PathBuf) {
    let dir = tempfile_dir::Dir::new();
    let path = dir.path().join("redis-password");
    std::fs::write(&path, format!("{password}\n")).expect("write the password file");
    (dir, path)
}

/// Alice sends to bob, who is connected: the message is stored and arrives live.
async fn one_message_goes_through(gw: &TestGateway) {
    let (mut bob, _) = gw.raw("bob").await;
    let (mut alice, _) = gw.raw("alice").await;
    let seq = raw_send(&mut alice, "m1", "bob", "over tls").await;
    let got = raw_messages(&mut bob, 1).await;
    assert_eq!(got, [(seq, "m1".to_string())]);
}

async fn readyz(gw: &TestGateway) -> u16 {
    gw.get("/readyz")
        .await
        .map(|(status, _)| status)
        .unwrap_or(0)
}

/// The store stays unready for a while: `/readyz` never answers 200 within `quiet`.
async fn stays_unready(gw: &TestGateway, quiet: Duration) {
    let deadline = tokio::time::Instant::now() + quiet;
    while tokio::time::Instant::now() < deadline {
        assert_ne!(readyz(gw).await, 200, "ready without a usable store");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rediss_with_a_private_ca_works() {
    let certs = Arc::new(TestCerts::generate());
    let server = tls_server(&certs, false);
    let url = server.tls_url();
    let ca = certs.ca_file();
    let gw = TestGateway::start_on(EngineKind::Redis, Some(server), |c| {
        c.redis_url = Some(url.into());
        c.redis_ca_file = Some(ca);
    })
    .await;
    eventually("ready over TLS", || async { readyz(&gw).await == 200 }).await;
    one_message_goes_through(&gw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rediss_without_the_ca_is_not_trusted() {
    let certs = Arc::new(TestCerts::generate());
    let server = tls_server(&certs, false);
    let url = server.tls_url();
    // The system's roots do not include the test CA: the handshake must fail, not be skipped.
    let gw = TestGateway::start_on(EngineKind::Redis, Some(server), |c| {
        c.redis_url = Some(url.into());
    })
    .await;
    stays_unready(&gw, Duration::from_secs(2)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_needs_the_client_certificate() {
    let certs = Arc::new(TestCerts::generate());
    let server = tls_server(&certs, true);
    let url = server.tls_url();

    let without = TestGateway::start_on(EngineKind::Redis, None, |c| {
        c.redis_url = Some(url.clone().into());
        c.redis_ca_file = Some(certs.ca_file());
    })
    .await;
    stays_unready(&without, Duration::from_secs(2)).await;
    drop(without);

    let with = TestGateway::start_on(EngineKind::Redis, Some(server), |c| {
        c.redis_url = Some(url.into());
        c.redis_ca_file = Some(certs.ca_file());
        c.redis_client_cert = Some(certs.client_cert());
        c.redis_client_key = Some(certs.client_key());
    })
    .await;
    eventually("ready with mTLS", || async { readyz(&with).await == 200 }).await;
    one_message_goes_through(&with).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acl_user_from_the_url_works() {
    let server = acl_server();
    // The kit's URL carries `ferry-app:<password>@`.
    assert!(server.url().contains(PASSWORD));
    let gw = TestGateway::start_on(EngineKind::Redis, Some(server), |_| {}).await;
    eventually("ready with the ACL user", || async {
        readyz(&gw).await == 200
    })
    .await;
    one_message_goes_through(&gw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acl_password_from_a_file_works_and_a_wrong_one_does_not() {
    let server = acl_server();
    let url = format!("redis://{USER}@127.0.0.1:{}/", server.port());

    let (_dir, wrong) = password_file("not-the-password");
    let refused = TestGateway::start_on(EngineKind::Redis, None, |c| {
        c.redis_url = Some(url.clone().into());
        c.redis_password_file = Some(wrong);
    })
    .await;
    stays_unready(&refused, Duration::from_secs(2)).await;
    drop(refused);

    let (_dir, right) = password_file(PASSWORD);
    let gw = TestGateway::start_on(EngineKind::Redis, Some(server), |c| {
        c.redis_url = Some(url.into());
        c.redis_password_file = Some(right);
    })
    .await;
    eventually("ready with the password file", || async {
        readyz(&gw).await == 200
    })
    .await;
    one_message_goes_through(&gw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_cluster_with_an_acl_user_and_mtls_works() {
    let certs = Arc::new(TestCerts::generate());
    let cluster = RedisCluster::start(ClusterOptions {
        tls: Some(Arc::clone(&certs)),
        tls_auth_clients: true,
        acl: Some((USER.into(), PASSWORD.into())),
        ..ClusterOptions::default()
    });
    // Seed URLs with the user but without the password, which comes from a file.
    let seeds: Vec<String> = cluster
        .seed_urls()
        .iter()
        .map(|url| url.replace(&format!(":{PASSWORD}@"), "@"))
        .collect();
    assert!(
        seeds
            .iter()
            .all(|s| s.starts_with("rediss://") && !s.contains(PASSWORD))
    );
    let (_dir, password) = password_file(PASSWORD);
    let gw = TestGateway::start_on(EngineKind::Redis, None, |c| {
        c.redis_url = Some(seeds.join(",").into());
        c.redis_cluster = true;
        c.redis_password_file = Some(password);
        c.redis_ca_file = Some(certs.ca_file());
        c.redis_client_cert = Some(certs.client_cert());
        c.redis_client_key = Some(certs.client_key());
    })
    .await;
    eventually("ready on the TLS cluster", || async {
        readyz(&gw).await == 200
    })
    .await;
    // Recipients on every shard: some user in each primary's slots.
    let recipients: Vec<String> = (0..24).map(|i| format!("user{i}")).collect();
    let mut conns = Vec::new();
    for name in &recipients {
        conns.push(gw.raw(name).await.0);
    }
    let (mut alice, _) = gw.raw("alice").await;
    for (i, name) in recipients.iter().enumerate() {
        raw_send(&mut alice, &format!("m{i}"), name, "hi").await;
    }
    for (i, conn) in conns.iter_mut().enumerate() {
        let got = raw_messages(conn, 1).await;
        assert_eq!(got, [(1, format!("m{i}"))]);
    }
    let primaries = cluster.primaries();
    let shards_used: std::collections::HashSet<u16> = recipients
        .iter()
        .map(|name| cluster.primary_for_slot(cluster.slot_of(&gw.key(name, "meta"))))
        .collect();
    assert_eq!(shards_used.len(), primaries.len(), "every shard was used");
}

/// A temporary directory removed on drop (the tests' password files).
mod tempfile_dir {
    use std::path::{Path, PathBuf};

    pub struct Dir(PathBuf);

    impl Dir {
        pub fn new() -> Dir {
            let path = std::env::temp_dir().join(format!(
                "ferry-test-secret-{}-{}",
                std::process::id(),
                ferry_router::testkit::unique_prefix()
            ));
            std::fs::create_dir_all(&path).expect("create a temporary directory");
            Dir(path)
        }

        pub fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}
