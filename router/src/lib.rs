//! Where a Ferry message goes and how: the `Engine` trait (store and live bus), its Redis and
//! embedded implementations, and the node-local `Hub` that maps users to the sessions on a node.
//!
//! The router knows nothing of WebSockets; the gateway knows nothing of Redis commands.

mod audit;
mod cluster;
mod devices;
mod embedded;
mod engine;
mod epoch;
mod hub;
mod lanes;
pub mod metrics;
mod pubsub;
mod record;
mod redis_engine;
mod redis_target;
mod script;

#[cfg(feature = "testkit")]
pub mod testkit;

pub use embedded::EmbeddedEngine;
pub use engine::{
    AppendOutcome, Checked, DeviceInfo, DeviceSeen, Engine, EngineError, EngineOptions, EpochName,
    InboxInfo, InboxMessage, InboxState, Live, LiveEvent, LiveSink, NewMessage, Opened, Page,
    Position, SenderChecks, StoreReport, Stored,
};
pub use hub::{CatchUpReason, Hub, HubOptions, LiveSignal, Membership};
pub use record::{RecordError, decode_member, decode_stored, encode_payload, split_live};
pub use redis_engine::RedisEngine;
pub use redis_target::{RedisTarget, redact_url};
