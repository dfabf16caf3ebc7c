//! How the HTTP API answers: JSON bodies, and every refusal as an `ApiError` that carries its
//! status and error code, so the mapping is written once (docs/openapi.yaml, `Error`).

use bytes::Bytes;
use ferry_router::EngineError;
use http_body_util::Full;
use hyper::header::{self, HeaderValue};
use hyper::{Response, StatusCode};
use serde::Serialize;

pub type Reply = Response<Full<Bytes>>;

const JSON: &str = "application/json";

/// Why a request is refused. The message never carries a secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    Unauthorized(&'static str),
    /// Not JSON, or JSON of the wrong shape (a missing field, a wrong type).
    #[error("{0}")]
    BadRequest(String),
    /// Well-formed, with a bad value (an id, a recipient count, an empty body).
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    TooLarge(String),
    #[error("the request body did not arrive in time")]
    Timeout,
    #[error("this key's rate is used up; retry after {retry_after_ms} ms")]
    RateLimited { retry_after_ms: u64 },
    #[error("{0}")]
    NotFound(String),
    #[error("this route takes {allow}")]
    MethodNotAllowed { allow: &'static str },
    /// The store did not answer in time, or the node has too many publishes in flight.
    #[error("{0}")]
    Unavailable(&'static str),
    #[error("{0}")]
    Internal(&'static str),
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::BadRequest(_) | ApiError::Invalid(_) => StatusCode::BAD_REQUEST,
            ApiError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Timeout => StatusCode::REQUEST_TIMEOUT,
            ApiError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The `error.code` of the body: the protocol's codes where one fits (PROTOCOL.md, Errors).
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::Unauthorized(_) => "unauthorized",
            ApiError::BadRequest(_) | ApiError::Timeout => "bad_request",
            ApiError::Invalid(_) => "invalid",
            ApiError::TooLarge(_) => "too_large",
            ApiError::RateLimited { .. } => "rate_limited",
            ApiError::NotFound(_) => "not_found",
            ApiError::MethodNotAllowed { .. } => "method_not_allowed",
            ApiError::Unavailable(_) => "unavailable",
            ApiError::Internal(_) => "internal",
        }
    }

    /// A store error, as the API answers it.
    pub fn from_store(e: EngineError) -> ApiError {
        match e {
            // Per request, so at debug: an outage shows in the store metrics and the watchdog's
            // log.
            EngineError::Unavailable(e) => {
                tracing::debug!(error = %e, "store call failed");
                ApiError::Unavailable("the store did not answer in time; retry")
            }
            EngineError::Internal(e) => {
                tracing::error!(error = %e, "store call failed");
                ApiError::Internal("store fault")
            }
        }
    }

    /// The response: `{"error":{"code","message"[,"retry_after_ms"]}}` and the headers the
    /// status calls for.
    pub fn reply(&self) -> Reply {
        let retry_after_ms = match self {
            ApiError::RateLimited { retry_after_ms } => Some(*retry_after_ms),
            _ => None,
        };
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code(),
                message: self.to_string(),
                retry_after_ms,
            },
        };
        let mut reply = json(self.status(), &body);
        let headers = reply.headers_mut();
        match self {
            ApiError::Unauthorized(_) => {
                headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            ApiError::RateLimited { retry_after_ms } => {
                let secs = retry_after_ms.div_ceil(1000).max(1);
                headers.insert(header::RETRY_AFTER, HeaderValue::from(secs));
            }
            ApiError::Unavailable(_) => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            ApiError::MethodNotAllowed { allow } => {
                headers.insert(header::ALLOW, HeaderValue::from_static(allow));
            }
            // The rest of the body was not read: the connection cannot carry another request.
            ApiError::TooLarge(_) | ApiError::Timeout => {
                headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            _ => {}
        }
        reply
    }
}

#[derive(Serialize)]
struct ErrorBody {
    error: ErrorDetail,
}

/// An error as the API writes it, also per recipient in a publish's results.
#[derive(Debug, Serialize)]
pub struct ErrorDetail {
    pub code: &'static str,
    pub message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_after_ms: Option<u64>,
}

/// `value` as a JSON response with `status`.
pub fn json(status: StatusCode, value: &impl Serialize) -> Reply {
    match serde_json::to_vec(value) {
        Ok(body) => with_body(status, Bytes::from(body), Some(JSON)),
        // The API's types always serialize; answer rather than panic if one ever does not.
        Err(e) => {
            tracing::error!(error = %e, "encoding an API answer failed");
            let body = Bytes::from_static(
                br#"{"error":{"code":"internal","message":"encoding the answer failed"}}"#,
            );
            with_body(StatusCode::INTERNAL_SERVER_ERROR, body, Some(JSON))
        }
    }
}

/// A response without a body (`204`).
pub fn empty(status: StatusCode) -> Reply {
    with_body(status, Bytes::new(), None)
}

fn with_body(status: StatusCode, body: Bytes, content_type: Option<&'static str>) -> Reply {
    let mut reply = Response::new(Full::new(body));
    *reply.status_mut() = status;
    if let Some(kind) = content_type {
        reply
            .headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static(kind));
    }
    reply
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_limited_rounds_retry_after_up_to_whole_seconds() {
        for (ms, secs) in [(1, "1"), (1000, "1"), (1001, "2"), (0, "1")] {
            let reply = ApiError::RateLimited { retry_after_ms: ms }.reply();
            assert_eq!(reply.status(), 429);
            assert_eq!(reply.headers()[header::RETRY_AFTER], secs, "{ms} ms");
        }
    }

    #[test]
    fn unauthorized_asks_for_a_bearer_token() {
        let reply = ApiError::Unauthorized("no key").reply();
        assert_eq!(reply.status(), 401);
        assert_eq!(reply.headers()[header::WWW_AUTHENTICATE], "Bearer");
        assert_eq!(reply.headers()[header::CONTENT_TYPE], JSON);
    }
}
