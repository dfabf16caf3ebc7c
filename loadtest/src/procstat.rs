//! A process's resident memory and CPU time, read from `/proc` (Linux): the gateway's, given its
//! PID, and the load generator's own, since on one machine they share the cores.

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
    fn reads_this_process() {
        let s = sample(None).expect("/proc/self");
        assert!(s.rss_bytes > 0);
        let d = ProcDelta::new(1, s, s, 2.0);
        assert_eq!((d.cpu_secs, d.rss_growth_bytes), (0.0, 0));
    }
}
