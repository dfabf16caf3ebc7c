//! One send as a load run makes it: every `rate_limited` answer counted, and either waited out
//! and sent again (as the Rust client does) or given up (the message was pushed back). The
//! other retries stay the client's own: an `unavailable` answer or a disconnect hands the send
//! to [`Client::send`], which retries with the same id until answered or timed out.

use std::time::Duration;

use bytes::Bytes;
use ferry_shared::ErrorCode;
use ferry_shared::client::{Client, SendError, Sent};

use crate::config::OnRateLimited;
use crate::verify::Stats;

/// The wait before the client takes over an `unavailable` send (its own first backoff).
const UNAVAILABLE_WAIT: Duration = Duration::from_millis(50);
/// The wait after a `rate_limited` answer without `retry_after_ms`.
const RATE_LIMITED_WAIT: Duration = Duration::from_millis(50);

/// How a run sends.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SendPolicy {
    pub on_rate_limited: OnRateLimited,
    /// Limit on the whole send, retries included.
    pub timeout: Duration,
}

/// What to do after one attempt's answer.
#[derive(Debug)]
enum Next {
    Done(Result<Sent, SendError>),
    /// Wait, then try once more here.
    Again(Duration),
    /// Wait, then leave the retries to the client.
    ToClient(Duration),
}

fn next(policy: OnRateLimited, answer: Result<Sent, SendError>) -> Next {
    match answer {
        Err(SendError::Rejected {
            code: ErrorCode::RateLimited,
            retry_after_ms,
            ..
        }) if policy == OnRateLimited::Retry => {
            let after = retry_after_ms.map_or(RATE_LIMITED_WAIT, Duration::from_millis);
            // Up to as much again, so sends pushed back together do not return together.
            Next::Again(after + after.mul_f64(rand::random::<f64>()))
        }
        Err(SendError::Rejected {
            code: ErrorCode::Unavailable,
            ..
        }) => Next::ToClient(UNAVAILABLE_WAIT),
        Err(SendError::Disconnected { close_code }) if close_code != Some(1009) => {
            Next::ToClient(Duration::ZERO)
        }
        other => Next::Done(other),
    }
}

/// Sends `body` to `to` under message id `id`.
pub(crate) async fn send(
    client: &Client,
    to: &str,
    id: &str,
    body: Bytes,
    policy: SendPolicy,
    stats: &Stats,
) -> Result<Sent, SendError> {
    let attempts = async {
        loop {
            let answer = client.send_once(to, id, body.clone()).await;
            if matches!(
                answer,
                Err(SendError::Rejected {
                    code: ErrorCode::RateLimited,
                    ..
                })
            ) {
                stats.rate_limited();
            }
            match next(policy.on_rate_limited, answer) {
                Next::Done(result) => return result,
                Next::Again(wait) => tokio::time::sleep(wait).await,
                Next::ToClient(wait) => {
                    tokio::time::sleep(wait).await;
                    return client.send(to, id, body).await;
                }
            }
        }
    };
    tokio::time::timeout(policy.timeout, attempts)
        .await
        .unwrap_or(Err(SendError::Timeout))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rejected(code: ErrorCode, retry_after_ms: Option<u64>) -> Result<Sent, SendError> {
        Err(SendError::Rejected {
            code,
            message: String::new(),
            retry_after_ms,
        })
    }

    #[test]
    fn rate_limited_is_waited_out_or_given_up() {
        let Next::Again(wait) = next(
            OnRateLimited::Retry,
            rejected(ErrorCode::RateLimited, Some(200)),
        ) else {
            panic!("retried")
        };
        assert!((200..=400).contains(&wait.as_millis()), "{wait:?}");
        assert!(matches!(
            next(
                OnRateLimited::GiveUp,
                rejected(ErrorCode::RateLimited, Some(200))
            ),
            Next::Done(Err(SendError::Rejected {
                code: ErrorCode::RateLimited,
                ..
            }))
        ));
    }

    #[test]
    fn other_retries_are_the_clients_and_answers_end_the_send() {
        for policy in [OnRateLimited::Retry, OnRateLimited::GiveUp] {
            assert!(matches!(
                next(policy, rejected(ErrorCode::Unavailable, None)),
                Next::ToClient(UNAVAILABLE_WAIT)
            ));
            assert!(matches!(
                next(policy, Err(SendError::Disconnected { close_code: None })),
                Next::ToClient(Duration::ZERO)
            ));
            let too_big = next(
                policy,
                Err(SendError::Disconnected {
                    close_code: Some(1009),
                }),
            );
            assert!(matches!(too_big, Next::Done(Err(_))));
            let ok = Ok(Sent {
                seq: 3,
                duplicate: false,
            });
            assert!(matches!(next(policy, ok), Next::Done(Ok(_))));
            assert!(matches!(
                next(policy, rejected(ErrorCode::Invalid, None)),
                Next::Done(Err(_))
            ));
        }
    }
}
