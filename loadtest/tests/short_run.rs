//! A short load run in the test suite: an in-process gateway on `127.0.0.1:0` (on a real
//! `redis-server` with MessagePack clients, and on the embedded engine with JSON clients that
//! pipeline without a limit and ack every delivery), a few hundred clients for a few seconds
//! with a fifth of them offline for part of it, and the verifier's verdict; then a small storm
//! and a small ramp. It asserts correctness (nothing lost, duplicated or out of order;
//! everything `sent` delivered) and that the run's accounting adds up, never a speed.

use std::net::SocketAddr;
use std::time::Duration;

use ferry_loadtest::{
    Auth, ClientCodec, LoadConfig, Offline, Pattern, RampConfig, Report, StormConfig, Target,
    Verdict, run_load, run_ramp, run_storm,
};
use ferry_router::testkit::RedisServer;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const SECRET: &str = "loadtest-secret-of-at-least-32-bytes!";

/// A gateway running in this process; stopped on drop.
struct Gateway {
    addr: SocketAddr,
    shutdown: CancellationToken,
    task: JoinHandle<Result<(), ferry_gateway::GatewayError>>,
}

impl Gateway {
    async fn start(redis_url: Option<String>) -> Gateway {
        let mut config = ferry_gateway::Config::for_tests();
        config.dev = false;
        config.jwt_secret = Some(SECRET.into());
        config.node_id = Some("gw-loadtest".into());
        config.redis_url = redis_url.map(Into::into);
        // Each client sends about 10 msg/s; the default bucket would allow it, but a load run
        // should never measure the rate limiter.
        config.send_rate = 10_000.0;
        config.send_burst = 10_000;
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let admin = TcpListener::bind("127.0.0.1:0").await.expect("bind admin");
        let addr = listener.local_addr().expect("addr");
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(ferry_gateway::run(
            listener,
            admin,
            config,
            shutdown.clone(),
        ));
        Gateway {
            addr,
            shutdown,
            task,
        }
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.shutdown.cancel();
        self.task.abort();
    }
}

/// 200 users, 2,000 msg/s for 3 s, 20% of them offline from 1 s to 2 s.
fn short_run(gateway: &Gateway) -> LoadConfig {
    let target = Target::new(
        format!("ws://{}/v1/ws", gateway.addr),
        Auth::Secret(SECRET.into()),
    );
    LoadConfig {
        connections: 200,
        rate: 2000.0,
        duration: Duration::from_secs(3),
        body_bytes: 64,
        pattern: Pattern::Random,
        ack_interval: Duration::from_millis(50),
        offline: Some(Offline {
            fraction: 0.2,
            at: Duration::from_secs(1),
            duration: Duration::from_secs(1),
        }),
        drain: Duration::from_secs(15),
        ..LoadConfig::new(target)
    }
}

fn assert_correct(report: &Report) {
    println!("{report}");
    assert!(report.failures().is_empty(), "{report}");
    assert_eq!(report.lost, 0, "{report}");
    assert_eq!(report.out_of_order, 0, "{report}");
    assert_eq!(report.duplicates, 0, "{report}");
    assert_eq!(report.seq_mismatch, 0, "{report}");
    assert_eq!(report.foreign, 0, "{report}");
    assert!(report.sent > 0, "{report}");
    assert_eq!(report.delivered, report.sent, "{report}");
    assert!(report.drained, "{report}");
    // The offline users really were offline: their sends were skipped, and they came back.
    assert_eq!(report.offline_users, 40, "{report}");
    assert!(report.skipped_offline > 0, "{report}");
    assert!(report.resumes >= 40, "{report}");
    assert_eq!(report.not_dispatched, 0, "{report}");
    assert_eq!(
        report.sent + report.skipped_offline + report.send_errors.values().sum::<u64>(),
        report.scheduled,
        "{report}"
    );
    // Nothing pushed back at this rate; the timeline holds every delivery and answer, some
    // of them while sending (how many depends on the machine: a debug build on shared cores
    // falls behind 2,000 msg/s).
    assert_eq!(
        (report.rate_limited, report.sends_refused),
        (0, 0),
        "{report}"
    );
    let pace = &report.pace;
    assert_eq!(
        pace.delivered_per_second.iter().sum::<u64>(),
        report.delivered
    );
    assert_eq!(pace.sent_per_second.iter().sum::<u64>(), report.sent);
    assert!(
        pace.delivered_during_sending <= report.delivered,
        "{report}"
    );
    assert!(pace.delivered_during_sending > 0, "{report}");
    assert!((pace.sending_secs - 3.0).abs() < 0.01, "{report}");
    assert_eq!(
        report.cpu_per_message.delivered, report.delivered,
        "{report}"
    );
    assert_eq!(report.dispatch_lag.count, report.dispatched, "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_short_run_loses_nothing() {
    let redis = RedisServer::start();
    let gateway = Gateway::start(Some(redis.url())).await;
    let report = run_load(short_run(&gateway))
        .await
        .expect("the run completes");
    assert_correct(&report);
}

/// As a JSON application would drive it: no limit on pipelined sends, every delivery acked
/// at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_short_run_of_json_clients_acking_every_message_loses_nothing() {
    let gateway = Gateway::start(None).await;
    let mut config = short_run(&gateway);
    config.target.codec = ClientCodec::Json;
    config.max_in_flight = 0;
    config.ack_interval = Duration::ZERO;
    let report = run_load(config).await.expect("the run completes");
    assert_correct(&report);
}

/// The storm and the ramp, small and on the embedded engine: every client drops, a backlog is
/// stored, all resume at once and get all of it, in order; idle connections open in steps.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storm_and_ramp_complete_on_the_embedded_engine() {
    let gateway = Gateway::start(None).await;
    let target = || {
        Target::new(
            format!("ws://{}/v1/ws", gateway.addr),
            Auth::Secret(SECRET.into()),
        )
    };
    let storm = run_storm(StormConfig {
        target: target(),
        connections: 100,
        backlog: 5,
        senders: 3,
        body_bytes: 32,
        ack_interval: Duration::from_millis(50),
        timeout: Duration::from_secs(20),
        max_in_flight: 100,
        barrier: None,
    })
    .await
    .expect("the storm completes");
    println!("{storm}");
    assert!(storm.failures().is_empty(), "{storm}");
    assert_eq!((storm.stored, storm.delivered), (500, 500), "{storm}");
    assert_eq!(storm.reconnected, 100, "{storm}");
    assert!(storm.caught_up_secs.is_some(), "{storm}");

    let ramp = run_ramp(RampConfig {
        target: target(),
        connections: 60,
        step: 20,
        settle: Duration::from_millis(50),
        barrier: None,
    })
    .await
    .expect("the ramp completes");
    println!("{ramp}");
    assert!(ramp.failures().is_empty(), "{ramp}");
    assert_eq!(ramp.connected, 60);
    assert_eq!(
        ramp.steps.iter().map(|s| s.connections).collect::<Vec<_>>(),
        [20, 40, 60]
    );
}
