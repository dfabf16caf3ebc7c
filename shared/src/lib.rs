//! Ferry's wire protocol (`PROTOCOL.md`): frames, the MessagePack and JSON codecs, validated ids,
//! Redis key naming, and (feature `client`) a Rust client.

pub mod codec;
pub mod frame;
pub mod ids;
pub mod keys;

#[cfg(feature = "client")]
pub mod client;

pub use codec::{Codec, DecodeError, EncodeError, Wire};
pub use frame::{Body, ClientFrame, ErrorCode, ServerFrame};
pub use ids::{DeviceId, IdError, MessageId, UserId};
pub use keys::{KeyKind, Keys, UserKey};
