//! The modes of the load generator: a load run (`run`), a connection ramp (`ramp`) and a
//! reconnect storm (`storm`), and what they share.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use tokio::time::Instant;

use crate::config::{Barrier, Target};
use crate::procstat::{self, ProcDelta, ProcSample};

mod ramp;
mod run;
mod send;
mod storm;
mod user;

pub use ramp::run_ramp;
pub use run::run_load;
pub use storm::run_storm;

/// How often a process at a barrier looks for the go file.
const BARRIER_POLL: Duration = Duration::from_millis(1);

/// How long one user may keep retrying its connection, from its turn.
pub(crate) fn patience(target: &Target) -> Duration {
    target.connect_timeout * 3
}

/// The gateway's, Redis's and this process's RSS and CPU time from a starting point.
pub(crate) struct ProcWatch {
    gateway_pid: Option<u32>,
    redis_pid: Option<u32>,
    gateway: Option<ProcSample>,
    redis: Option<ProcSample>,
    loadgen: Option<ProcSample>,
    started: Instant,
}

/// Each watched process's change since the start of a [`ProcWatch`].
pub(crate) struct ProcChange {
    pub gateway: Option<ProcDelta>,
    pub redis: Option<ProcDelta>,
    pub loadgen: Option<ProcDelta>,
    /// Seconds since the start.
    pub secs: f64,
}

impl ProcWatch {
    pub(crate) fn start(target: &Target) -> Self {
        let (gateway_pid, redis_pid) = (target.gateway_pid, target.redis_pid);
        ProcWatch {
            gateway_pid,
            redis_pid,
            gateway: gateway_pid.and_then(|pid| sample_or_warn(Some(pid))),
            redis: redis_pid.and_then(|pid| sample_or_warn(Some(pid))),
            loadgen: sample_or_warn(None),
            started: Instant::now(),
        }
    }

    /// The gateway's RSS now, if its PID was given.
    pub(crate) fn gateway_rss(&self) -> Option<u64> {
        self.gateway_pid
            .and_then(|pid| sample_or_warn(Some(pid)))
            .map(|s| s.rss_bytes)
    }

    /// Every watched process's change since `start`.
    pub(crate) fn finish(&self) -> ProcChange {
        let secs = self.started.elapsed().as_secs_f64();
        let delta = |pid: Option<u32>, before: Option<ProcSample>| {
            let after = sample_or_warn(pid)?;
            Some(ProcDelta::new(
                pid.unwrap_or_else(std::process::id),
                before?,
                after,
                secs,
            ))
        };
        let watched = |pid: Option<u32>, before| pid.and_then(|pid| delta(Some(pid), before));
        ProcChange {
            gateway: watched(self.gateway_pid, self.gateway),
            redis: watched(self.redis_pid, self.redis),
            loadgen: delta(None, self.loadgen),
            secs,
        }
    }
}

fn sample_or_warn(pid: Option<u32>) -> Option<ProcSample> {
    match procstat::sample(pid) {
        Ok(sample) => Some(sample),
        Err(e) => {
            tracing::warn!(?pid, error = %e, "cannot read /proc");
            None
        }
    }
}

/// The Unix time, in ms, of `at`.
pub(crate) fn unix_ms(at: Instant) -> u64 {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let since = Instant::now().saturating_duration_since(at);
    let until = at.saturating_duration_since(Instant::now());
    u64::try_from((now + until).saturating_sub(since).as_millis()).unwrap_or(u64::MAX)
}

/// Arrives at `barrier`: writes `note` to its ready file, then waits until its go file exists
/// (at most [`Barrier::WAIT_LIMIT`]).
pub(crate) async fn meet(barrier: &Barrier, note: &str) -> anyhow::Result<()> {
    let ready = &barrier.ready_file;
    // Written whole under another name first, so whoever waits never reads half a note.
    let partial = ready.with_extension("partial");
    std::fs::write(&partial, format!("{note}\n"))
        .and_then(|()| std::fs::rename(&partial, ready))
        .with_context(|| format!("writing {}", ready.display()))?;
    tracing::info!(ready = %ready.display(), note, "at the barrier");
    let give_up_at = Instant::now() + Barrier::WAIT_LIMIT;
    while !barrier.go_file.exists() {
        anyhow::ensure!(
            Instant::now() < give_up_at,
            "{} did not appear within {:?}",
            barrier.go_file.display(),
            Barrier::WAIT_LIMIT
        );
        tokio::time::sleep(BARRIER_POLL).await;
    }
    Ok(())
}
