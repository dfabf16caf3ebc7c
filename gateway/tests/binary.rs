//! The `ferry-gateway` binary itself: it refuses to start without a JWT key unless `--dev`, or
//! with an HS256 secret shorter than 32 bytes, SIGTERM drains it to a clean exit, and the Redis
//! password is in neither `--help` nor the logs. Stops only the process it started, by its PID.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

mod process;

use process::{Started, built_gateway, gateway_command, start_until_serving, strip_ansi};

/// The gateway with `args` only.
fn gateway(args: &[&str]) -> Command {
    gateway_command(built_gateway(), args)
}

/// `--dev` on loopback ports chosen by the system, plus `args`.
fn dev_gateway(args: &[&str]) -> Command {
    let mut command = gateway(&[
        "--dev",
        "--listen",
        "127.0.0.1:0",
        "--admin-listen",
        "127.0.0.1:0",
    ]);
    command.args(args);
    command
}

/// Sends SIGTERM to the child we started, and only to it.
fn terminate(child: &Child) {
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
}

/// Waits for the child's exit, polling every 20 ms at most `limit` long in all.
fn wait_bounded(child: &mut Child, limit: Duration) -> std::process::ExitStatus {
    let step = Duration::from_millis(20);
    for _ in 0..limit.as_millis() / step.as_millis() {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return status;
        }
        std::thread::sleep(step);
    }
    let _ = child.kill();
    panic!("the gateway did not exit within {limit:?}");
}

#[test]
fn refuses_to_start_without_a_key_unless_dev() {
    let output = gateway(&["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
        .output()
        .expect("run the gateway");
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    for flag in ["--jwt-secret", "--jwt-public-key", "--dev"] {
        assert!(stderr.contains(flag), "the refusal names {flag}: {stderr}");
    }
}

// Issue 13, L7: a short HS256 secret stops the start, before any port is bound.
#[test]
fn refuses_a_jwt_secret_shorter_than_32_bytes() {
    // A port the test holds: a gateway that got as far as binding would fail on it instead.
    let held = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = held.local_addr().expect("addr").to_string();
    for secret in ["short", "tiny-secret-7f3a", &"x".repeat(31)] {
        let output = gateway(&[
            "--jwt-secret",
            secret,
            "--listen",
            &addr,
            "--admin-listen",
            "127.0.0.1:0",
        ])
        .output()
        .expect("run the gateway");
        let stderr = String::from_utf8_lossy(&output.stderr);
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert_eq!(output.status.code(), Some(2), "{stderr}{stdout}");
        assert!(
            stderr.contains("the JWT secret must be at least 32 bytes"),
            "{stderr}"
        );
        assert!(!stderr.contains("binding"), "it tried to listen: {stderr}");
        assert!(!stdout.contains("gateway serving"), "{stdout}");
        assert!(
            !stderr.contains("7f3a"),
            "the secret is not shown: {stderr}"
        );
    }
    drop(held);

    // 32 bytes is enough.
    let Started {
        mut child, serving, ..
    } = start_until_serving(gateway(&[
        "--jwt-secret",
        &"x".repeat(32),
        "--listen",
        "127.0.0.1:0",
        "--admin-listen",
        "127.0.0.1:0",
    ]));
    terminate(&child);
    wait_bounded(&mut child, Duration::from_secs(20));
    assert!(serving.is_some(), "a 32-byte secret is accepted");
}

#[test]
fn sigterm_drains_to_a_clean_exit() {
    let Started {
        mut child,
        serving,
        rest: lines,
    } = start_until_serving(dev_gateway(&["--drain-timeout", "1s"]));
    assert!(serving.is_some(), "the gateway started serving");
    // Right after start: the handler is installed before the ports are bound.
    terminate(&child);
    let exit = wait_bounded(&mut child, Duration::from_secs(20));
    assert!(exit.success(), "a drained gateway exits 0: {exit:?}");
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    assert!(
        rest.iter().any(|l| l.contains("drained")),
        "the drain was logged: {rest:?}"
    );
}

#[test]
fn the_redis_password_stays_out_of_help_and_logs() {
    const PASSWORD: &str = "hunter2-a9f3e1";
    // A URL with a password, to a port where nothing listens: the gateway logs its store
    // failures, and none of those lines may carry the password.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = closed.local_addr().expect("addr").port();
    drop(closed);
    let url = format!("redis://ferry:{PASSWORD}@127.0.0.1:{port}/");

    let help = gateway(&["--help"])
        .env("FERRY_REDIS_URL", &url)
        .output()
        .expect("run --help");
    assert!(help.status.success());
    let text = String::from_utf8_lossy(&help.stdout);
    assert!(
        text.contains("--redis-url"),
        "the help lists the flag: {text}"
    );
    assert!(
        !text.contains(PASSWORD),
        "--help shows the password: {text}"
    );

    let mut child = dev_gateway(&["--store-timeout", "200ms"])
        .env("FERRY_REDIS_URL", &url)
        .env("FERRY_LOG", "debug")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the gateway");
    let stdout = child.stdout.take().expect("stdout");
    let stderr = child.stderr.take().expect("stderr");
    let read = |pipe: Box<dyn std::io::Read + Send>| {
        std::thread::spawn(move || {
            BufReader::new(pipe)
                .lines()
                .map_while(Result::ok)
                .collect::<Vec<_>>()
        })
    };
    let (out, err) = (read(Box::new(stdout)), read(Box::new(stderr)));
    // Long enough for start-up, failed connections and a few watchdog rounds.
    std::thread::sleep(Duration::from_secs(3));
    terminate(&child);
    wait_bounded(&mut child, Duration::from_secs(30));
    let lines: Vec<String> = [out, err]
        .into_iter()
        .flat_map(|reader| reader.join().expect("reader"))
        .collect();
    assert!(
        lines.iter().any(|l| l.contains(&port.to_string())),
        "the logs name the Redis it tried: {lines:#?}"
    );
    let leaks: Vec<&String> = lines.iter().filter(|l| l.contains(PASSWORD)).collect();
    assert!(leaks.is_empty(), "the password is in the logs: {leaks:#?}");
}

/// The hard limit on open files of this process (which the gateway it starts inherits).
fn hard_open_files_limit() -> u64 {
    let limits = std::fs::read_to_string("/proc/self/limits").expect("/proc/self/limits");
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect("a Max open files line");
    line.split_whitespace()
        .nth(4)
        .and_then(|v| v.parse().ok())
        .expect("a numeric hard limit")
}

// Issue 13: many container runtimes start a process with a soft limit of 1,024 open files; the
// gateway raises it to the hard limit at start and logs it.
#[test]
fn the_open_files_limit_is_raised_to_the_hard_one() {
    let hard = hard_open_files_limit();
    assert!(
        hard > 512,
        "this machine's hard limit ({hard}) leaves nothing to raise"
    );
    let bin = env!("CARGO_BIN_EXE_ferry-gateway");
    let mut child = Command::new("sh")
        .args(["-c", "ulimit -Sn 512 && exec \"$0\" \"$@\"", bin])
        .args([
            "--dev",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
        ])
        .args(["--drain-timeout", "0s"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the gateway");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let logged = lines
        .by_ref()
        .map_while(Result::ok)
        .take(50)
        .find(|line| line.contains("open files limit"));
    terminate(&child);
    wait_bounded(&mut child, Duration::from_secs(20));
    let logged = strip_ansi(&logged.expect("the limit is logged at start"));
    assert!(logged.contains("before=512"), "{logged}");
    assert!(logged.contains(&format!("now={hard}")), "{logged}");
}
