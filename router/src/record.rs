//! The stored form of a message: the inbox sorted-set member, and the live pub/sub message.
//!
//! A member is `<seq>:<stamp>:<payload>`: the decimal seq, the decimal store time in
//! microseconds (see `InboxMessage::stamp`), then the payload: the compact MessagePack encoding
//! (an array, as `rmp_serde::to_vec` writes a tuple) of `(from, id, ts, body)` with `body` as
//! `bin`. The gateway side encodes the payload; the append script prepends the seq it allocates
//! (which also makes every member of an inbox unique) and its clock. Members written before
//! stamps existed (`<seq>:<payload>`) still decode, with stamp 0: a payload starts with the
//! MessagePack array marker, never a digit.
//!
//! A live message is `<epoch>:<member>`: the inbox incarnation the member was stored in, so a
//! session never takes a message of another incarnation for one of its own.

use std::convert::Infallible;

use bytes::Bytes;
use ferry_shared::{IdError, MessageId, UserId};
use rmp::encode::{ByteBuf, ValueWriteError};

use crate::engine::{InboxMessage, Stored};

/// Why stored bytes are not a message (a bug, or data written by something else).
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("stored message has no `<seq>:` prefix")]
    MissingSeq,
    #[error("stored message has a malformed seq")]
    BadSeq,
    #[error("live message has no `<epoch>:` prefix")]
    MissingEpoch,
    #[error("stored message payload is not MessagePack (from, id, ts, body): {0}")]
    Payload(#[from] rmp_serde::decode::Error),
    #[error("stored message has an invalid id: {0}")]
    BadId(#[from] IdError),
}

/// Encodes everything of a message but its seq.
pub fn encode_payload(from: &UserId, id: &MessageId, ts: u64, body: &[u8]) -> Vec<u8> {
    // Ids are at most 128 bytes and bodies are bounded by the gateway far below 4 GiB, the
    // largest length MessagePack can state.
    let mut buf = ByteBuf::with_capacity(body.len() + from.as_str().len() + 96);
    infallible(rmp::encode::write_array_len(&mut buf, 4));
    infallible(rmp::encode::write_str(&mut buf, from.as_str()));
    infallible(rmp::encode::write_str(&mut buf, id.as_str()));
    infallible(rmp::encode::write_uint(&mut buf, ts));
    infallible(rmp::encode::write_bin(&mut buf, body));
    buf.into_vec()
}

/// Writing to a growable buffer cannot fail; the types prove it.
fn infallible<T>(result: Result<T, ValueWriteError<Infallible>>) -> T {
    match result {
        Ok(value) => value,
        Err(
            ValueWriteError::InvalidMarkerWrite(never) | ValueWriteError::InvalidDataWrite(never),
        ) => match never {},
    }
}

/// The member for `seq` stored at `stamp` (what the append script builds in Lua).
#[cfg(test)]
fn encode_member(seq: u64, stamp: u64, payload: &[u8]) -> Vec<u8> {
    let mut member = format!("{seq}:{stamp}:").into_bytes();
    member.extend_from_slice(payload);
    member
}

/// A decimal number before the first `:` of `bytes`, and what follows that colon.
fn number_prefix(bytes: &[u8]) -> Option<(u64, &[u8])> {
    let colon = bytes.iter().position(|&b| b == b':')?;
    let digits = &bytes[..colon];
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n = std::str::from_utf8(digits).ok()?.parse().ok()?;
    Some((n, &bytes[colon + 1..]))
}

/// The seq, the stamp (0 for a member without one) and the payload of a member.
fn split_member(member: &[u8]) -> Result<(u64, u64, &[u8]), RecordError> {
    if !member.contains(&b':') {
        return Err(RecordError::MissingSeq);
    }
    let (seq, rest) = number_prefix(member).ok_or(RecordError::BadSeq)?;
    match rest.first() {
        Some(b) if b.is_ascii_digit() => {
            let (stamp, payload) = number_prefix(rest).ok_or(RecordError::BadSeq)?;
            Ok((seq, stamp, payload))
        }
        _ => Ok((seq, 0, rest)),
    }
}

/// Decodes a member.
pub fn decode_member(member: &[u8]) -> Result<InboxMessage, RecordError> {
    let (seq, stamp, payload) = split_member(member)?;
    let (from, id, ts, body): (String, String, u64, Bytes) = rmp_serde::from_slice(payload)?;
    Ok(InboxMessage {
        seq,
        from: UserId::parse(&from)?,
        id: MessageId::parse(&id)?,
        ts,
        body,
        stamp,
    })
}

/// Decodes a member read at `score`: a message, or what can be told of an undecodable one and
/// why it is undecodable.
pub fn decode_stored(member: &[u8], score: u64) -> (Stored, Option<RecordError>) {
    match decode_member(member) {
        Ok(msg) => (Stored::Message(msg), None),
        Err(e) => {
            let stamp = split_member(member).map_or(0, |(_, stamp, _)| stamp);
            (Stored::Undecodable { seq: score, stamp }, Some(e))
        }
    }
}

/// Splits a live message into its epoch and member.
pub fn split_live(message: &[u8]) -> Result<(&str, &[u8]), RecordError> {
    let colon = message
        .iter()
        .position(|&b| b == b':')
        .ok_or(RecordError::MissingEpoch)?;
    let epoch = std::str::from_utf8(&message[..colon]).map_err(|_| RecordError::MissingEpoch)?;
    if epoch.is_empty() || !epoch.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return Err(RecordError::MissingEpoch);
    }
    Ok((epoch, &message[colon + 1..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids() -> (UserId, MessageId) {
        (
            UserId::parse("alice@x").unwrap(),
            MessageId::parse("m-1").unwrap(),
        )
    }

    #[test]
    fn round_trips() {
        let (from, id) = ids();
        let body = [0u8, 1, 0xff, b':'];
        let member = encode_member(
            42,
            1_764_086_400_000_123,
            &encode_payload(&from, &id, 1_764_086_400_000, &body),
        );
        assert!(member.starts_with(b"42:1764086400000123:"));
        let msg = decode_member(&member).unwrap();
        assert_eq!(msg.seq, 42);
        assert_eq!(msg.stamp, 1_764_086_400_000_123);
        assert_eq!(msg.from, from);
        assert_eq!(msg.id, id);
        assert_eq!(msg.ts, 1_764_086_400_000);
        assert_eq!(&msg.body[..], &body);
    }

    #[test]
    fn payload_is_the_compact_rmp_serde_encoding() {
        let (from, id) = ids();
        let body = Bytes::from_static(b"hello");
        for ts in [0, 200, 70_000, u64::MAX] {
            let expected = rmp_serde::to_vec(&(from.as_str(), id.as_str(), ts, &body)).unwrap();
            assert_eq!(encode_payload(&from, &id, ts, &body), expected, "ts {ts}");
        }
    }

    #[test]
    fn members_without_a_stamp_still_decode() {
        let (from, id) = ids();
        let member = encode_member_raw(b"7", &encode_payload(&from, &id, 5, b"x"));
        let msg = decode_member(&member).unwrap();
        assert_eq!((msg.seq, msg.stamp, msg.ts), (7, 0, 5));
    }

    #[test]
    fn undecodable_members_keep_what_can_be_read() {
        let (stored, error) = decode_stored(b"5:99:garbage", 5);
        assert_eq!(stored, Stored::Undecodable { seq: 5, stamp: 99 });
        assert!(error.is_some());
        let (stored, _) = decode_stored(b"not a member", 8);
        assert_eq!(stored, Stored::Undecodable { seq: 8, stamp: 0 });
    }

    #[test]
    fn live_messages_carry_their_epoch() {
        assert_eq!(
            split_live(b"k3v9q0x7mz2a:1:2:rest").unwrap(),
            ("k3v9q0x7mz2a", &b"1:2:rest"[..])
        );
        assert!(split_live(b":1:2:x").is_err());
        assert!(split_live(b"no colon").is_err());
        assert!(split_live(b"a b:1:x").is_err());
    }

    #[test]
    fn rejects_malformed_members() {
        let (from, id) = ids();
        let payload = encode_payload(&from, &id, 1, b"x");
        assert!(matches!(
            decode_member(b"no colon"),
            Err(RecordError::MissingSeq)
        ));
        assert!(matches!(decode_member(b":abc"), Err(RecordError::BadSeq)));
        assert!(matches!(
            decode_member(&encode_member_raw(b"-1", &payload)),
            Err(RecordError::BadSeq)
        ));
        assert!(matches!(
            decode_member(&encode_member_raw(b"99999999999999999999999", &payload)),
            Err(RecordError::BadSeq)
        ));
        assert!(matches!(
            decode_member(b"1:\xc1"),
            Err(RecordError::Payload(_))
        ));
        let bad_id = rmp_serde::to_vec(&("a b", "m", 1u64, Bytes::new())).unwrap();
        assert!(matches!(
            decode_member(&encode_member(1, 2, &bad_id)),
            Err(RecordError::BadId(_))
        ));
    }

    fn encode_member_raw(prefix: &[u8], payload: &[u8]) -> Vec<u8> {
        [prefix, b":", payload].concat()
    }
}
