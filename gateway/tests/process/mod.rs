//! The `ferry-gateway` binary as a process of the test's own: a command that takes only the
//! settings the test gives (no `FERRY_*` from the environment), and its log lines without
//! terminal colours.
#![allow(dead_code)] // each test binary uses part of it

use std::ffi::OsStr;
use std::io::{BufRead, BufReader, Lines};
use std::process::{Child, ChildStdout, Command, Stdio};

/// `bin` (the gateway built for these tests unless the test runs another build) with `args`,
/// and no `FERRY_*` setting from the environment: only what the test gives counts.
pub fn gateway_command(bin: impl AsRef<OsStr>, args: &[&str]) -> Command {
    let mut command = Command::new(bin);
    command.args(args);
    for (name, _) in std::env::vars() {
        if name.starts_with("FERRY_") {
            command.env_remove(name);
        }
    }
    command
}

/// The gateway built for these tests.
pub fn built_gateway() -> &'static str {
    env!("CARGO_BIN_EXE_ferry-gateway")
}

/// `line` without terminal colour sequences (`ESC [ ... m`).
pub fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c == 'm' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// A gateway started by `start_until_serving`.
pub struct Started {
    pub child: Child,
    /// Its `gateway serving` log line (colours stripped), or `None` when it exited first.
    pub serving: Option<String>,
    /// The log lines after it, for the test to read (or drain: a full pipe blocks the gateway).
    pub rest: Lines<BufReader<ChildStdout>>,
}

/// Starts `command` with its log on a pipe (stderr dropped) and reads up to the line that says
/// it serves.
pub fn start_until_serving(mut command: Command) -> Started {
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the gateway");
    let mut rest = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let serving = rest
        .by_ref()
        .map_while(Result::ok)
        .map(|line| strip_ansi(&line))
        .find(|line| line.contains("gateway serving"));
    Started {
        child,
        serving,
        rest,
    }
}
