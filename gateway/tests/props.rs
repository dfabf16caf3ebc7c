//! Property-based tests of what a client controls before it is authenticated: the HTTP request
//! head (read alone and by a real gateway) and the JWT path. Random and mutated input never
//! panics, never makes the reader take more than its limit, and always gets the documented error.

mod common;

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::LazyLock;
use std::task::{Context, Poll};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ferry_gateway::Config;
use ferry_gateway::auth::{AuthError, Authenticator};
use ferry_gateway::http::{self, HttpError};
use ferry_shared::UserId;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use proptest::prelude::*;
use proptest::test_runner::TestRunner;
use serde_json::{Value, json};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, ReadBuf};

/// Cases per property: enough to reach past the happy path, few enough for a quick suite.
const CASES: u32 = 256;

/// The request head limit `http.rs` documents: a head that has not ended within it is refused.
const MAX_HEAD_BYTES: usize = 16 * 1024;
/// Headers `http.rs` reads; one more is a malformed request.
const MAX_HEADERS: usize = 48;

fn block_on<F: Future>(future: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("runtime")
        .block_on(future)
}

/// One edit of a byte string: what a buggy or hostile client does to a valid request or token.
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
    /// Copies a slice of the input over another place (repeats structure: headers, segments).
    Splice {
        from: usize,
        to: usize,
        len: usize,
    },
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let at = any::<usize>();
    // Bytes that mean something to HTTP and to a compact JWT, besides arbitrary ones.
    let byte = prop_oneof![
        any::<u8>(),
        prop::sample::select(b"\r\n :.?=/-_\t\0\x7f".to_vec()),
    ];
    prop_oneof![
        (at, 1..=255u8).prop_map(|(at, bits)| Mutation::Flip { at, bits }),
        (at, byte.clone()).prop_map(|(at, byte)| Mutation::Set { at, byte }),
        (at, byte).prop_map(|(at, byte)| Mutation::Insert { at, byte }),
        at.prop_map(|at| Mutation::Remove { at }),
        at.prop_map(|at| Mutation::Truncate { at }),
        (at, at, 1..32usize).prop_map(|(from, to, len)| Mutation::Splice { from, to, len }),
    ]
}

fn mutate(data: &mut Vec<u8>, mutations: &[Mutation]) {
    for m in mutations {
        if data.is_empty() {
            data.push(b'x');
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

mod head {
    use super::*;

    /// A client that sends `data` in reads of the given sizes (cycled), then closes; counts what
    /// the reader took.
    pub struct Chunked {
        data: Vec<u8>,
        pos: usize,
        chunks: Vec<usize>,
        next: usize,
    }

    impl Chunked {
        pub fn new(data: Vec<u8>, chunks: Vec<usize>) -> Self {
            Self {
                data,
                pos: 0,
                chunks,
                next: 0,
            }
        }

        pub fn consumed(&self) -> usize {
            self.pos
        }
    }

    impl AsyncRead for Chunked {
        fn poll_read(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            let this = self.get_mut();
            let chunk = this.chunks[this.next % this.chunks.len()].max(1);
            this.next += 1;
            let n = chunk.min(buf.remaining()).min(this.data.len() - this.pos);
            buf.put_slice(&this.data[this.pos..this.pos + n]);
            this.pos += n;
            Poll::Ready(Ok(()))
        }
    }

    /// A client that never stops sending `pattern` after `prefix`; counts what the reader took.
    pub struct Endless {
        prefix: Vec<u8>,
        pattern: Vec<u8>,
        chunk: usize,
        consumed: usize,
    }

    impl AsyncRead for Endless {
        fn poll_read(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            let this = self.get_mut();
            for _ in 0..this.chunk.min(buf.remaining()) {
                let at = this.consumed;
                let byte = match this.prefix.get(at) {
                    Some(&b) => b,
                    None => this.pattern[(at - this.prefix.len()) % this.pattern.len()],
                };
                buf.put_slice(&[byte]);
                this.consumed += 1;
            }
            Poll::Ready(Ok(()))
        }
    }

    pub fn read(reader: &mut (impl AsyncRead + Unpin)) -> Result<http::Request, HttpError> {
        block_on(http::read_request(reader, Duration::from_secs(5)))
    }

    /// Read sizes a network hands over: single bytes, small segments, whole packets.
    pub fn chunks() -> impl Strategy<Value = Vec<usize>> {
        proptest::collection::vec(
            prop_oneof![1 => 1..8usize, 3 => 8..512usize, 3 => 512..20_000usize],
            1..8,
        )
    }

    /// A well-formed request head, as (method, target, headers, rest).
    pub type Head = (String, String, Vec<(String, String)>, Vec<u8>);

    pub fn head(max_headers: usize) -> impl Strategy<Value = Head> {
        let method = prop_oneof![Just("GET".to_owned()), "[A-Z]{1,8}"];
        let target = prop_oneof![
            Just("/v1/ws".to_owned()),
            "/[a-zA-Z0-9/._~%+-]{0,40}(\\?[a-zA-Z0-9=&%+._-]{0,40})?",
        ];
        let header = (
            "[A-Za-z0-9-]{1,20}",
            // No leading or trailing blank: HTTP trims those.
            "[!-~]([ -~]{0,58}[!-~])?|",
        );
        (
            method,
            target,
            proptest::collection::vec(header, 0..=max_headers),
            proptest::collection::vec(any::<u8>(), 0..64),
        )
    }

    pub fn render((method, target, headers, rest): &Head) -> Vec<u8> {
        let mut out = format!("{method} {target} HTTP/1.1\r\n");
        for (name, value) in headers {
            out.push_str(&format!("{name}: {value}\r\n"));
        }
        out.push_str("\r\n");
        let mut out = out.into_bytes();
        out.extend_from_slice(rest);
        out
    }

    /// A valid WebSocket upgrade with a token, as browsers and the client send it.
    pub fn upgrade() -> Vec<u8> {
        b"GET /v1/ws?token=a%2Eb.c HTTP/1.1\r\nHost: gw.example:8080\r\nUpgrade: websocket\r\n\
          Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
          Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: ferry.v1.msgpack, ferry.v1.json\r\n\
          Origin: https://app.example\r\nX-Forwarded-For: 203.0.113.7\r\n\r\n"
            .to_vec()
    }

    /// What any outcome of reading `data` must satisfy: only the documented errors, and an
    /// accepted head was read from the start of the input, within the limit, with the bytes
    /// after it kept.
    pub fn check_outcome(
        data: &[u8],
        result: &Result<http::Request, HttpError>,
        consumed: usize,
    ) -> Result<(), TestCaseError> {
        prop_assert!(consumed <= MAX_HEAD_BYTES, "read {consumed} bytes");
        match result {
            Ok(request) => {
                // `rest` is what the reader took past the head.
                prop_assert!(data[..consumed].ends_with(&request.rest));
                let head = consumed - request.rest.len();
                prop_assert!(head <= MAX_HEAD_BYTES);
                prop_assert!(
                    data[..head].ends_with(b"\n"),
                    "the head ends at its blank line"
                );
                prop_assert!(request.headers.len() <= MAX_HEADERS);
                for (name, _) in &request.headers {
                    prop_assert_eq!(name, &name.to_ascii_lowercase());
                }
                prop_assert!(!request.path.contains('?'));
                for (name, _) in &request.headers {
                    let _ = request.header(name);
                    let _ = request.header_values(name).count();
                }
            }
            Err(HttpError::Closed | HttpError::Malformed(_)) => {}
            Err(HttpError::TooLarge) => prop_assert!(data.len() >= MAX_HEAD_BYTES),
            Err(e) => prop_assert!(false, "undocumented refusal: {e:?}"),
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(CASES))]

        #[test]
        fn arbitrary_bytes_are_read_or_refused(
            data in proptest::collection::vec(any::<u8>(), 0..4096),
            chunks in chunks(),
        ) {
            let mut reader = Chunked::new(data.clone(), chunks);
            let result = read(&mut reader);
            check_outcome(&data, &result, reader.consumed())?;
        }

        #[test]
        fn well_formed_heads_are_read_exactly(head in head(MAX_HEADERS), chunks in chunks()) {
            let data = render(&head);
            let (method, target, headers, rest) = head;
            let mut reader = Chunked::new(data.clone(), chunks);
            let result = read(&mut reader);
            check_outcome(&data, &result, reader.consumed())?;
            let request = result.map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(request.method, method);
            let (path, query) = match target.split_once('?') {
                Some((p, q)) => (p.to_owned(), Some(q.to_owned())),
                None => (target.clone(), None),
            };
            prop_assert_eq!(request.path, path);
            prop_assert_eq!(request.query, query);
            let expected: Vec<_> = headers
                .iter()
                .map(|(n, v)| (n.to_ascii_lowercase(), v.clone()))
                .collect();
            prop_assert_eq!(request.headers, expected);
            // The reader may have taken part of what followed the head, never more.
            prop_assert!(rest.starts_with(&request.rest));
        }

        #[test]
        fn mutated_upgrades_are_read_or_refused(
            mutations in proptest::collection::vec(mutation(), 1..8),
            chunks in chunks(),
        ) {
            let mut data = upgrade();
            mutate(&mut data, &mutations);
            let mut reader = Chunked::new(data.clone(), chunks);
            let result = read(&mut reader);
            check_outcome(&data, &result, reader.consumed())?;
        }

        /// Past the head limit the reader stops and refuses, however the bytes arrive and
        /// whether or not the head would end later.
        #[test]
        fn heads_over_the_limit_are_refused_at_the_limit(
            over in 1..MAX_HEAD_BYTES,
            chunks in chunks(),
        ) {
            let fixed = b"GET /v1/ws HTTP/1.1\r\nHost: h\r\nX-Pad: \r\n\r\n".len();
            let pad = "a".repeat(MAX_HEAD_BYTES + over - fixed);
            let data = format!("GET /v1/ws HTTP/1.1\r\nHost: h\r\nX-Pad: {pad}\r\n\r\n")
                .into_bytes();
            prop_assert_eq!(data.len(), MAX_HEAD_BYTES + over);
            let mut reader = Chunked::new(data.clone(), chunks);
            let result = read(&mut reader);
            prop_assert!(matches!(result, Err(HttpError::TooLarge)), "{:?}", result);
            prop_assert!(reader.consumed() <= MAX_HEAD_BYTES, "read {}", reader.consumed());
        }

        #[test]
        fn heads_within_the_limit_are_read(under in 0..MAX_HEAD_BYTES - 64, chunks in chunks()) {
            let fixed = b"GET /v1/ws HTTP/1.1\r\nHost: h\r\nX-Pad: \r\n\r\n".len();
            let pad = "a".repeat(MAX_HEAD_BYTES - fixed - under);
            let data = format!("GET /v1/ws HTTP/1.1\r\nHost: h\r\nX-Pad: {pad}\r\n\r\n")
                .into_bytes();
            let mut reader = Chunked::new(data.clone(), chunks);
            let result = read(&mut reader);
            check_outcome(&data, &result, reader.consumed())?;
            prop_assert!(result.is_ok(), "{:?}", result.err());
        }

        #[test]
        fn more_headers_than_the_limit_are_malformed(
            extra in 1..64usize,
            chunks in chunks(),
        ) {
            let head: Head = (
                "GET".into(),
                "/v1/ws".into(),
                (0..MAX_HEADERS + extra).map(|i| (format!("x-{i}"), "v".into())).collect(),
                Vec::new(),
            );
            let data = render(&head);
            let mut reader = Chunked::new(data.clone(), chunks);
            let result = read(&mut reader);
            check_outcome(&data, &result, reader.consumed())?;
            prop_assert!(matches!(result, Err(HttpError::Malformed(_))), "{:?}", result);
        }

        /// A client that sends forever (an unending header, endless header lines, noise) is
        /// refused within the limit.
        #[test]
        fn an_endless_head_is_refused_within_the_limit(
            prefix in prop_oneof![
                Just(b"GET /v1/ws HTTP/1.1\r\n".to_vec()),
                Just(b"GET /v1/ws HTTP/1.1\r\nX-Long: ".to_vec()),
                Just(Vec::new()),
            ],
            pattern in prop_oneof![
                "[a-z]{1,8}: [a-z]{0,300}\r\n".prop_map(String::into_bytes),
                "[ -~]{1,64}".prop_map(String::into_bytes),
                proptest::collection::vec(any::<u8>(), 1..64),
            ],
            chunk in prop_oneof![1..64usize, 64..100_000usize],
        ) {
            let mut reader = Endless { prefix, pattern, chunk, consumed: 0 };
            let result = read(&mut reader);
            let consumed = reader.consumed;
            prop_assert!(consumed <= MAX_HEAD_BYTES, "read {consumed} bytes");
            prop_assert!(
                matches!(result, Ok(_) | Err(HttpError::TooLarge | HttpError::Malformed(_))),
                "{:?}", result
            );
        }

        /// Query parameters are percent-decoded from the target alone: never a panic, never
        /// longer than the raw value.
        #[test]
        fn any_query_decodes_within_its_length(
            query in "([a-z%+=&]|%[0-9a-fA-F]{0,2}|\\PC){0,64}",
            name in "[a-z]{0,3}",
        ) {
            let data = format!("GET /v1/ws?{query} HTTP/1.1\r\n\r\n").into_bytes();
            let mut reader = Chunked::new(data.clone(), vec![data.len()]);
            if let Ok(request) = read(&mut reader)
                && let Some(value) = request.query_param(&name)
            {
                prop_assert!(value.len() <= request.query.as_deref().unwrap_or("").len());
            }
        }
    }
}

/// The same heads sent to a real gateway over TCP: a head the reader refuses gets 400, one
/// that never ended gets no answer, any other gets a documented status; the gateway keeps
/// serving.
mod gateway {
    use super::head::{Chunked, head, render, upgrade};
    use super::*;
    use common::{EngineKind, TestGateway, WAIT};

    /// Statuses the WebSocket listener answers with.
    const DOCUMENTED: [u16; 9] = [101, 400, 401, 403, 404, 405, 426, 431, 503];

    /// Sends `data`, half-closes, and reads the answer's status line (`None`: no answer).
    async fn exchange(addr: std::net::SocketAddr, data: &[u8]) -> Option<String> {
        let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
        // The gateway may answer and close before everything is written.
        let _ = stream.write_all(data).await;
        let _ = stream.shutdown().await;
        let mut answer = Vec::new();
        let mut buf = [0u8; 4096];
        let read = tokio::time::timeout(WAIT, async {
            loop {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => answer.extend_from_slice(&buf[..n]),
                }
                if answer.windows(2).any(|w| w == b"\r\n") {
                    break;
                }
            }
        })
        .await;
        assert!(read.is_ok(), "no answer nor close within {WAIT:?}");
        let text = String::from_utf8_lossy(&answer);
        text.lines().next().map(str::to_owned)
    }

    #[test]
    fn random_and_mutated_heads_get_documented_answers() {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let gateway = runtime.block_on(TestGateway::start(EngineKind::Embedded));
        let input = prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..1024),
            head(8).prop_map(|h| render(&h)),
            proptest::collection::vec(mutation(), 1..8).prop_map(|m| {
                let mut data = upgrade();
                mutate(&mut data, &m);
                data
            }),
        ];
        let mut runner = TestRunner::new(ProptestConfig::with_cases(64));
        let outcome = runner.run(&input, |mut data| {
            // Within one read of the gateway's: it closes a refused connection with nothing left
            // unread, so its answer is not lost to a reset.
            data.truncate(1024);
            let mut reader = Chunked::new(data.clone(), vec![data.len().max(1)]);
            let expected = head::read(&mut reader);
            let status = runtime.block_on(exchange(gateway.addr, &data));
            match expected {
                Err(HttpError::Malformed(_) | HttpError::TooLarge) => {
                    let status = status.unwrap_or_default();
                    prop_assert!(status.starts_with("HTTP/1.1 400 "), "{}", status);
                }
                Err(_) => prop_assert_eq!(status, None),
                Ok(_) => {
                    let status = status.unwrap_or_default();
                    let code = status
                        .strip_prefix("HTTP/1.1 ")
                        .and_then(|s| s.get(..3))
                        .and_then(|s| s.parse::<u16>().ok());
                    prop_assert!(code.is_some_and(|c| DOCUMENTED.contains(&c)), "{}", status);
                }
            }
            Ok(())
        });
        if let Err(e) = outcome {
            panic!("{e}");
        }
        let healthy = runtime.block_on(gateway.get("/healthz"));
        assert_eq!(healthy.ok().map(|(s, _)| s), Some(200));
        let mut upgrade_works = false;
        let answer = runtime.block_on(exchange(gateway.addr, &upgrade()));
        if let Some(line) = answer {
            // The token in `upgrade()` is no JWT: the upgrade is taken, `hello` would fail.
            upgrade_works = line.starts_with("HTTP/1.1 101 ") || line.starts_with("HTTP/1.1 401 ");
        }
        assert!(upgrade_works, "a valid upgrade is still answered");
        drop(gateway);
    }
}

mod jwt {
    use super::*;

    const SECRET: &str = "a-property-test-secret-of-32-bytes+";
    const RSA_PRIVATE: &[u8] = include_bytes!("keys/rsa-private.pem");

    fn authenticator(args: &[&str]) -> Authenticator {
        let args = std::iter::once("ferry-gateway").chain(args.iter().copied());
        Authenticator::from_config(&Config::from_args(args).expect("arguments"))
            .expect("authenticator")
    }

    fn now() -> u64 {
        jsonwebtoken::get_current_timestamp()
    }

    fn sign_hs(header: &Header, claims: &Value) -> String {
        let key = EncodingKey::from_secret(SECRET.as_bytes());
        jsonwebtoken::encode(header, claims, &key).expect("signing")
    }

    /// One configuration's verifier and two valid tokens of it, for `alice` and `mallory`.
    /// Built once: RSA signing is slow in a debug build.
    struct Setup {
        auth: Authenticator,
        alice: String,
        mallory: String,
    }

    fn setup(rsa: bool) -> &'static Setup {
        static HS256: LazyLock<Setup> = LazyLock::new(|| {
            let claims = |sub: &str| json!({"sub": sub, "exp": now() + 3600});
            let header = Header::new(Algorithm::HS256);
            Setup {
                auth: authenticator(&["--jwt-secret", SECRET]),
                alice: sign_hs(&header, &claims("alice")),
                mallory: sign_hs(&header, &claims("mallory")),
            }
        });
        static RS256: LazyLock<Setup> = LazyLock::new(|| {
            let key = EncodingKey::from_rsa_pem(RSA_PRIVATE).expect("RSA key");
            let sign = |sub: &str| {
                let claims = json!({"sub": sub, "exp": now() + 3600});
                jsonwebtoken::encode(&Header::new(Algorithm::RS256), &claims, &key)
                    .expect("signing")
            };
            let path = format!("{}/tests/keys/rsa-public.pem", env!("CARGO_MANIFEST_DIR"));
            Setup {
                auth: authenticator(&["--jwt-alg", "RS256", "--jwt-public-key", &path]),
                alice: sign("alice"),
                mallory: sign("mallory"),
            }
        });
        if rsa { &RS256 } else { &HS256 }
    }

    /// A refusal is one of the documented reasons a token is refused (never a key problem, which
    /// only happens at start), answered to the client as `unauthorized`.
    fn check_refusal(e: &AuthError) -> Result<(), TestCaseError> {
        prop_assert!(AuthError::REASONS.contains(&e.reason()));
        prop_assert!(!matches!(e, AuthError::Key(_)), "{:?}", e);
        prop_assert_eq!(e.code(), ferry_shared::ErrorCode::Unauthorized);
        prop_assert_eq!(e.client_message(), "unauthorized");
        Ok(())
    }

    fn refused(auth: &Authenticator, token: &str) -> Result<AuthError, TestCaseError> {
        match auth.verify_with_expiry(token) {
            Ok(v) => Err(TestCaseError::fail(format!("accepted {token:?} as {v:?}"))),
            Err(e) => {
                check_refusal(&e)?;
                Ok(e)
            }
        }
    }

    fn segment(value: &Value) -> String {
        URL_SAFE_NO_PAD.encode(value.to_string())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(CASES))]

        #[test]
        fn arbitrary_strings_are_refused(token in prop_oneof![
            "\\PC{0,256}",
            "[A-Za-z0-9_-]{0,80}\\.[A-Za-z0-9_-]{0,80}\\.[A-Za-z0-9_-]{0,80}",
            "[A-Za-z0-9_.=+/-]{0,512}",
        ]) {
            for rsa in [false, true] {
                let e = refused(&setup(rsa).auth, &token)?;
                if token.is_empty() {
                    prop_assert_eq!(&e, &AuthError::Missing);
                } else if !token.contains('.') {
                    prop_assert_eq!(&e, &AuthError::Malformed);
                }
            }
        }

        /// Any edit to a valid token, anywhere, refuses it; the untouched token passes.
        #[test]
        fn mutated_valid_tokens_are_refused(
            mutations in proptest::collection::vec(mutation(), 1..4),
            rsa in any::<bool>(),
        ) {
            let Setup { auth, alice: token, .. } = setup(rsa);
            prop_assert!(auth.verify_with_expiry(token).is_ok());
            let mut data = token.clone().into_bytes();
            mutate(&mut data, &mutations);
            let mutated = String::from_utf8_lossy(&data).into_owned();
            if mutated != *token {
                refused(auth, &mutated)?;
            }
        }

        /// Segments swapped, dropped, repeated or borrowed from another valid token: refused.
        #[test]
        fn rearranged_segments_are_refused(
            order in proptest::collection::vec(0..6usize, 0..6),
            rsa in any::<bool>(),
        ) {
            let Setup { auth, alice: token, mallory: other } = setup(rsa);
            let parts: Vec<&str> = token.split('.').chain(other.split('.')).collect();
            let rearranged = order.iter().map(|&i| parts[i]).collect::<Vec<_>>().join(".");
            if rearranged != *token && rearranged != *other {
                refused(auth, &rearranged)?;
            }
        }

        /// A header naming another algorithm (or none), with the signature kept, dropped or
        /// made with a key the attacker has: refused.
        #[test]
        fn forged_headers_are_refused(
            alg in prop_oneof![
                prop::sample::select(vec!["none", "None", "NONE", "nOnE", "", "HS256", "HS384",
                    "HS512", "RS256", "RS512", "ES256", "PS256", "EdDSA"])
                    .prop_map(|s| Value::from(s.to_owned())),
                Just(Value::Null),
                any::<i64>().prop_map(Value::from),
                "\\PC{0,16}".prop_map(Value::from),
            ],
            signature in prop_oneof![
                Just(None),
                Just(Some(String::new())),
                "[A-Za-z0-9_-]{0,64}".prop_map(Some),
            ],
            extra in proptest::option::of(("[a-z]{1,4}", "\\PC{0,16}")),
            rsa in any::<bool>(),
        ) {
            let Setup { auth, alice: token, .. } = setup(rsa);
            let mut header = json!({"alg": alg, "typ": "JWT"});
            if let Some((k, v)) = extra {
                header[k] = Value::from(v);
            }
            let mut parts: Vec<String> = token.split('.').map(str::to_owned).collect();
            parts[0] = segment(&header);
            if let Some(signature) = signature {
                parts[2] = signature;
            }
            refused(auth, &parts.join("."))?;
        }

        /// Claims signed with the right key are taken exactly when `sub` is a user id and `exp`
        /// is a time not past; otherwise refused with the reason that says so.
        #[test]
        fn signed_claims_are_checked(
            sub in prop_oneof![
                "[a-zA-Z0-9._@:-]{1,128}".prop_map(Value::from),
                "\\PC{0,140}".prop_map(Value::from),
                any::<i64>().prop_map(Value::from),
                Just(Value::Null),
            ],
            exp in prop_oneof![
                (60..1_000_000u64).prop_map(|d| Value::from(now() + d)),
                (60..1_000_000u64).prop_map(|d| Value::from(now() - d)),
                any::<i64>().prop_map(Value::from),
                any::<u64>().prop_map(Value::from),
                "\\PC{0,12}".prop_map(Value::from),
                Just(Value::Null),
            ],
        ) {
            let auth = &setup(false).auth;
            let mut claims = json!({"sub": sub, "exp": exp});
            for name in ["sub", "exp"] {
                if claims[name].is_null() {
                    claims.as_object_mut().map(|c| c.remove(name));
                }
            }
            let token = sign_hs(&Header::new(Algorithm::HS256), &claims);
            let sub_ok = sub.as_str().is_some_and(|s| UserId::parse(s).is_ok());
            let exp_time = exp.as_u64();
            match auth.verify_with_expiry(&token) {
                Ok(verified) => {
                    prop_assert!(sub_ok);
                    prop_assert_eq!(Some(verified.user.as_str()), sub.as_str());
                    prop_assert_eq!(Some(verified.expires_at), exp_time);
                    prop_assert!(exp_time.is_some_and(|t| t.saturating_add(5) >= now()));
                }
                Err(e) => {
                    check_refusal(&e)?;
                    // Claims are checked for presence and form before expiry.
                    match exp_time {
                        Some(t) if t.saturating_add(60) < now() && sub_ok => {
                            prop_assert_eq!(e, AuthError::Expired);
                        }
                        Some(t) if t.saturating_add(60) < now() => prop_assert!(
                            matches!(e, AuthError::Expired | AuthError::BadClaims(_)),
                            "{:?}", e
                        ),
                        Some(t) if t > now() + 10 => {
                            prop_assert!(!sub_ok, "good claims refused: {:?}", e);
                            prop_assert!(matches!(e, AuthError::BadClaims(_)), "{:?}", e);
                        }
                        Some(_) => {}
                        None => prop_assert!(matches!(e, AuthError::BadClaims(_)), "{:?}", e),
                    }
                }
            }
        }

        /// A token far larger than any real one (segments of up to 64 KiB, within a frame) is
        /// refused like any other.
        #[test]
        fn huge_segments_are_refused(
            which in 0..3usize,
            len in 1024..64 * 1024usize,
            fill in prop_oneof![
                Just('A'),
                Just('_'),
                Just('='),
                Just('.'),
            ],
        ) {
            let Setup { auth, alice: token, .. } = setup(false);
            let mut parts: Vec<String> = token.split('.').map(str::to_owned).collect();
            parts[which] = std::iter::repeat_n(fill, len).collect();
            refused(auth, &parts.join("."))?;
        }
    }
}
