//! Property-based tests of the two codecs: random and mutated WebSocket messages never panic a
//! decoder, every refusal is a `DecodeError` of the kind the codec documents, every frame that
//! decodes encodes again to the same frame, declared lengths are never trusted, and no MessagePack
//! frame with more elements or deeper nesting than the codec's bounds is accepted.

use bytes::Bytes;
use ferry_shared::codec::{MAX_MSGPACK_DEPTH, MAX_MSGPACK_ELEMENTS, ShapeError};
use ferry_shared::{Body, ClientFrame, Codec, DecodeError, ErrorCode, ServerFrame, UserId, Wire};
use proptest::prelude::*;
use serde::de::{Deserialize, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

/// Cases per property: enough to reach past the happy path, few enough for a quick suite.
const CASES: u32 = 256;

/// Largest generated message; the gateway's own frame limit is far above it, and the decoders'
/// cost is linear in it.
const MAX_INPUT: usize = 2048;

fn short_string() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z0-9._@:-]{0,12}",
        any::<String>().prop_map(|s| s.chars().take(12).collect()),
    ]
}

fn body() -> impl Strategy<Value = Body> {
    prop_oneof![
        short_string().prop_map(|s| Body::from(s.as_str())),
        proptest::collection::vec(any::<u8>(), 0..32).prop_map(Body::from),
    ]
}

fn client_frame() -> impl Strategy<Value = ClientFrame> {
    let opt = || proptest::option::of(short_string());
    prop_oneof![
        (opt(), any::<u64>(), opt(), opt()).prop_map(|(token, last_seq, epoch, device)| {
            ClientFrame::Hello {
                token,
                last_seq,
                epoch,
                device,
            }
        }),
        (short_string(), short_string(), body()).prop_map(|(id, to, body)| ClientFrame::Send {
            id,
            to,
            body
        }),
        any::<u64>().prop_map(|seq| ClientFrame::Ack { seq }),
        Just(ClientFrame::Ping),
        short_string().prop_map(|token| ClientFrame::Auth { token }),
    ]
}

fn error_code() -> impl Strategy<Value = ErrorCode> {
    prop::sample::select(vec![
        ErrorCode::Unauthorized,
        ErrorCode::BadFrame,
        ErrorCode::Invalid,
        ErrorCode::TooLarge,
        ErrorCode::RateLimited,
        ErrorCode::InboxFull,
        ErrorCode::Unavailable,
        ErrorCode::Internal,
        ErrorCode::TokenExpired,
        ErrorCode::Unknown,
    ])
}

fn server_frame() -> impl Strategy<Value = ServerFrame> {
    let opt = || proptest::option::of(short_string());
    let welcome = (
        (short_string(), short_string(), short_string()),
        (any::<u64>(), any::<bool>(), any::<u64>()),
        (proptest::option::of(any::<u64>()), opt()),
        proptest::option::of(any::<u64>()),
    )
        .prop_map(
            |((user, node, epoch), (head, reset, heartbeat_ms), (expires_at, device), resume)| {
                ServerFrame::Welcome {
                    user,
                    node,
                    epoch,
                    head,
                    reset,
                    heartbeat_ms,
                    expires_at,
                    device,
                    resume,
                }
            },
        );
    prop_oneof![
        welcome,
        (
            any::<u64>(),
            short_string(),
            short_string(),
            any::<u64>(),
            body()
        )
            .prop_map(|(seq, from, id, ts, body)| ServerFrame::Msg {
                seq,
                from,
                id,
                ts,
                body,
            }),
        (short_string(), short_string(), any::<u64>(), any::<bool>()).prop_map(
            |(id, to, seq, duplicate)| ServerFrame::Sent {
                id,
                to,
                seq,
                duplicate,
            }
        ),
        (
            error_code(),
            short_string(),
            opt(),
            proptest::option::of(any::<u64>())
        )
            .prop_map(|(code, message, id, retry_after_ms)| ServerFrame::Error {
                code,
                message,
                id,
                retry_after_ms,
            }),
        any::<u64>().prop_map(|after_ms| ServerFrame::Reconnect { after_ms }),
        Just(ServerFrame::Pong),
        any::<u64>().prop_map(|expires_at| ServerFrame::Authed { expires_at }),
        (any::<u64>(), any::<u64>()).prop_map(|(from, to)| ServerFrame::Gap { from, to }),
    ]
}

fn codec() -> impl Strategy<Value = Codec> {
    prop_oneof![Just(Codec::MsgPack), Just(Codec::Json)]
}

/// One edit of a byte string: what a buggy or hostile peer does to a valid frame.
#[derive(Debug, Clone)]
enum Mutation {
    Flip {
        at: usize,
        bits: u8,
    },
    Set {
        at: usize,
        byte: u8,
    },
    Insert {
        at: usize,
        byte: u8,
    },
    Remove {
        at: usize,
    },
    Truncate {
        at: usize,
    },
    /// Copies a slice of the input over another place (repeats structure: keys, headers).
    Splice {
        from: usize,
        to: usize,
        len: usize,
    },
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let at = any::<usize>();
    prop_oneof![
        (at, 1..=255u8).prop_map(|(at, bits)| Mutation::Flip { at, bits }),
        (at, any::<u8>()).prop_map(|(at, byte)| Mutation::Set { at, byte }),
        (at, any::<u8>()).prop_map(|(at, byte)| Mutation::Insert { at, byte }),
        at.prop_map(|at| Mutation::Remove { at }),
        at.prop_map(|at| Mutation::Truncate { at }),
        (at, at, 1..16usize).prop_map(|(from, to, len)| Mutation::Splice { from, to, len }),
    ]
}

fn mutate(data: &mut Vec<u8>, mutations: &[Mutation]) {
    for m in mutations {
        if data.is_empty() {
            data.push(0);
        }
        let n = data.len();
        match *m {
            Mutation::Flip { at, bits } => data[at % n] ^= bits,
            Mutation::Set { at, byte } => data[at % n] = byte,
            Mutation::Insert { at, byte } => data.insert(at % (n + 1), byte),
            Mutation::Remove { at } => {
                data.remove(at % n);
            }
            Mutation::Truncate { at } => data.truncate(at % n),
            Mutation::Splice { from, to, len } => {
                let from = from % n;
                let len = len.min(n - from);
                let piece = data[from..from + len].to_vec();
                let to = to % (n + 1);
                data.splice(to..(to + len).min(n), piece);
            }
        }
    }
}

fn bytes_of(wire: &Wire) -> Vec<u8> {
    match wire {
        Wire::Binary(data) => data.to_vec(),
        Wire::Text(text) => text.as_bytes().to_vec(),
    }
}

/// The message kind `codec` reads, carrying `data` (lossily as text for JSON).
fn wire_for(codec: Codec, data: &[u8]) -> Wire {
    match codec {
        Codec::MsgPack => Wire::Binary(Bytes::copy_from_slice(data)),
        Codec::Json => Wire::Text(String::from_utf8_lossy(data).into_owned()),
    }
}

/// A refusal is the error of the codec's own format (never a wrong-kind error for the right
/// kind of message); `body_b64` is the one extra JSON refusal.
fn check_refusal(codec: Codec, wire: &Wire, e: &DecodeError) -> Result<(), TestCaseError> {
    match (codec, e) {
        (Codec::MsgPack, DecodeError::MsgPack(_) | DecodeError::MsgPackShape(_))
        | (Codec::Json, DecodeError::Json(_) | DecodeError::JsonShape(_)) => {}
        (Codec::Json, DecodeError::Base64) => {
            let Wire::Text(text) = wire else {
                unreachable!("JSON reads text")
            };
            prop_assert!(
                text.contains("\"body_b64\""),
                "base64 error without body_b64"
            );
        }
        _ => prop_assert!(
            false,
            "{codec:?} refused its own kind of message with {e:?}"
        ),
    }
    prop_assert!(!e.to_string().is_empty());
    Ok(())
}

/// Decodes as a client frame: a refusal is documented, an acceptance re-encodes to itself. The
/// one frame that cannot be re-encoded is a JSON `send` whose body is not UTF-8 (accepted as
/// `body_b64`; the JSON codec writes bodies as strings).
fn check_client(codec: Codec, wire: &Wire) -> Result<(), TestCaseError> {
    match codec.decode_client(wire) {
        Err(e) => check_refusal(codec, wire, &e),
        Ok(frame) => {
            check_within_bounds(wire)?;
            match codec.encode_client(&frame) {
                Ok(again) => {
                    let back = codec.decode_client(&again);
                    prop_assert_eq!(back.ok(), Some(frame));
                    Ok(())
                }
                Err(e) => {
                    let non_utf8_json_send = codec == Codec::Json
                        && matches!(&frame, ClientFrame::Send { body, .. }
                            if std::str::from_utf8(&body.0).is_err());
                    prop_assert!(
                        non_utf8_json_send,
                        "{frame:?} decoded but won't encode: {e}"
                    );
                    Ok(())
                }
            }
        }
    }
}

/// As `check_client`, for server frames (a client's decoder): every one re-encodes.
fn check_server(codec: Codec, wire: &Wire) -> Result<(), TestCaseError> {
    match codec.decode_server(wire) {
        Err(e) => check_refusal(codec, wire, &e),
        Ok(frame) => {
            check_within_bounds(wire)?;
            let again = codec.encode_server(&frame);
            prop_assert!(again.is_ok(), "{frame:?} decoded but won't encode");
            let back = again.ok().map(|w| codec.decode_server(&w).ok());
            prop_assert_eq!(back, Some(Some(frame)));
            Ok(())
        }
    }
}

/// How many array elements and map entries a MessagePack value holds, and how deep its arrays and
/// maps nest, as serde reads it: the reference the codec's own marker walk is held to. An ext is
/// counted as a scalar, as the codec counts it.
#[derive(Debug, Default)]
struct Shape {
    elements: u64,
    depth: usize,
}

impl<'de> Deserialize<'de> for Shape {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(ShapeVisitor)
    }
}

struct ShapeVisitor;

impl<'de> Visitor<'de> for ShapeVisitor {
    type Value = Shape;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("any MessagePack value")
    }

    fn visit_bool<E>(self, _: bool) -> Result<Shape, E> {
        Ok(Shape::default())
    }
    fn visit_i64<E>(self, _: i64) -> Result<Shape, E> {
        Ok(Shape::default())
    }
    fn visit_u64<E>(self, _: u64) -> Result<Shape, E> {
        Ok(Shape::default())
    }
    fn visit_f64<E>(self, _: f64) -> Result<Shape, E> {
        Ok(Shape::default())
    }
    fn visit_str<E>(self, _: &str) -> Result<Shape, E> {
        Ok(Shape::default())
    }
    fn visit_bytes<E>(self, _: &[u8]) -> Result<Shape, E> {
        Ok(Shape::default())
    }
    fn visit_unit<E>(self) -> Result<Shape, E> {
        Ok(Shape::default())
    }
    fn visit_none<E>(self) -> Result<Shape, E> {
        Ok(Shape::default())
    }
    fn visit_newtype_struct<D: Deserializer<'de>>(self, d: D) -> Result<Shape, D::Error> {
        IgnoredAny::deserialize(d)?;
        Ok(Shape::default())
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Shape, A::Error> {
        let mut shape = Shape::default();
        while let Some(inner) = seq.next_element::<Shape>()? {
            shape.elements += 1 + inner.elements;
            shape.depth = shape.depth.max(inner.depth);
        }
        shape.depth += 1;
        Ok(shape)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Shape, A::Error> {
        let mut shape = Shape::default();
        while let Some((key, value)) = map.next_entry::<Shape, Shape>()? {
            shape.elements += 1 + key.elements + value.elements;
            shape.depth = shape.depth.max(key.depth).max(value.depth);
        }
        shape.depth += 1;
        Ok(shape)
    }
}

/// An accepted MessagePack message is within the codec's bounds, as serde counts it.
fn check_within_bounds(wire: &Wire) -> Result<(), TestCaseError> {
    let Wire::Binary(data) = wire else {
        return Ok(());
    };
    let shape = rmp_serde::from_slice::<Shape>(data);
    prop_assert!(
        shape.is_ok(),
        "accepted, but serde can't walk it: {shape:?}"
    );
    let shape = shape.unwrap_or_default();
    prop_assert!(shape.elements <= MAX_MSGPACK_ELEMENTS, "{shape:?} accepted");
    prop_assert!(shape.depth <= MAX_MSGPACK_DEPTH, "{shape:?} accepted");
    Ok(())
}

/// A MessagePack value, to be put where a frame ignores it.
#[derive(Debug, Clone)]
enum Tree {
    Nil,
    Int(i64),
    Str(String),
    Bin(Vec<u8>),
    Ext(i8, Vec<u8>),
    /// An array of this many nils: one byte per element, the cheapest way past the bound.
    Nils(u32),
    Array(Vec<Tree>),
    Map(Vec<(Tree, Tree)>),
}

impl Tree {
    fn elements(&self) -> u64 {
        match self {
            Tree::Nils(n) => u64::from(*n),
            Tree::Array(items) => items.iter().map(|t| 1 + t.elements()).sum(),
            Tree::Map(entries) => entries
                .iter()
                .map(|(k, v)| 1 + k.elements() + v.elements())
                .sum(),
            _ => 0,
        }
    }

    fn depth(&self) -> usize {
        match self {
            Tree::Nils(_) => 1,
            Tree::Array(items) => 1 + items.iter().map(Tree::depth).max().unwrap_or(0),
            Tree::Map(entries) => {
                1 + entries
                    .iter()
                    .map(|(k, v)| k.depth().max(v.depth()))
                    .max()
                    .unwrap_or(0)
            }
            _ => 0,
        }
    }

    fn write(&self, out: &mut Vec<u8>) {
        use rmp::encode as mp;
        let len = |n: usize| u32::try_from(n).expect("small test values");
        match self {
            Tree::Nil => mp::write_nil(out).expect("vec"),
            Tree::Int(n) => {
                mp::write_sint(out, *n).expect("vec");
            }
            Tree::Str(s) => mp::write_str(out, s).expect("vec"),
            Tree::Bin(b) => mp::write_bin(out, b).expect("vec"),
            Tree::Ext(kind, data) => {
                mp::write_ext_meta(out, len(data.len()), *kind).expect("vec");
                out.extend_from_slice(data);
            }
            Tree::Nils(n) => {
                mp::write_array_len(out, *n).expect("vec");
                out.resize(out.len() + *n as usize, 0xc0);
            }
            Tree::Array(items) => {
                mp::write_array_len(out, len(items.len())).expect("vec");
                items.iter().for_each(|t| t.write(out));
            }
            Tree::Map(entries) => {
                mp::write_map_len(out, len(entries.len())).expect("vec");
                for (k, v) in entries {
                    k.write(out);
                    v.write(out);
                }
            }
        }
    }
}

/// Trees on both sides of the bounds: wide (arrays of up to 1,200 nils) and deep (up to 24
/// levels).
fn tree() -> impl Strategy<Value = Tree> {
    let leaf = prop_oneof![
        Just(Tree::Nil),
        any::<i64>().prop_map(Tree::Int),
        "\\PC{0,8}|x{200,300}".prop_map(Tree::Str),
        proptest::collection::vec(any::<u8>(), 0..300).prop_map(Tree::Bin),
        (any::<i8>(), proptest::collection::vec(any::<u8>(), 0..20))
            .prop_map(|(kind, data)| Tree::Ext(kind, data)),
        (0..1200u32).prop_map(Tree::Nils),
    ];
    let nested = leaf.prop_recursive(8, 64, 8, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..8).prop_map(Tree::Array),
            proptest::collection::vec((inner.clone(), inner), 0..4).prop_map(Tree::Map),
        ]
    });
    // Chains of one-element arrays reach past the depth bound.
    (nested, 0..16usize).prop_map(|(mut tree, wraps)| {
        for _ in 0..wraps {
            tree = Tree::Array(vec![tree]);
        }
        tree
    })
}

/// `{"type":"ping","x":tree}`: a ping whatever `x` holds, when it is within the bounds.
fn ping_carrying(tree: &Tree) -> Vec<u8> {
    let mut out = b"\x82\xa4type\xa4ping\xa1x".to_vec();
    tree.write(&mut out);
    out
}

/// A MessagePack `send` whose `field` has `header` (a str, bin or array header declaring far more
/// than follows) and only `present` bytes of content.
fn lying_send(field: &str, header: &[u8], present: &[u8]) -> Vec<u8> {
    let mut out = vec![0x84];
    for (key, value) in [("type", "send"), ("id", "m"), ("to", "bob"), ("body", "hi")] {
        out.push(0xa0 | key.len() as u8);
        out.extend_from_slice(key.as_bytes());
        if key == field {
            out.extend_from_slice(header);
            out.extend_from_slice(present);
        } else {
            out.push(0xa0 | value.len() as u8);
            out.extend_from_slice(value.as_bytes());
        }
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(CASES))]

    #[test]
    fn arbitrary_bytes_are_decoded_or_refused(
        data in proptest::collection::vec(any::<u8>(), 0..MAX_INPUT),
        codec in codec(),
    ) {
        let wire = wire_for(codec, &data);
        check_client(codec, &wire)?;
        check_server(codec, &wire)?;
    }

    #[test]
    fn arbitrary_json_shaped_text_is_decoded_or_refused(
        kind in prop::sample::select(vec!["hello", "send", "ack", "ping", "auth", "msg",
            "welcome", "sent", "error", "reconnect", "pong", "authed", "gap", "nope", ""]),
        fields in proptest::collection::vec(
            (prop::sample::select(vec!["token", "last_seq", "epoch", "device", "id", "to",
                "body", "body_b64", "seq", "from", "ts", "code", "message", "retry_after_ms",
                "user", "node", "head", "reset", "heartbeat_ms", "expires_at", "resume",
                "after_ms", "duplicate", "type"]),
             prop_oneof![
                Just("null".to_owned()),
                any::<bool>().prop_map(|b| b.to_string()),
                any::<i64>().prop_map(|n| n.to_string()),
                any::<u64>().prop_map(|n| n.to_string()),
                any::<f64>().prop_map(|n| format!("{n:?}")),
                "[a-zA-Z0-9+/=%_-]{0,16}".prop_map(|s| format!("\"{s}\"")),
                any::<String>().prop_map(|s| serde_json_string(&s)),
                proptest::collection::vec(0..300u16, 0..8)
                    .prop_map(|v| format!("{v:?}")),
             ]),
            0..8),
    ) {
        let mut text = format!("{{\"type\":\"{kind}\"");
        for (name, value) in &fields {
            text.push_str(&format!(",\"{name}\":{value}"));
        }
        text.push('}');
        let wire = Wire::Text(text);
        check_client(Codec::Json, &wire)?;
        check_server(Codec::Json, &wire)?;
    }

    #[test]
    fn valid_frames_round_trip(
        client in client_frame(),
        server in server_frame(),
        codec in codec(),
    ) {
        let wire = codec.encode_client(&client);
        let json_binary_send = codec == Codec::Json
            && matches!(&client, ClientFrame::Send { body, .. }
                if std::str::from_utf8(&body.0).is_err());
        if json_binary_send {
            prop_assert!(wire.is_err());
        } else {
            let wire = wire.map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(codec.decode_client(&wire).ok(), Some(client));
        }
        let wire = codec.encode_server(&server).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(codec.decode_server(&wire).ok(), Some(server));
    }

    #[test]
    fn mutated_valid_frames_are_decoded_or_refused(
        client in client_frame(),
        server in server_frame(),
        codec in codec(),
        mutations in proptest::collection::vec(mutation(), 1..6),
    ) {
        let mut frames = vec![bytes_of(&codec.encode_server(&server)
            .map_err(|e| TestCaseError::fail(e.to_string()))?)];
        if let Ok(wire) = codec.encode_client(&client) {
            frames.push(bytes_of(&wire));
        }
        for mut data in frames {
            mutate(&mut data, &mutations);
            let wire = wire_for(codec, &data);
            check_client(codec, &wire)?;
            check_server(codec, &wire)?;
        }
    }

    #[test]
    fn a_message_of_the_other_kind_is_always_wrong_kind(
        data in proptest::collection::vec(any::<u8>(), 0..256),
        text in any::<String>(),
    ) {
        let binary = Wire::Binary(Bytes::from(data));
        let text = Wire::Text(text);
        let wrong_kind = |e: Option<DecodeError>, kind: &str, name: &str| {
            matches!(e, Some(DecodeError::WrongKind { got, codec }) if got == kind && codec == name)
        };
        prop_assert!(wrong_kind(Codec::Json.decode_client(&binary).err(), "binary", "json"), "client");
        prop_assert!(wrong_kind(Codec::Json.decode_server(&binary).err(), "binary", "json"), "server");
        prop_assert!(wrong_kind(Codec::MsgPack.decode_client(&text).err(), "text", "msgpack"), "client");
        prop_assert!(wrong_kind(Codec::MsgPack.decode_server(&text).err(), "text", "msgpack"), "server");
    }

    /// A declared length is never taken on trust: a header announcing up to 4 GiB of string,
    /// bytes or array elements over a few bytes of content is refused without reserving it (a
    /// reservation of that size would abort the test process).
    #[test]
    fn declared_lengths_beyond_the_message_are_refused(
        field in prop::sample::select(vec!["id", "to", "body"]),
        marker in prop::sample::select(vec![0xdbu8, 0xc6, 0xdd, 0xdf]),
        declared in 64u32..=u32::MAX,
        present in proptest::collection::vec(any::<u8>(), 0..32),
    ) {
        let mut header = vec![marker];
        header.extend_from_slice(&declared.to_be_bytes());
        let data = lying_send(field, &header, &present);
        let wire = Wire::Binary(Bytes::from(data));
        let client = Codec::MsgPack.decode_client(&wire);
        let refused = |e: Option<&DecodeError>| {
            matches!(e, Some(DecodeError::MsgPack(_) | DecodeError::MsgPackShape(_)))
        };
        prop_assert!(refused(client.as_ref().err()), "client: {:?}", client);
        let server = Codec::MsgPack.decode_server(&wire);
        prop_assert!(refused(server.as_ref().err()), "server: {:?}", server);
    }

    /// A value that a frame ignores is still held to the bounds: a ping carrying it is a ping
    /// when the frame (its own map of 2 entries included) is within them, and refused for that
    /// reason when it is not.
    #[test]
    fn msgpack_beyond_the_bounds_is_refused(tree in tree()) {
        let elements = 2 + tree.elements();
        let depth = 1 + tree.depth();
        let over = elements > MAX_MSGPACK_ELEMENTS || depth > MAX_MSGPACK_DEPTH;
        let wire = Wire::Binary(Bytes::from(ping_carrying(&tree)));
        match Codec::MsgPack.decode_client(&wire) {
            Ok(ClientFrame::Ping) => prop_assert!(!over, "{elements} elements, depth {depth}"),
            Err(DecodeError::MsgPackShape(ShapeError::TooManyElements)) => {
                prop_assert!(elements > MAX_MSGPACK_ELEMENTS, "{elements} elements");
            }
            Err(DecodeError::MsgPackShape(ShapeError::TooDeep)) => {
                prop_assert!(depth > MAX_MSGPACK_DEPTH, "depth {depth}");
            }
            other => prop_assert!(false, "{elements} elements, depth {depth}: {other:?}"),
        }
    }

    /// Mutations of such frames (lengths, markers and nesting changed) are decoded or refused,
    /// and never accepted beyond the bounds.
    #[test]
    fn mutated_msgpack_near_the_bounds_is_decoded_or_refused(
        tree in tree(),
        mutations in proptest::collection::vec(mutation(), 1..6),
    ) {
        let mut data = ping_carrying(&tree);
        mutate(&mut data, &mutations);
        let wire = Wire::Binary(Bytes::from(data));
        check_client(Codec::MsgPack, &wire)?;
        check_server(Codec::MsgPack, &wire)?;
    }

    /// `body_b64` is decoded from the text itself, never beyond it: any string is a body or a
    /// `Base64` refusal.
    #[test]
    fn any_body_b64_is_a_body_or_a_base64_refusal(b64 in "[A-Za-z0-9+/=_%-]{0,64}|\\PC{0,32}") {
        let text = format!(
            r#"{{"type":"send","id":"x","to":"y","body_b64":{}}}"#,
            serde_json_string(&b64)
        );
        match Codec::Json.decode_client(&Wire::Text(text)) {
            Ok(ClientFrame::Send { .. }) | Err(DecodeError::Base64) => {}
            other => prop_assert!(false, "{other:?}"),
        }
    }

    /// Ids are checked after decoding; any string is a valid id or refused, never a panic.
    #[test]
    fn any_string_is_a_user_id_or_refused(s in "\\PC{0,140}|[a-zA-Z0-9._@:-]{0,140}") {
        let valid = !s.is_empty()
            && s.len() <= 128
            && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-@:".contains(&b));
        prop_assert_eq!(UserId::parse(&s).is_ok(), valid);
    }
}

/// `s` as a JSON string literal.
fn serde_json_string(s: &str) -> String {
    serde_json::Value::from(s).to_string()
}
