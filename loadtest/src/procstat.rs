//! A process's resident memory and CPU time, read from `/proc` (Linux): the gateway's and
//! Redis's, given their PIDs, and the load generator's own, since on one machine they share the
//! cores; and the CPU time per delivered message that follows.

use std::io;

use serde::Serialize;

/// Clock ticks per second of `/proc/<pid>/stat` times (`getconf CLK_TCK`; 100 on Linux).
const CLK_TCK: f64 = 100.0;

/// One reading of a process.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct ProcSample {
    /// Resident set size (`VmRSS`), bytes.
    pub rss_bytes: u64,
    /// User plus system CPU time, seconds.
    pub cpu_secs: f64,
}

/// A process before and after a run.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct ProcDelta {
    pub pid: u32,
    pub before: ProcSample,
    pub after: ProcSample,
    /// CPU seconds used during the run.
    pub cpu_secs: f64,
    /// CPU seconds per wall-clock second (1.0 = one core busy).
    pub cores: f64,
    /// RSS growth, bytes (negative if it shrank).
    pub rss_growth_bytes: i64,
}

impl ProcDelta {
    pub fn new(pid: u32, before: ProcSample, after: ProcSample, wall_secs: f64) -> Self {
        let cpu_secs = after.cpu_secs - before.cpu_secs;
        ProcDelta {
            pid,
            before,
            after,
            cpu_secs,
            cores: if wall_secs > 0.0 {
                cpu_secs / wall_secs
            } else {
                0.0
            },
            rss_growth_bytes: after.rss_bytes as i64 - before.rss_bytes as i64,
        }
    }
}

/// The CPU time each process spent per delivered message, over one window of a load run
/// (from `t0`, the first scheduled send, to the end of the drain: connecting and closing left
/// out, the drain's catch-up work kept with the messages it delivers).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct CpuPerMessage {
    /// The window's length, seconds.
    pub window_secs: f64,
    /// Messages delivered (first deliveries) by the end of the window.
    pub delivered: u64,
    /// Gateway CPU µs per delivered message (`None` without its PID or without deliveries).
    pub gateway_us: Option<f64>,
    /// Redis CPU µs per delivered message.
    pub redis_us: Option<f64>,
    /// The load generator's CPU µs per delivered message.
    pub loadgen_us: Option<f64>,
    /// Cores each used during the window (CPU seconds ÷ window seconds).
    pub gateway_cores: Option<f64>,
    pub redis_cores: Option<f64>,
    pub loadgen_cores: Option<f64>,
}

impl CpuPerMessage {
    /// The figures from each process's change over the window.
    pub fn new(
        delivered: u64,
        gateway: Option<&ProcDelta>,
        redis: Option<&ProcDelta>,
        loadgen: Option<&ProcDelta>,
        window_secs: f64,
    ) -> Self {
        let us = |p: Option<&ProcDelta>| p.and_then(|p| us_per_message(p.cpu_secs, delivered));
        let cores = |p: Option<&ProcDelta>| p.map(|p| p.cores);
        CpuPerMessage {
            window_secs,
            delivered,
            gateway_us: us(gateway),
            redis_us: us(redis),
            loadgen_us: us(loadgen),
            gateway_cores: cores(gateway),
            redis_cores: cores(redis),
            loadgen_cores: cores(loadgen),
        }
    }
}

/// `cpu_secs` spread over `messages`, in µs each; `None` for no messages.
pub fn us_per_message(cpu_secs: f64, messages: u64) -> Option<f64> {
    (messages > 0).then(|| cpu_secs * 1e6 / messages as f64)
}

/// Reads process `pid` (`None`: this process).
pub fn sample(pid: Option<u32>) -> io::Result<ProcSample> {
    let dir = match pid {
        Some(pid) => format!("/proc/{pid}"),
        None => "/proc/self".to_owned(),
    };
    let status = std::fs::read_to_string(format!("{dir}/status"))?;
    let stat = std::fs::read_to_string(format!("{dir}/stat"))?;
    let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, format!("{dir}: {what}"));
    Ok(ProcSample {
        rss_bytes: parse_rss(&status).ok_or_else(|| bad("no VmRSS in status"))?,
        cpu_secs: parse_cpu(&stat).ok_or_else(|| bad("unreadable stat"))?,
    })
}

/// `VmRSS:    1234 kB` → bytes.
fn parse_rss(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// utime + stime (fields 14 and 15 of `stat`) in seconds. The command name (field 2) may hold
/// spaces and parentheses, so fields are counted after its last `)`.
fn parse_cpu(stat: &str) -> Option<f64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace().skip(11); // field 3 is the first after ')'
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some((utime + stime) as f64 / CLK_TCK)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_status_and_stat() {
        assert_eq!(
            parse_rss("Name:\tx\nVmRSS:\t  2048 kB\n"),
            Some(2048 * 1024)
        );
        assert_eq!(parse_rss("Name:\tx\n"), None);
        let stat = "42 (a (weird) name) S 1 42 42 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 1";
        assert_eq!(parse_cpu(stat), Some(3.0));
    }

    #[test]
    fn cpu_is_spread_over_the_delivered_messages() {
        assert_eq!(us_per_message(0.5, 10_000), Some(50.0));
        assert_eq!(us_per_message(1.0, 0), None);
        let at = |cpu_secs| ProcSample {
            rss_bytes: 0,
            cpu_secs,
        };
        // 20 s: the gateway used 1.5 CPU seconds, Redis 0.8, for 20,000 messages.
        let gateway = ProcDelta::new(1, at(10.0), at(11.5), 20.0);
        let redis = ProcDelta::new(2, at(3.0), at(3.8), 20.0);
        let c = CpuPerMessage::new(20_000, Some(&gateway), Some(&redis), None, 20.0);
        let near = |a: Option<f64>, b: f64| a.is_some_and(|a| (a - b).abs() < 1e-9);
        assert!(near(c.gateway_us, 75.0), "{c:?}");
        assert!(near(c.redis_us, 40.0), "{c:?}");
        assert!(
            near(c.gateway_cores, 0.075) && near(c.redis_cores, 0.04),
            "{c:?}"
        );
        assert_eq!((c.loadgen_us, c.loadgen_cores), (None, None));
        let idle = CpuPerMessage::new(0, Some(&gateway), None, None, 20.0);
        assert_eq!(
            idle.gateway_us, None,
            "nothing delivered: no per-message figure"
        );
    }

    #[test]
    fn reads_this_process() {
        let s = sample(None).expect("/proc/self");
        assert!(s.rss_bytes > 0);
        let d = ProcDelta::new(1, s, s, 2.0);
        assert_eq!((d.cpu_secs, d.rss_growth_bytes), (0.0, 0));
    }
}
