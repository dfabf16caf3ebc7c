//! The two subprotocols: `ferry.v1.msgpack` (binary WebSocket messages) and `ferry.v1.json`
//! (text messages). One WebSocket message carries exactly one frame.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use bytes::Bytes;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::frame::{Body, ClientFrame, ServerFrame};

/// One WebSocket data message, independent of the WebSocket library.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Wire {
    Binary(Bytes),
    Text(String),
}

/// Why an incoming WebSocket message is not a frame; always a `bad_frame`.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("a {got} message on a {codec} connection")]
    WrongKind {
        got: &'static str,
        codec: &'static str,
    },
    #[error("undecodable frame: {0}")]
    MsgPack(#[from] rmp_serde::decode::Error),
    #[error("undecodable frame: {0}")]
    Json(#[from] serde_json::Error),
    #[error("undecodable frame: {0}")]
    MsgPackShape(#[from] ShapeError),
    /// A JSON frame over the same bounds (`check_json_shape`).
    #[error("undecodable frame: {0}")]
    JsonShape(ShapeError),
    #[error("body_b64 is not valid base64")]
    Base64,
}

/// The most array elements and map entries one MessagePack frame may hold, at all levels
/// together. A real frame has fewer than 20. Without a bound, a 1 MiB frame of nils is a
/// million values, each buffered by serde while it looks for the frame's `type` (issue 13, M3).
pub const MAX_MSGPACK_ELEMENTS: u64 = 1024;

/// The deepest one MessagePack frame may nest arrays and maps, the frame's own map included. A
/// real frame is one level deep.
pub const MAX_MSGPACK_DEPTH: usize = 16;

/// Why a MessagePack frame was refused before serde saw it; like any `DecodeError`, a
/// `bad_frame`. The messages quote nothing of the input.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ShapeError {
    #[error("more than {MAX_MSGPACK_ELEMENTS} array elements and map entries")]
    TooManyElements,
    #[error("nested deeper than {MAX_MSGPACK_DEPTH}")]
    TooDeep,
    #[error("a length runs past the end of the message")]
    Truncated,
    #[error("the unused marker 0xc1")]
    Reserved,
}

/// Why a frame could not be encoded (a bug, or a non-UTF-8 body in a JSON `send`).
#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    #[error("cannot encode frame: {0}")]
    MsgPack(#[from] rmp_serde::encode::Error),
    #[error("cannot encode frame: {0}")]
    Json(#[from] serde_json::Error),
}

/// A connection's subprotocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Codec {
    MsgPack,
    Json,
}

impl Codec {
    pub const MSGPACK_SUBPROTOCOL: &'static str = "ferry.v1.msgpack";
    pub const JSON_SUBPROTOCOL: &'static str = "ferry.v1.json";

    pub fn from_subprotocol(name: &str) -> Option<Codec> {
        match name.trim() {
            Self::MSGPACK_SUBPROTOCOL => Some(Codec::MsgPack),
            Self::JSON_SUBPROTOCOL => Some(Codec::Json),
            _ => None,
        }
    }

    /// Chooses from a `Sec-WebSocket-Protocol` offer: the first one we know, MessagePack when the
    /// client offers none, and `None` when it offers only unknown ones (HTTP 400).
    pub fn negotiate<'a>(offered: impl IntoIterator<Item = &'a str>) -> Option<Codec> {
        let mut any = false;
        for name in offered {
            any = true;
            if let Some(codec) = Codec::from_subprotocol(name) {
                return Some(codec);
            }
        }
        (!any).then_some(Codec::MsgPack)
    }

    pub fn subprotocol(self) -> &'static str {
        match self {
            Codec::MsgPack => Self::MSGPACK_SUBPROTOCOL,
            Codec::Json => Self::JSON_SUBPROTOCOL,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Codec::MsgPack => "msgpack",
            Codec::Json => "json",
        }
    }

    pub fn encode_server(self, frame: &ServerFrame) -> Result<Wire, EncodeError> {
        if let (Codec::Json, ServerFrame::Msg { body, .. }) = (self, frame)
            && std::str::from_utf8(&body.0).is_err()
        {
            return Ok(Wire::Text(json_msg_b64(frame)?));
        }
        self.encode(frame)
    }

    pub fn encode_client(self, frame: &ClientFrame) -> Result<Wire, EncodeError> {
        self.encode(frame)
    }

    pub fn decode_client(self, wire: &Wire) -> Result<ClientFrame, DecodeError> {
        self.decode(wire)
    }

    pub fn decode_server(self, wire: &Wire) -> Result<ServerFrame, DecodeError> {
        self.decode(wire)
    }

    fn encode<T: Serialize>(self, frame: &T) -> Result<Wire, EncodeError> {
        Ok(match self {
            Codec::MsgPack => Wire::Binary(Bytes::from(rmp_serde::to_vec_named(frame)?)),
            Codec::Json => Wire::Text(serde_json::to_string(frame)?),
        })
    }

    fn decode<T: DeserializeOwned>(self, wire: &Wire) -> Result<T, DecodeError> {
        match (self, wire) {
            (Codec::MsgPack, Wire::Binary(data)) => {
                check_msgpack_shape(data)?;
                Ok(rmp_serde::from_slice(data)?)
            }
            (Codec::Json, Wire::Text(text)) => {
                check_json_shape(text).map_err(DecodeError::JsonShape)?;
                if text.contains("\"body_b64\"") {
                    let mut value: serde_json::Value = serde_json::from_str(text)?;
                    body_from_b64(&mut value)?;
                    Ok(serde_json::from_value(value)?)
                } else {
                    Ok(serde_json::from_str(text)?)
                }
            }
            (codec, Wire::Binary(_)) => Err(DecodeError::WrongKind {
                got: "binary",
                codec: codec.name(),
            }),
            (codec, Wire::Text(_)) => Err(DecodeError::WrongKind {
                got: "text",
                codec: codec.name(),
            }),
        }
    }
}

/// Walks the first MessagePack value in `data` without decoding it, and refuses it when it holds
/// more than `MAX_MSGPACK_ELEMENTS`, nests deeper than `MAX_MSGPACK_DEPTH`, or declares more than
/// the message holds. It reads at most one marker per element, so its cost is bounded whatever
/// the message's size; strings, bins and exts are stepped over by their length.
fn check_msgpack_shape(data: &[u8]) -> Result<(), ShapeError> {
    // Values still to read in each open array or map, the innermost at `depth`; `open[0]` is
    // the message itself, one value.
    let mut open = [0u64; MAX_MSGPACK_DEPTH + 1];
    open[0] = 1;
    let mut depth = 0;
    let mut elements = 0;
    let mut rest = data;
    loop {
        if open[depth] == 0 {
            if depth == 0 {
                return Ok(());
            }
            depth -= 1;
            continue;
        }
        open[depth] -= 1;
        let (&byte, after) = rest.split_first().ok_or(ShapeError::Truncated)?;
        rest = after;
        match next_value(byte, &mut rest)? {
            Item::Scalar(len) => {
                rest = rest.get(len..).ok_or(ShapeError::Truncated)?;
            }
            Item::Container { entries, values } => {
                elements += entries;
                if elements > MAX_MSGPACK_ELEMENTS {
                    return Err(ShapeError::TooManyElements);
                }
                if depth == MAX_MSGPACK_DEPTH {
                    return Err(ShapeError::TooDeep);
                }
                // Every value takes at least one byte.
                if values > rest.len() as u64 {
                    return Err(ShapeError::Truncated);
                }
                depth += 1;
                open[depth] = values;
            }
        }
    }
}

/// One MessagePack value as the shape check sees it, once its marker and length are read.
enum Item {
    /// A value with no nested values, and the bytes of it still to skip.
    Scalar(usize),
    /// An array (`values` = `entries`) or a map (`values` = 2 × `entries`).
    Container { entries: u64, values: u64 },
}

/// The JSON counterpart of `check_msgpack_shape`: one pass over the text, counting the values in
/// arrays and objects (a `,` or an opening bracket each) and the nesting, and skipping strings.
/// It does not validate; serde refuses what is malformed. Without it, serde buffers every value
/// of a frame while it looks for `type`: 1 MiB of `[0,0,…]` was about 24 MiB held.
fn check_json_shape(text: &str) -> Result<(), ShapeError> {
    let (mut depth, mut elements) = (0usize, 0u64);
    let mut bytes = text.bytes();
    while let Some(byte) = bytes.next() {
        match byte {
            b'"' => {
                // Skip the string, and any escaped character in it.
                while let Some(byte) = bytes.next() {
                    match byte {
                        b'\\' => {
                            bytes.next();
                        }
                        b'"' => break,
                        _ => {}
                    }
                }
            }
            b'[' | b'{' => {
                depth += 1;
                elements += 1;
                if depth > MAX_MSGPACK_DEPTH {
                    return Err(ShapeError::TooDeep);
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            b',' => elements += 1,
            _ => continue,
        }
        if elements > MAX_MSGPACK_ELEMENTS {
            return Err(ShapeError::TooManyElements);
        }
    }
    Ok(())
}

/// Reads what follows `marker` from `rest`: a length, for the types that have one.
fn next_value(marker: u8, rest: &mut &[u8]) -> Result<Item, ShapeError> {
    use rmp::Marker as M;
    let scalar = |len: u64| {
        usize::try_from(len)
            .map(Item::Scalar)
            .map_err(|_| ShapeError::Truncated)
    };
    let array = |entries: u64| Item::Container {
        entries,
        values: entries,
    };
    let map = |entries: u64| Item::Container {
        entries,
        values: 2 * entries,
    };
    match M::from_u8(marker) {
        M::FixPos(_) | M::FixNeg(_) | M::Null | M::True | M::False => scalar(0),
        M::U8 | M::I8 => scalar(1),
        M::U16 | M::I16 => scalar(2),
        M::U32 | M::I32 | M::F32 => scalar(4),
        M::U64 | M::I64 | M::F64 => scalar(8),
        M::FixStr(len) => scalar(u64::from(len)),
        M::Str8 | M::Bin8 => scalar(length(rest, 1)?),
        M::Str16 | M::Bin16 => scalar(length(rest, 2)?),
        M::Str32 | M::Bin32 => scalar(length(rest, 4)?),
        // An ext is a type byte and its data.
        M::FixExt1 => scalar(2),
        M::FixExt2 => scalar(3),
        M::FixExt4 => scalar(5),
        M::FixExt8 => scalar(9),
        M::FixExt16 => scalar(17),
        M::Ext8 => scalar(length(rest, 1)? + 1),
        M::Ext16 => scalar(length(rest, 2)? + 1),
        M::Ext32 => scalar(length(rest, 4)? + 1),
        M::FixArray(len) => Ok(array(u64::from(len))),
        M::Array16 => Ok(array(length(rest, 2)?)),
        M::Array32 => Ok(array(length(rest, 4)?)),
        M::FixMap(len) => Ok(map(u64::from(len))),
        M::Map16 => Ok(map(length(rest, 2)?)),
        M::Map32 => Ok(map(length(rest, 4)?)),
        M::Reserved => Err(ShapeError::Reserved),
    }
}

/// Takes a big-endian length of `size` bytes from the front of `rest`.
fn length(rest: &mut &[u8], size: usize) -> Result<u64, ShapeError> {
    let (bytes, after) = rest.split_at_checked(size).ok_or(ShapeError::Truncated)?;
    *rest = after;
    Ok(bytes.iter().fold(0, |len, &b| len << 8 | u64::from(b)))
}

/// A `msg` whose body is not UTF-8, for a JSON client: `body_b64` instead of `body`.
fn json_msg_b64(frame: &ServerFrame) -> Result<String, serde_json::Error> {
    #[derive(Serialize)]
    struct MsgB64<'a> {
        r#type: &'static str,
        seq: u64,
        from: &'a str,
        id: &'a str,
        ts: u64,
        body_b64: String,
    }
    let ServerFrame::Msg {
        seq,
        from,
        id,
        ts,
        body: Body(body),
    } = frame
    else {
        unreachable!("json_msg_b64 is only called with a msg frame");
    };
    serde_json::to_string(&MsgB64 {
        r#type: "msg",
        seq: *seq,
        from,
        id,
        ts: *ts,
        body_b64: B64.encode(body),
    })
}

/// Accepts `body_b64` in place of `body` in JSON (for `msg`, and for `send` as an extension so a
/// JSON client can send binary bodies). The decoded bytes become an array of numbers, which `Body`
/// reads as a byte sequence.
fn body_from_b64(value: &mut serde_json::Value) -> Result<(), DecodeError> {
    let Some(map) = value.as_object_mut() else {
        return Ok(());
    };
    if map.contains_key("body") {
        return Ok(());
    }
    let Some(serde_json::Value::String(b64)) = map.remove("body_b64") else {
        return Ok(());
    };
    let bytes = B64
        .decode(b64.as_bytes())
        .map_err(|_| DecodeError::Base64)?;
    map.insert(
        "body".into(),
        serde_json::Value::Array(bytes.into_iter().map(serde_json::Value::from).collect()),
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::ErrorCode;

    fn text(s: &str) -> Wire {
        Wire::Text(s.to_string())
    }

    #[test]
    fn protocol_example_decodes() {
        let json = Codec::Json;
        let hello = json
            .decode_client(&text(
                r#"{"type":"hello","token":"eyJ...","last_seq":41,"epoch":"k3v9","device":"phone"}"#,
            ))
            .unwrap();
        assert_eq!(
            hello,
            ClientFrame::Hello {
                token: Some("eyJ...".into()),
                last_seq: 41,
                epoch: Some("k3v9".into()),
                device: Some("phone".into()),
            }
        );
        let send = json
            .decode_client(&text(
                r#"{"type":"send","id":"a-9","to":"bob","body":"hello bob"}"#,
            ))
            .unwrap();
        assert_eq!(
            send,
            ClientFrame::Send {
                id: "a-9".into(),
                to: "bob".into(),
                body: "hello bob".into()
            }
        );
        let welcome = r#"{"type":"welcome","user":"alice","node":"gw-1","epoch":"k3v9","head":43,"reset":false,"heartbeat_ms":25000}"#;
        let frame = json.decode_server(&text(welcome)).unwrap();
        assert_eq!(json.encode_server(&frame).unwrap(), text(welcome));
        let welcome = r#"{"type":"welcome","user":"alice","node":"gw-1","epoch":"k3v9","head":43,"reset":false,"heartbeat_ms":25000,"expires_at":1764090000,"device":"phone","resume":41}"#;
        let frame = json.decode_server(&text(welcome)).unwrap();
        assert_eq!(json.encode_server(&frame).unwrap(), text(welcome));
        let gap = r#"{"type":"gap","from":12,"to":40}"#;
        let frame = json.decode_server(&text(gap)).unwrap();
        assert_eq!(frame, ServerFrame::Gap { from: 12, to: 40 });
        assert_eq!(json.encode_server(&frame).unwrap(), text(gap));
        let msg =
            r#"{"type":"msg","seq":42,"from":"bob","id":"b-17","ts":1764086400000,"body":"hi"}"#;
        let frame = json.decode_server(&text(msg)).unwrap();
        assert_eq!(json.encode_server(&frame).unwrap(), text(msg));
    }

    #[test]
    fn unknown_fields_ignored_and_defaults_applied() {
        let f = Codec::Json
            .decode_client(&text(r#"{"type":"hello","token":"t","future":[1,2]}"#))
            .unwrap();
        assert_eq!(
            f,
            ClientFrame::Hello {
                token: Some("t".into()),
                last_seq: 0,
                epoch: None,
                device: None,
            }
        );
        let ping = Codec::Json
            .decode_client(&text(r#"{"type":"ping","extra":1}"#))
            .unwrap();
        assert_eq!(ping, ClientFrame::Ping);
    }

    #[test]
    fn bad_frames_are_rejected() {
        let json = Codec::Json;
        for bad in [
            r#"{"type":"nope"}"#,
            r#"{"type":"send","id":"x","to":"bob"}"#,
            r#"{"type":"ack"}"#,
            r#"{"type":"ack","seq":-1}"#,
            r#"{"seq":1}"#,
            r#"[1,2]"#,
            "not json",
        ] {
            assert!(json.decode_client(&text(bad)).is_err(), "{bad}");
        }
        assert!(matches!(
            Codec::MsgPack.decode_client(&text("{}")),
            Err(DecodeError::WrongKind { .. })
        ));
        assert!(matches!(
            json.decode_client(&Wire::Binary(Bytes::from_static(b"\x81"))),
            Err(DecodeError::WrongKind { .. })
        ));
        assert!(
            Codec::MsgPack
                .decode_client(&Wire::Binary(Bytes::from_static(b"\xc1\xff\x00garbage")))
                .is_err()
        );
    }

    #[test]
    fn msgpack_round_trips_with_named_fields_and_bin_bodies() {
        let mp = Codec::MsgPack;
        let frame = ClientFrame::Send {
            id: "m1".into(),
            to: "bob".into(),
            body: Body(Bytes::from_static(&[0, 159, 255])),
        };
        let wire = mp.encode_client(&frame).unwrap();
        let Wire::Binary(bytes) = &wire else {
            panic!("msgpack is binary")
        };
        // A named map: the field names are on the wire.
        assert!(bytes.windows(4).any(|w| w == b"type"));
        assert_eq!(mp.decode_client(&wire).unwrap(), frame);

        // A str body is accepted on input.
        #[derive(Serialize)]
        struct StrSend<'a> {
            r#type: &'a str,
            id: &'a str,
            to: &'a str,
            body: &'a str,
        }
        let raw = rmp_serde::to_vec_named(&StrSend {
            r#type: "send",
            id: "m2",
            to: "bob",
            body: "hey",
        })
        .unwrap();
        let f = mp.decode_client(&Wire::Binary(raw.into())).unwrap();
        assert!(matches!(f, ClientFrame::Send { body, .. } if body == Body::from("hey")));

        let err = ServerFrame::Error {
            code: ErrorCode::RateLimited,
            message: "slow down".into(),
            id: Some("m1".into()),
            retry_after_ms: Some(10),
        };
        assert_eq!(
            mp.decode_server(&mp.encode_server(&err).unwrap()).unwrap(),
            err
        );
    }

    #[test]
    fn non_utf8_bodies_travel_as_body_b64_in_json() {
        let msg = ServerFrame::Msg {
            seq: 1,
            from: "bob".into(),
            id: "x".into(),
            ts: 5,
            body: Body(Bytes::from_static(&[0xff, 0x00, 0x80])),
        };
        let wire = Codec::Json.encode_server(&msg).unwrap();
        assert_eq!(
            wire,
            text(r#"{"type":"msg","seq":1,"from":"bob","id":"x","ts":5,"body_b64":"/wCA"}"#)
        );
        assert_eq!(Codec::Json.decode_server(&wire).unwrap(), msg);
        let send = Codec::Json
            .decode_client(&text(
                r#"{"type":"send","id":"a","to":"b","body_b64":"/wCA"}"#,
            ))
            .unwrap();
        assert!(matches!(send, ClientFrame::Send { body, .. } if body.0[..] == [0xff, 0, 0x80]));
        assert!(
            Codec::Json
                .decode_client(&text(
                    r#"{"type":"send","id":"a","to":"b","body_b64":"%%"}"#
                ))
                .is_err()
        );
    }

    /// `{"type":"ping","x":<value>}` in MessagePack, `x` being `value`'s raw bytes.
    fn ping_with(value: &[u8]) -> Wire {
        let mut out = b"\x82\xa4type\xa4ping\xa1x".to_vec();
        out.extend_from_slice(value);
        Wire::Binary(out.into())
    }

    /// An array32 header for `n` elements, followed by `n` nils.
    fn nils(n: u32) -> Vec<u8> {
        let mut out = vec![0xdd];
        out.extend_from_slice(&n.to_be_bytes());
        out.resize(out.len() + n as usize, 0xc0);
        out
    }

    // Found with the MessagePack bound: 1 MiB of `[0,0,…]` in a JSON ping was decoded as a ping,
    // after serde had buffered every value.
    #[test]
    fn json_over_the_bounds_is_refused() {
        let decode = |text: String| Codec::Json.decode_client(&Wire::Text(text));
        let zeros = vec!["0"; 500_000].join(",");
        let refused = decode(format!(r#"{{"type":"ping","x":[{zeros}]}}"#));
        assert!(
            matches!(
                refused,
                Err(DecodeError::JsonShape(ShapeError::TooManyElements))
            ),
            "{refused:?}"
        );
        let deep = format!(
            r#"{{"type":"ping","x":{}{}}}"#,
            "[".repeat(16),
            "]".repeat(16)
        );
        assert!(matches!(
            decode(deep),
            Err(DecodeError::JsonShape(ShapeError::TooDeep))
        ));
        // Within the bounds: 15 levels under the frame's own object, 1,020 commas in all.
        let fits = format!(
            r#"{{"type":"ping","x":{}{}}}"#,
            "[".repeat(15),
            "]".repeat(15)
        );
        assert_eq!(decode(fits).unwrap(), ClientFrame::Ping);
        let zeros = vec!["0"; 1_000].join(",");
        assert_eq!(
            decode(format!(r#"{{"type":"ping","x":[{zeros}]}}"#)).unwrap(),
            ClientFrame::Ping
        );
        // Commas, brackets and escaped quotes inside strings are not counted.
        let body = r#"[{,\"]}"#.repeat(2_000);
        let send = format!(r#"{{"type":"send","id":"m","to":"bob","body":"{body}"}}"#);
        assert!(matches!(decode(send), Ok(ClientFrame::Send { .. })));
    }

    // Issue 13, M3: a field the frame ignores may not hold more than a frame ever needs.
    #[test]
    fn msgpack_with_too_many_elements_is_refused() {
        let refused = Codec::MsgPack.decode_client(&ping_with(&nils(500_000)));
        assert!(
            matches!(refused, Err(DecodeError::MsgPackShape(_))),
            "{refused:?}"
        );
        // The message says why, and quotes nothing.
        let Err(e) = refused else { unreachable!() };
        assert_eq!(
            e.to_string(),
            "undecodable frame: more than 1024 array elements and map entries"
        );
        // Map entries count too: an array of 600 maps of one entry each is 1,200.
        let mut maps = vec![0xdc, 0x02, 0x58];
        for _ in 0..600 {
            maps.extend_from_slice(b"\x81\xc0\xc0");
        }
        let refused = Codec::MsgPack.decode_client(&ping_with(&maps));
        assert!(
            matches!(
                refused,
                Err(DecodeError::MsgPackShape(ShapeError::TooManyElements))
            ),
            "{refused:?}"
        );
        // At the bound (the frame's 2 entries and 1,022 nils) it is still a ping; one more is
        // refused.
        let at_bound = Codec::MsgPack.decode_client(&ping_with(&nils(1022)));
        assert_eq!(at_bound.unwrap(), ClientFrame::Ping);
        let over = Codec::MsgPack.decode_client(&ping_with(&nils(1023)));
        assert!(matches!(
            over,
            Err(DecodeError::MsgPackShape(ShapeError::TooManyElements))
        ));
    }

    #[test]
    fn msgpack_nested_too_deep_is_refused() {
        // The frame's map and 16 arrays. Without this check, 100,000 arrays overflowed the 2 MiB
        // stack of a debug build's thread: rmp-serde's own limit (1,024 levels) came too late.
        for arrays in [16, 100_000] {
            let mut nested = vec![0x91; arrays];
            nested.push(0xc0);
            let refused = Codec::MsgPack.decode_client(&ping_with(&nested));
            assert!(
                matches!(refused, Err(DecodeError::MsgPackShape(ShapeError::TooDeep))),
                "{arrays} arrays: {refused:?}"
            );
        }
        let mut nested = vec![0x91; 15];
        nested.push(0xc0);
        assert_eq!(
            Codec::MsgPack.decode_client(&ping_with(&nested)).unwrap(),
            ClientFrame::Ping
        );
    }

    #[test]
    fn msgpack_declared_lengths_past_the_end_are_refused() {
        // An array of 1,000 declared elements with 3 present, and a str32 of 4 GiB.
        let mut short = vec![0xdc, 0x03, 0xe8];
        short.extend_from_slice(&[0xc0; 3]);
        for value in [short, b"\xdb\xff\xff\xff\xffabc".to_vec()] {
            let refused = Codec::MsgPack.decode_client(&ping_with(&value));
            assert!(
                matches!(
                    refused,
                    Err(DecodeError::MsgPackShape(ShapeError::Truncated))
                ),
                "{refused:?}"
            );
        }
        // Server frames are checked too (the Rust client's decoder).
        let mut welcome = b"\x82\xa4type\xa7welcome\xa1x".to_vec();
        welcome.extend_from_slice(&nils(2000));
        assert!(matches!(
            Codec::MsgPack.decode_server(&Wire::Binary(welcome.into())),
            Err(DecodeError::MsgPackShape(ShapeError::TooManyElements))
        ));
    }

    #[test]
    fn subprotocol_negotiation() {
        assert_eq!(Codec::negotiate([]), Some(Codec::MsgPack));
        assert_eq!(Codec::negotiate(["ferry.v1.json"]), Some(Codec::Json));
        assert_eq!(
            Codec::negotiate(["x", "ferry.v1.msgpack", "ferry.v1.json"]),
            Some(Codec::MsgPack)
        );
        assert_eq!(Codec::negotiate(["chat", "ferry.v2"]), None);
    }
}

#[cfg(test)]
mod garbage {
    use super::*;

    /// A small deterministic generator (xorshift), so the test needs no dependency and every run
    /// sees the same inputs.
    fn bytes(seed: &mut u64, len: usize) -> Vec<u8> {
        (0..len)
            .map(|_| {
                *seed ^= *seed << 13;
                *seed ^= *seed >> 7;
                *seed ^= *seed << 17;
                *seed as u8
            })
            .collect()
    }

    // Whatever a client sends, decoding answers Ok or Err; it never panics.
    #[test]
    fn random_bytes_never_panic_the_decoders() {
        let mut seed = 0x9e37_79b9_7f4a_7c15;
        let valid = Codec::MsgPack
            .encode_client(&ClientFrame::Send {
                id: "m".into(),
                to: "bob".into(),
                body: "hi".into(),
            })
            .unwrap();
        let Wire::Binary(valid) = valid else {
            unreachable!()
        };
        for round in 0..20_000 {
            let len = round % 64;
            let mut data = bytes(&mut seed, len);
            if round % 3 == 0 {
                // Mutations of a valid frame reach deeper into the decoder.
                data = valid.to_vec();
                let at = (seed as usize) % data.len();
                data[at] = bytes(&mut seed, 1)[0];
                data.truncate(data.len() - (round % 4));
            }
            let _ = Codec::MsgPack.decode_client(&Wire::Binary(data.clone().into()));
            let _ = Codec::MsgPack.decode_server(&Wire::Binary(data.clone().into()));
            let text = String::from_utf8_lossy(&data).into_owned();
            let _ = Codec::Json.decode_client(&Wire::Text(text.clone()));
            let _ = Codec::Json.decode_client(&Wire::Text(format!(
                r#"{{"type":"send","id":"x","to":"y","body_b64":"{text}"}}"#
            )));
        }
    }
}
