//! The stored form of a message: the inbox sorted-set member, which is also the live pub/sub
//! message.
//!
//! A member is the decimal seq, `:`, then the payload: the compact MessagePack encoding (an
//! array, as `rmp_serde::to_vec` writes a tuple) of `(from, id, ts, body)` with `body` as `bin`.
//! The gateway side encodes the payload; the append script prepends the seq it allocates, which
//! also makes every member of an inbox unique.

use std::convert::Infallible;

use bytes::Bytes;
use ferry_shared::{IdError, MessageId, UserId};
use rmp::encode::{ByteBuf, ValueWriteError};

use crate::engine::InboxMessage;

/// Why stored bytes are not a message (a bug, or data written by something else).
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("stored message has no `<seq>:` prefix")]
    MissingSeq,
    #[error("stored message has a malformed seq")]
    BadSeq,
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

/// The member for `seq` (what the append script builds in Lua).
#[cfg(test)]
fn encode_member(seq: u64, payload: &[u8]) -> Vec<u8> {
    let mut member = seq.to_string().into_bytes();
    member.push(b':');
    member.extend_from_slice(payload);
    member
}

/// Decodes a member (or a live message, which is the same bytes).
pub fn decode_member(member: &[u8]) -> Result<InboxMessage, RecordError> {
    let colon = member
        .iter()
        .position(|&b| b == b':')
        .ok_or(RecordError::MissingSeq)?;
    let (digits, payload) = (&member[..colon], &member[colon + 1..]);
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return Err(RecordError::BadSeq);
    }
    let seq = std::str::from_utf8(digits)
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        .ok_or(RecordError::BadSeq)?;
    let (from, id, ts, body): (String, String, u64, Bytes) = rmp_serde::from_slice(payload)?;
    Ok(InboxMessage {
        seq,
        from: UserId::parse(&from)?,
        id: MessageId::parse(&id)?,
        ts,
        body,
    })
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
        let member = encode_member(42, &encode_payload(&from, &id, 1_764_086_400_000, &body));
        assert!(member.starts_with(b"42:"));
        let msg = decode_member(&member).unwrap();
        assert_eq!(msg.seq, 42);
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
            decode_member(&encode_member(1, &bad_id)),
            Err(RecordError::BadId(_))
        ));
    }

    fn encode_member_raw(prefix: &[u8], payload: &[u8]) -> Vec<u8> {
        [prefix, b":", payload].concat()
    }
}
