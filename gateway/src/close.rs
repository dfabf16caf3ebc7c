//! WebSocket close codes of `PROTOCOL.md`.

pub const NORMAL: u16 = 1000;
/// Authentication, protocol violation, `hello` timeout.
pub const POLICY: u16 = 1008;
/// A WebSocket message over `max_frame_bytes`.
pub const TOO_BIG: u16 = 1009;
pub const INTERNAL: u16 = 1011;
/// Drain, after `reconnect`.
pub const SERVICE_RESTART: u16 = 1012;
/// Overloaded, or the store unavailable at `hello`.
pub const TRY_AGAIN_LATER: u16 = 1013;
