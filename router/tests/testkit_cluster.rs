//! The test kit's Redis Cluster, TLS and ACL servers do what the cluster and security tests rely
//! on: the cluster forms with every slot served, slots move with their keys while a client
//! writes, failover and crashes swap roles, and TLS and ACL refuse whom they should.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::Duration;

use ferry_router::testkit::{
    ClusterOptions, RedisAccess, RedisCluster, RedisOptions, RedisServer, TestCerts,
};
use redis::Commands;
use redis::cluster::ClusterClient;

const TIMEOUT: Duration = Duration::from_secs(5);

fn cluster_connection(client: &ClusterClient) -> redis::cluster::ClusterConnection {
    client.get_connection().expect("a cluster connection")
}

#[test]
fn the_shared_cluster_has_three_primaries_each_with_a_replica_and_serves_every_slot() {
    let cluster = RedisCluster::shared();
    let primaries = cluster.primaries();
    assert_eq!(primaries.len(), 3, "{primaries:?}");
    assert_eq!(cluster.nodes().len(), 6);
    for &primary in &primaries {
        assert_eq!(
            cluster.replicas_of(primary).len(),
            1,
            "replicas of {primary}"
        );
    }
    for node in cluster.nodes() {
        let info = cluster.cli(node.port(), &["CLUSTER", "INFO"]);
        assert!(info.contains("cluster_state:ok"), "{info}");
        assert!(info.contains("cluster_slots_assigned:16384"), "{info}");
    }
    for key in [
        "",
        "a",
        "user:42",
        "{bob}inbox",
        "{bob}epoch",
        "a{}b{c}",
        "{}x",
        "é{",
    ] {
        let by_server = cluster.cli(primaries[0], &["CLUSTER", "KEYSLOT", key]);
        assert_eq!(
            cluster.slot_of(key).to_string(),
            by_server,
            "slot of {key:?}"
        );
    }
    let tag = cluster.hash_tag_for_slot(1234);
    assert_eq!(cluster.slot_of(&format!("{tag}inbox")), 1234);
    assert_eq!(cluster.primary_for_slot(0), primaries[0]);

    let client = ClusterClient::new(cluster.seed_urls()).unwrap();
    let mut connection = cluster_connection(&client);
    for i in 0..30 {
        let _: () = connection.set(format!("testkit-shared:{i}"), i).unwrap();
    }
    for i in 0..30 {
        let value: i64 = connection.get(format!("testkit-shared:{i}")).unwrap();
        assert_eq!(value, i);
    }
}

#[test]
fn a_slot_moves_with_its_keys_while_a_client_writes_to_it() {
    let cluster = RedisCluster::start(ClusterOptions::default());
    let slot = cluster.slot_of("{ferry}");
    let source = cluster.primary_for_slot(slot);
    let target = cluster
        .primaries()
        .into_iter()
        .find(|&port| port != source)
        .unwrap();
    let client = ClusterClient::new(cluster.seed_urls()).unwrap();
    let mut connection = cluster_connection(&client);
    for i in 0..100 {
        let _: () = connection.set(format!("{{ferry}}:{i}"), i).unwrap();
    }

    let stop = Arc::new(AtomicBool::new(false));
    let writer = thread::spawn({
        let (client, stop) = (client.clone(), stop.clone());
        move || {
            let mut connection = cluster_connection(&client);
            let mut pushed = 0i64;
            while !stop.load(Ordering::Relaxed) {
                let _: () = connection.rpush("{ferry}:log", pushed).unwrap();
                pushed += 1;
            }
            pushed
        }
    });
    cluster.migrate_slot_slowly(slot, target, Duration::from_millis(5));
    stop.store(true, Ordering::Relaxed);
    let pushed = writer.join().unwrap();

    assert_eq!(cluster.primary_for_slot(slot), target);
    let count = |port| cluster.cli(port, &["CLUSTER", "COUNTKEYSINSLOT", &slot.to_string()]);
    assert_eq!(count(source), "0");
    assert_eq!(count(target), "101");
    for i in 0..100 {
        let value: i64 = connection.get(format!("{{ferry}}:{i}")).unwrap();
        assert_eq!(value, i);
    }
    let log: Vec<i64> = connection.lrange("{ferry}:log", 0, -1).unwrap();
    assert!(pushed > 0);
    assert_eq!(
        log,
        (0..pushed).collect::<Vec<_>>(),
        "every push, once, in order"
    );

    // Half way back: a moved key is still readable (ASK), and the rest follows on finish.
    let mut migration = cluster.begin_migration(slot, source);
    assert_eq!(migration.move_keys(10), 10);
    assert_eq!(migration.keys_left(), 91);
    let mut fresh = cluster_connection(&ClusterClient::new(cluster.seed_urls()).unwrap());
    for i in 0..100 {
        let value: i64 = fresh.get(format!("{{ferry}}:{i}")).unwrap();
        assert_eq!(value, i);
    }
    migration.finish();
    assert_eq!(cluster.primary_for_slot(slot), source);
    assert_eq!(count(source), "101");
    cluster.wait_converged();
}

#[test]
fn failover_swaps_roles_and_a_killed_primary_is_replaced_by_its_replica() {
    let mut cluster = RedisCluster::start(ClusterOptions::default());
    let primary = cluster.primary_for_slot(0);
    let replica = cluster.replicas_of(primary)[0];
    let client = ClusterClient::new(cluster.seed_urls()).unwrap();
    let mut connection = cluster_connection(&client);
    let key = format!("{}kept", cluster.hash_tag_for_slot(0));
    let _: () = connection.set(&key, "yes").unwrap();
    let _ = cluster.cli(primary, &["WAIT", "1", "5000"]);

    cluster.failover(replica);
    assert_eq!(cluster.primary_for_slot(0), replica);
    assert_eq!(cluster.replicas_of(replica), vec![primary]);
    assert!(cluster.cli(primary, &["ROLE"]).starts_with("slave"));

    cluster.kill_primary(replica);
    assert_eq!(cluster.wait_for_new_primary(0), primary);
    cluster.node_by_port_mut(replica).restart();
    cluster.wait_converged();
    assert_eq!(cluster.replicas_of(primary), vec![replica]);
    let value: String = connection.get(&key).unwrap();
    assert_eq!(value, "yes");
}

#[test]
fn a_tls_server_answers_rediss_with_the_ca_and_refuses_plain_text_on_its_tls_port() {
    let certs = Arc::new(TestCerts::generate());
    let server = RedisServer::start_with_access(
        RedisOptions::default(),
        RedisAccess {
            tls: Some(certs.clone()),
            tls_auth_clients: true,
            acl: None,
        },
    );
    assert_eq!(
        server.tls_url(),
        format!("rediss://127.0.0.1:{}/", server.tls_port())
    );
    let client = redis::Client::build_with_tls(server.tls_url(), certs.redis_certificates())
        .expect("a TLS client");
    let mut connection = client.get_connection_with_timeout(TIMEOUT).unwrap();
    let pong: String = redis::cmd("PING").query(&mut connection).unwrap();
    assert_eq!(pong, "PONG");

    let plain = redis::Client::open(format!("redis://127.0.0.1:{}/", server.tls_port())).unwrap();
    assert!(ping(&plain).is_err(), "plain text on the TLS port");
    let without_client_cert = redis::Client::build_with_tls(
        server.tls_url(),
        redis::TlsCertificates {
            client_tls: None,
            root_cert: Some(certs.ca_pem()),
        },
    )
    .unwrap();
    assert!(
        ping(&without_client_cert).is_err(),
        "TLS without a client certificate"
    );
    assert_eq!(
        server.cmd(&["PING"]),
        redis::Value::SimpleString("PONG".into())
    );
}

#[test]
fn an_acl_server_refuses_anonymous_clients_and_accepts_its_user_and_replicas() {
    let server = RedisServer::start_with_access(
        RedisOptions::default(),
        RedisAccess {
            acl: Some(("ferry".to_owned(), "p@ss:word".to_owned())),
            ..RedisAccess::default()
        },
    );
    let port = server.port();
    assert_eq!(
        server.url(),
        format!("redis://ferry:p%40ss%3Aword@127.0.0.1:{port}/")
    );
    let anonymous = redis::Client::open(format!("redis://127.0.0.1:{port}/")).unwrap();
    assert!(ping(&anonymous).is_err(), "no password");
    let wrong = redis::Client::open(format!("redis://ferry:wrong@127.0.0.1:{port}/")).unwrap();
    assert!(ping(&wrong).is_err(), "a wrong password");

    let mut connection = redis::Client::open(server.url())
        .unwrap()
        .get_connection_with_timeout(TIMEOUT)
        .unwrap();
    let _: () = connection.set("k", "v").unwrap();
    let replica = server.start_replica();
    let mut on_replica = redis::Client::open(replica.url())
        .unwrap()
        .get_connection_with_timeout(TIMEOUT)
        .unwrap();
    let value: Option<String> = on_replica.get("k").unwrap();
    assert_eq!(value.as_deref(), Some("v"));
}

#[test]
fn a_tls_cluster_with_an_acl_user_serves_clients_and_announces_its_tls_ports() {
    let certs = Arc::new(TestCerts::generate());
    let cluster = RedisCluster::start(ClusterOptions {
        tls: Some(certs.clone()),
        tls_auth_clients: true,
        acl: Some(("ferry".to_owned(), "secret".to_owned())),
        ..ClusterOptions::default()
    });
    let seeds = cluster.seed_urls();
    assert!(
        seeds
            .iter()
            .all(|url| url.starts_with("rediss://ferry:secret@127.0.0.1:")),
        "{seeds:?}"
    );
    let client = ClusterClient::builder(seeds)
        .certs(certs.redis_certificates())
        .build()
        .unwrap();
    let mut connection = cluster_connection(&client);
    for i in 0..30 {
        let _: () = connection.set(format!("tls:{i}"), i).unwrap();
    }

    // Over TLS, CLUSTER SLOTS names every node by its TLS port.
    let direct = redis::Client::build_with_tls(cluster.url(), certs.redis_certificates()).unwrap();
    let slots: redis::Value = redis::cmd("CLUSTER")
        .arg("SLOTS")
        .query(&mut direct.get_connection_with_timeout(TIMEOUT).unwrap())
        .unwrap();
    let ports = announced_ports(&slots);
    assert_eq!(ports.len(), 6, "{slots:?}");
    for port in ports {
        assert_eq!(cluster.node_by_port(port).tls_port(), port);
    }

    // MIGRATE between nodes goes over TLS and authenticates.
    let slot = cluster.slot_of("tls:7");
    let source = cluster.primary_for_slot(slot);
    let target = cluster
        .primaries()
        .into_iter()
        .find(|&p| p != source)
        .unwrap();
    cluster.migrate_slot(slot, target);
    assert_eq!(cluster.primary_for_slot(slot), target);
    for i in 0..30 {
        let value: i64 = connection.get(format!("tls:{i}")).unwrap();
        assert_eq!(value, i);
    }
}

/// PING on a new connection to `client`, with timeouts so a server that never answers fails.
fn ping(client: &redis::Client) -> redis::RedisResult<String> {
    let mut connection = client.get_connection_with_timeout(TIMEOUT)?;
    connection.set_read_timeout(Some(TIMEOUT))?;
    redis::cmd("PING").query(&mut connection)
}

/// The ports of the nodes a CLUSTER SLOTS answer lists.
fn announced_ports(slots: &redis::Value) -> Vec<u16> {
    let mut ports = Vec::new();
    let redis::Value::Array(ranges) = slots else {
        panic!("{slots:?}");
    };
    for range in ranges {
        let redis::Value::Array(fields) = range else {
            panic!("{range:?}");
        };
        for node in &fields[2..] {
            let redis::Value::Array(parts) = node else {
                panic!("{node:?}");
            };
            let redis::Value::Int(port) = parts[1] else {
                panic!("{node:?}");
            };
            let port = u16::try_from(port).unwrap();
            if !ports.contains(&port) {
                ports.push(port);
            }
        }
    }
    ports
}

#[test]
fn slots_are_computed_as_redis_computes_them() {
    // `slot_of` is the router's own function (crate::cluster::slot_of_key): checked here against
    // the server, hash tags and their edge cases included.
    let cluster = RedisCluster::shared();
    let port = cluster.primaries()[0];
    let mut keys: Vec<String> = (0..300)
        .map(|i| format!("ferry:{{u:user{i}}}:meta"))
        .collect();
    keys.extend(
        [
            "", "a", "{}", "{}x", "x{}y", "{a}{b}", "{{a}}", "a{b", "a}b{c}", "é{ü}", "{u:Ω}",
        ]
        .map(String::from),
    );
    for key in &keys {
        let redis = cluster.cli(port, &["CLUSTER", "KEYSLOT", key]);
        assert_eq!(
            redis,
            cluster.slot_of(key).to_string(),
            "the slot of {key:?}"
        );
    }
}
