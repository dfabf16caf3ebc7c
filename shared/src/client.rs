//! A Rust client for Ferry (feature `client`), used by the gateway's tests and the load
//! generator: one background task per connection, duplicates dropped by seq, coalesced acks,
//! sends matched to their answers by id and retried safely, reconnect and resume as one of the
//! user's devices (with its own position in the inbox), gaps reported to the application.
//!
//! ```no_run
//! use std::time::Duration;
//! use ferry_shared::client::{Client, ClientConfig, Event};
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let config = ClientConfig {
//!     device: Some("laptop-1".into()), // this device's own position in the inbox
//!     ack_interval: Duration::from_millis(100),
//!     ..ClientConfig::new("ws://127.0.0.1:8080/v1/ws", "eyJ...")
//! };
//! let (client, mut events) = Client::connect(config).await?;
//!
//! // Sends may be pipelined; each is answered by its id. Retries reuse the id (G5).
//! let sent = client.send("bob", "a-1", "hello bob").await?;
//! println!("stored as seq {} (duplicate: {})", sent.seq, sent.duplicate);
//!
//! while let Some(event) = events.recv().await {
//!     match event {
//!         Event::Welcome(w) => println!("connected to {} at epoch {}", w.node, w.epoch),
//!         Event::Message(m) => {
//!             println!("{} from {}: {:?}", m.seq, m.from, m.body);
//!             break;
//!         }
//!         // Trimmed before this device acknowledged them: never delivered; re-sync elsewhere.
//!         Event::Gap { from, to } => println!("missed {from}..={to}"),
//!         other => println!("{other:?}"),
//!     }
//! }
//! // Resume later from here.
//! let (last_seq, epoch) = client.position();
//! println!("processed up to {last_seq} of {epoch:?}");
//! client.close().await;
//! # Ok(())
//! # }
//! ```
//!
//! Layout: `handle` (the [`Client`] API), `driver` (the task that owns the socket),
//! `delivery` (events to the application, resume point, acks), `sends` (sends waiting for
//! answers), `transport` (TCP, upgrade, `hello`/`welcome`), `state` (duplicate filter, ack
//! coalescing, backoff), `events`, `config`, `error`, and `raw` ([`RawConnection`] for tests
//! that need exact frames).

#![warn(missing_docs)]

mod config;
mod delivery;
mod driver;
mod error;
mod events;
mod handle;
mod raw;
mod sends;
mod state;
mod transport;

#[cfg(test)]
mod tests;

pub use config::{ClientConfig, TokenPlacement, TokenSource};
pub use error::{ClientError, SendError};
pub use events::{Delivered, Event, Events, Sent, TryRecvError, Welcome};
pub use handle::Client;
pub use raw::{RawConnection, RawEvent};
