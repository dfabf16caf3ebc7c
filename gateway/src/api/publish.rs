//! `POST /v1/messages`: one message from a backend to up to `--api-max-recipients` inboxes. Every
//! append is issued before any is awaited, so they pipeline to the store in the request's order;
//! each recipient gets its own answer, as a `send` would (idempotent per recipient, like G5).

use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use bytes::Bytes;
use ferry_router::{Engine, NewMessage, SenderChecks};
use ferry_shared::{MessageId, UserId};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use hyper::body::Incoming;
use hyper::{Request, StatusCode, header};
use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};

use super::keys::ApiKey;
use super::reply::{ApiError, ErrorDetail, Reply, json};
use super::{Api, BODY_READ_TIMEOUT, IN_FLIGHT_KIB};
use crate::config::Config;
use crate::metrics;
use crate::outbound::now_ms;
use crate::sends::{self, Accepted};

/// The sender of a publish that names none.
const DEFAULT_FROM: &str = "app";

/// The `outcome` labels of `ferry_api_messages_total`: a recipient's answer.
pub(super) const OUTCOMES: [&str; 5] = [
    "stored",
    "duplicate",
    "inbox_full",
    "unavailable",
    "internal",
];

/// The request body, before its values are checked. Unknown fields are ignored.
#[derive(Deserialize)]
struct PublishRequest {
    id: String,
    to: Recipients,
    #[serde(default)]
    from: Option<String>,
    #[serde(default)]
    body: Option<String>,
    #[serde(default)]
    body_b64: Option<String>,
}

/// `to`: one user id, or an array of them.
struct Recipients(Vec<String>);

impl<'de> Deserialize<'de> for Recipients {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct RecipientsVisitor;
        impl<'de> Visitor<'de> for RecipientsVisitor {
            type Value = Recipients;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a user id or an array of user ids")
            }
            fn visit_str<E: de::Error>(self, to: &str) -> Result<Recipients, E> {
                Ok(Recipients(vec![to.to_owned()]))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Recipients, A::Error> {
                let mut to = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1024));
                while let Some(user) = seq.next_element::<String>()? {
                    to.push(user);
                }
                Ok(Recipients(to))
            }
        }
        deserializer.deserialize_any(RecipientsVisitor)
    }
}

/// A publish whose values are checked.
struct Publish {
    id: MessageId,
    from: UserId,
    to: Vec<UserId>,
    body: Bytes,
}

/// One recipient's answer, in the request's order.
#[derive(Serialize)]
#[serde(untagged)]
enum RecipientResult {
    Stored {
        to: String,
        seq: u64,
        duplicate: bool,
    },
    Refused {
        to: String,
        error: ErrorDetail,
    },
}

#[derive(Serialize)]
struct Results {
    results: Vec<RecipientResult>,
}

/// Handles the route for `key`, whose rate bucket pays one token per recipient.
pub async fn publish(
    api: &Api,
    engine: &dyn Engine,
    config: &Config,
    key: &ApiKey,
    request: Request<Incoming>,
) -> Result<Reply, ApiError> {
    let body = read_body(request, api.body_limit).await?;
    let request = parse(&body)?;
    let publish = check(request, config.max_body_bytes, api.max_recipients)?;
    // At most --api-max-recipients, which config validation keeps within u32 and the burst.
    let cost = u32::try_from(publish.to.len()).unwrap_or(u32::MAX);
    api.charge(key, cost)?;
    tracing::debug!(
        key = %key.name,
        id = %publish.id,
        recipients = publish.to.len(),
        "publishing"
    );
    // Bounded node-wide: 1,000 recipients of a 64 KiB body are 64 MiB on their way to the store.
    let kib = (publish.body.len().max(1) * publish.to.len()).div_ceil(1024);
    let kib = u32::try_from(kib).unwrap_or(u32::MAX).min(IN_FLIGHT_KIB);
    let room = tokio::time::timeout(config.store_timeout, api.in_flight.acquire_many(kib));
    let Ok(Ok(_room)) = room.await else {
        return Err(ApiError::Unavailable(
            "the node has too many publishes in flight; retry",
        ));
    };
    let results = append_all(engine, publish).await;
    for result in &results {
        let outcome = match result {
            RecipientResult::Stored { duplicate, .. } if *duplicate => "duplicate",
            RecipientResult::Stored { .. } => "stored",
            RecipientResult::Refused { error, .. } => error.code,
        };
        metrics::API_MESSAGES
            .with_label_values(&[key.name.as_str(), outcome])
            .inc();
    }
    Ok(json(StatusCode::OK, &Results { results }))
}

/// The request body, at most `limit` bytes, within `BODY_READ_TIMEOUT`.
async fn read_body(request: Request<Incoming>, limit: usize) -> Result<Bytes, ApiError> {
    let too_large = || ApiError::TooLarge(format!("the request body is over {limit} bytes"));
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > limit as u64) {
        return Err(too_large());
    }
    let collect = Limited::new(request.into_body(), limit).collect();
    match tokio::time::timeout(BODY_READ_TIMEOUT, collect).await {
        Err(_) => Err(ApiError::Timeout),
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
        Ok(Err(e)) if e.is::<LengthLimitError>() => Err(too_large()),
        Ok(Err(e)) => Err(ApiError::BadRequest(format!(
            "reading the body failed: {e}"
        ))),
    }
}

/// The request's JSON object (serde would also take a struct from an array: refused here).
fn parse(body: &[u8]) -> Result<PublishRequest, ApiError> {
    if body.trim_ascii_start().first() != Some(&b'{') {
        return Err(ApiError::BadRequest(
            "the body must be a JSON object (docs/openapi.yaml, PublishRequest)".into(),
        ));
    }
    serde_json::from_slice(body)
        .map_err(|e| ApiError::BadRequest(format!("not a publish request: {e}")))
}

/// Checks every value; an error names the field.
fn check(
    request: PublishRequest,
    max_body: usize,
    max_recipients: usize,
) -> Result<Publish, ApiError> {
    let invalid = |field: &str, e: &dyn fmt::Display| ApiError::Invalid(format!("{field}: {e}"));
    let id = MessageId::parse(&request.id).map_err(|e| invalid("id", &e))?;
    let from = request.from.as_deref().unwrap_or(DEFAULT_FROM);
    let from = UserId::parse(from).map_err(|e| invalid("from", &e))?;
    let count = request.to.0.len();
    if count == 0 || count > max_recipients {
        return Err(ApiError::Invalid(format!(
            "to: {count} recipients; 1 to {max_recipients} are allowed"
        )));
    }
    let to = request
        .to
        .0
        .iter()
        .enumerate()
        .map(|(i, user)| UserId::parse(user).map_err(|e| invalid(&format!("to[{i}]"), &e)))
        .collect::<Result<Vec<_>, _>>()?;
    let body = match (request.body, request.body_b64) {
        (Some(text), None) => Bytes::from(text),
        (None, Some(encoded)) => B64
            .decode(encoded.as_bytes())
            .map(Bytes::from)
            .map_err(|_| ApiError::Invalid("body_b64: not standard base64".into()))?,
        _ => {
            return Err(ApiError::Invalid(
                "body_b64: give exactly one of body and body_b64".into(),
            ));
        }
    };
    if body.is_empty() {
        return Err(ApiError::Invalid("body: must not be empty".into()));
    }
    if body.len() > max_body {
        return Err(ApiError::TooLarge(format!(
            "the body is {} bytes; at most {max_body} are allowed",
            body.len()
        )));
    }
    Ok(Publish { id, from, to, body })
}

/// Issues every append, then awaits them together: each is sent to the store when it is called,
/// so they pipeline in the request's order (a recipient named twice is a duplicate the second
/// time).
async fn append_all(engine: &dyn Engine, publish: Publish) -> Vec<RecipientResult> {
    let Publish { id, from, to, body } = publish;
    let ts = now_ms();
    let appends: Vec<_> = to
        .iter()
        .map(|recipient| {
            engine.append(&NewMessage {
                from: from.clone(),
                to: recipient.clone(),
                id: id.clone(),
                ts,
                body: body.clone(),
                // The backend may publish to anyone, as often as its key's rate allows.
                checks: SenderChecks::default(),
            })
        })
        .collect();
    let outcomes = futures_util::future::join_all(appends).await;
    to.iter()
        .zip(outcomes)
        .map(|(recipient, outcome)| {
            let to = recipient.to_string();
            match sends::accepted(recipient.as_str(), outcome) {
                Ok(Accepted { seq, duplicate }) => RecipientResult::Stored { to, seq, duplicate },
                Err(refused) => RecipientResult::Refused {
                    to,
                    error: ErrorDetail {
                        code: refused.code.as_str(),
                        message: refused.message,
                        retry_after_ms: refused.retry_after_ms,
                    },
                },
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checked(json: &str) -> Result<Publish, ApiError> {
        check(parse(json.as_bytes())?, 8, 3)
    }

    fn refusal(json: &str) -> (&'static str, String) {
        match checked(json) {
            Ok(_) => panic!("{json} passed"),
            Err(e) => (e.code(), e.to_string()),
        }
    }

    #[test]
    fn good_requests() {
        let one = checked(r#"{"id":"n-1","to":"alice","body":"hi"}"#).expect("valid");
        assert_eq!(one.from.as_str(), DEFAULT_FROM);
        assert_eq!(one.to.len(), 1);
        assert_eq!(&one.body[..], b"hi");
        let many = checked(r#"{"id":"n-1","to":["a","b","a"],"from":"bots","body_b64":"/wA="}"#)
            .expect("valid");
        assert_eq!(many.from.as_str(), "bots");
        assert_eq!(
            many.to.iter().map(UserId::as_str).collect::<Vec<_>>(),
            ["a", "b", "a"]
        );
        assert_eq!(&many.body[..], [0xff, 0x00]);
        assert!(checked(r#"{"id":"n","to":"a","body":"12345678","extra":1}"#).is_ok());
    }

    #[test]
    fn shapes_are_bad_requests() {
        for json in [
            "not json",
            r#"{"to":"a","body":"x"}"#,
            r#"{"id":"n","body":"x"}"#,
            r#"{"id":5,"to":"a","body":"x"}"#,
            r#"{"id":"n","to":5,"body":"x"}"#,
            r#"{"id":"n","to":["a",5],"body":"x"}"#,
            r#"{"id":"n","to":"a","body":["x"]}"#,
            r#"["n","a","x"]"#,
            r#" ["n","a",null,"x"]"#,
            "",
            "null",
        ] {
            assert_eq!(refusal(json).0, "bad_request", "{json}");
        }
    }

    #[test]
    fn values_are_invalid_and_name_their_field() {
        for (json, field) in [
            (r#"{"id":"a b","to":"a","body":"x"}"#, "id"),
            (r#"{"id":"n","to":"a/b","body":"x"}"#, "to[0]"),
            (r#"{"id":"n","to":["a","b c"],"body":"x"}"#, "to[1]"),
            (r#"{"id":"n","to":"a","from":"","body":"x"}"#, "from"),
            (r#"{"id":"n","to":[],"body":"x"}"#, "to"),
            (r#"{"id":"n","to":["a","b","c","d"],"body":"x"}"#, "to"),
            (r#"{"id":"n","to":"a","body":""}"#, "body"),
            (r#"{"id":"n","to":"a","body_b64":"!!"}"#, "body_b64"),
            (r#"{"id":"n","to":"a"}"#, "body_b64"),
            (
                r#"{"id":"n","to":"a","body":"x","body_b64":"eA=="}"#,
                "body_b64",
            ),
        ] {
            let (code, message) = refusal(json);
            assert_eq!(code, "invalid", "{json}");
            assert!(message.contains(field), "{json}: {message}");
        }
    }

    #[test]
    fn a_body_over_the_limit_is_too_large_after_decoding() {
        assert_eq!(
            refusal(r#"{"id":"n","to":"a","body":"123456789"}"#).0,
            "too_large"
        );
        // 9 bytes, 12 characters of base64.
        assert_eq!(
            refusal(r#"{"id":"n","to":"a","body_b64":"MTIzNDU2Nzg5"}"#).0,
            "too_large"
        );
        assert!(checked(r#"{"id":"n","to":"a","body_b64":"MTIzNDU2Nzg="}"#).is_ok());
    }
}
