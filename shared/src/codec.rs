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
    #[error("body_b64 is not valid base64")]
    Base64,
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
            (Codec::MsgPack, Wire::Binary(data)) => Ok(rmp_serde::from_slice(data)?),
            (Codec::Json, Wire::Text(text)) if text.contains("\"body_b64\"") => {
                let mut value: serde_json::Value = serde_json::from_str(text)?;
                body_from_b64(&mut value)?;
                Ok(serde_json::from_value(value)?)
            }
            (Codec::Json, Wire::Text(text)) => Ok(serde_json::from_str(text)?),
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
