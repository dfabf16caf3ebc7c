//! Ferry's load generator and delivery verifier: many clients as distinct users, an open-loop
//! send schedule at a target rate, latency from each message's scheduled time (HdrHistogram),
//! a check after a drain that every message answered `sent` arrived exactly once and in order,
//! and the gateway's memory and CPU. Modes: a load run ([`run_load`]), a connection ramp
//! ([`run_ramp`]) and a reconnect storm ([`run_storm`]).
//!
//! Layout: `config` (typed settings), `cli` (flags), `auth` (tokens), `clients` (opening many
//! connections), `schedule` (due times, routing, body layout), `ledger` (per-message record and
//! the tally over it), `verify` (what the client tasks report, checked per user), `latency`
//! (histograms), `timeline` (deliveries and answers per second, and while sending), `report`
//! (results), `procstat` (`/proc` readings, CPU per message), and `modes` (`run`, `user`,
//! `send`, `ramp`, `storm`).

pub mod auth;
pub mod cli;
pub mod config;
pub mod procstat;
pub mod report;

mod clients;
mod latency;
mod ledger;
mod modes;
mod schedule;
mod timeline;
mod verify;

pub use config::{
    Auth, Barrier, ClientCodec, LoadConfig, Offline, OnRateLimited, Pattern, RampConfig,
    StormConfig, Target,
};
pub use latency::Percentiles;
pub use modes::{run_load, run_ramp, run_storm};
pub use procstat::CpuPerMessage;
pub use report::{LostMessage, RampReport, RampStep, Report, StormReport, Verdict};
pub use schedule::BODY_HEADER;
pub use timeline::Pace;
