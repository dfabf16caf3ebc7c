//! A connection's sends in flight: each `send` is checked and issued to the store as it arrives,
//! so one connection keeps several appends in flight (the store keeps one sender's appends in
//! order), and the answers go out in the order the sends came in.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::task::Poll;

use ferry_router::{AppendOutcome, EngineError};
use ferry_shared::{ErrorCode, ServerFrame};
use futures_util::future::BoxFuture;

use crate::metrics;

/// The most of a refused send's `id` its answer echoes: a valid message id's length.
const ECHOED_ID: usize = 64;

/// Why a send is refused before it reaches the store.
#[derive(Debug)]
pub struct Refused {
    pub code: ErrorCode,
    pub message: String,
    pub retry_after_ms: Option<u64>,
}

impl Refused {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            retry_after_ms: None,
        }
    }
}

/// One send waiting for its answer.
struct Pending {
    id: String,
    to: String,
    answer: Answer,
}

enum Answer {
    Refused(Refused),
    Store(BoxFuture<'static, Result<AppendOutcome, EngineError>>),
}

/// The sends of one connection, oldest first. Empty (and unallocated) on an idle connection.
#[derive(Default)]
pub struct Sends {
    queue: VecDeque<Pending>,
}

impl Sends {
    pub fn len(&self) -> usize {
        self.queue.len()
    }

    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// A send issued to the store: `append` is its answer.
    pub fn issued(
        &mut self,
        id: String,
        to: String,
        append: BoxFuture<'static, Result<AppendOutcome, EngineError>>,
    ) {
        self.queue.push_back(Pending {
            id,
            to,
            answer: Answer::Store(append),
        });
    }

    /// A send refused before the store: answered in its turn.
    /// A refused send's answer; it echoes at most a message id's length of the client's `id`
    /// (which was not validated: it may be close to a frame's size).
    pub fn refused(&mut self, id: String, refused: Refused) {
        self.queue.push_back(Pending {
            id: crate::session::truncated(id, ECHOED_ID),
            to: String::new(),
            answer: Answer::Refused(refused),
        });
    }

    /// The answer to the oldest send, once it is known; pending while there is none.
    /// Cancel-safe: nothing is taken off the queue until its answer is returned.
    pub async fn next_answer(&mut self) -> ServerFrame {
        std::future::poll_fn(|cx| {
            let Some(front) = self.queue.front_mut() else {
                return Poll::Pending;
            };
            let outcome = match &mut front.answer {
                Answer::Refused(_) => None,
                Answer::Store(append) => match Pin::new(append).poll(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(outcome) => Some(outcome),
                },
            };
            let Some(pending) = self.queue.pop_front() else {
                return Poll::Pending;
            };
            Poll::Ready(answer_frame(pending, outcome))
        })
        .await
    }
}

/// An append the store took: `to`'s seq for it, and whether it was stored before (G5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Accepted {
    pub seq: u64,
    pub duplicate: bool,
}

/// What the store's answer to an append to `to` means for its sender: the mapping of store
/// outcomes to protocol error codes, shared by `send` frames and the HTTP API's publishes.
pub fn accepted(
    to: &str,
    outcome: Result<AppendOutcome, EngineError>,
) -> Result<Accepted, Refused> {
    match outcome {
        Ok(AppendOutcome::Stored { seq }) => Ok(Accepted {
            seq,
            duplicate: false,
        }),
        Ok(AppendOutcome::Duplicate { seq }) => Ok(Accepted {
            seq,
            duplicate: true,
        }),
        Ok(AppendOutcome::InboxFull) => Err(Refused::new(
            ErrorCode::InboxFull,
            format!("{to}'s inbox is full"),
        )),
        Ok(AppendOutcome::ShareFull) => Err(Refused::new(
            ErrorCode::InboxFull,
            format!("{to}'s inbox holds as many of your messages as one sender may"),
        )),
        Ok(AppendOutcome::UnknownRecipient) => Err(Refused::new(
            ErrorCode::Forbidden,
            format!("{to} is not a known user"),
        )),
        Err(EngineError::Unavailable(e)) => {
            // Per message, so at debug: an outage shows in the store metrics and the
            // watchdog's log, not as one line per refused send.
            tracing::debug!(error = %e, "append failed");
            Err(Refused::new(
                ErrorCode::Unavailable,
                "the store did not answer in time; retry with the same id",
            ))
        }
        Err(EngineError::Internal(e)) => {
            tracing::error!(error = %e, "append failed");
            Err(Refused::new(ErrorCode::Internal, "store fault"))
        }
    }
}

/// The frame answering `pending`, given the store's outcome when it was issued.
fn answer_frame(
    pending: Pending,
    outcome: Option<Result<AppendOutcome, EngineError>>,
) -> ServerFrame {
    let Pending { id, to, answer } = pending;
    let refused = match (answer, outcome) {
        (Answer::Refused(refused), _) => refused,
        (Answer::Store(_), Some(outcome)) => match accepted(&to, outcome) {
            Ok(Accepted { seq, duplicate }) => {
                let label = if duplicate { "duplicate" } else { "stored" };
                metrics::SENDS.with_label_values(&[label]).inc();
                return ServerFrame::Sent {
                    id,
                    to,
                    seq,
                    duplicate,
                };
            }
            Err(refused) => refused,
        },
        (Answer::Store(_), None) => Refused::new(ErrorCode::Internal, "send lost its answer"),
    };
    metrics::SENDS
        .with_label_values(&[refused.code.as_str()])
        .inc();
    ServerFrame::Error {
        code: refused.code,
        message: refused.message,
        id: Some(id),
        retry_after_ms: refused.retry_after_ms,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::FutureExt;

    fn answered(
        outcome: Result<AppendOutcome, EngineError>,
    ) -> BoxFuture<'static, Result<AppendOutcome, EngineError>> {
        futures_util::future::ready(outcome).boxed()
    }

    #[tokio::test]
    async fn answers_go_out_in_the_order_the_sends_came() {
        let mut sends = Sends::default();
        let (slow_tx, slow_rx) = tokio::sync::oneshot::channel();
        sends.issued(
            "a".into(),
            "bob".into(),
            async move { slow_rx.await.expect("answered") }.boxed(),
        );
        sends.refused("b".into(), Refused::new(ErrorCode::Invalid, "bad"));
        sends.issued(
            "c".into(),
            "bob".into(),
            answered(Ok(AppendOutcome::Duplicate { seq: 1 })),
        );
        // The oldest is not answered yet: nothing goes out, the later answers wait.
        assert!(sends.next_answer().now_or_never().is_none());
        assert_eq!(sends.len(), 3);
        slow_tx
            .send(Ok(AppendOutcome::Stored { seq: 7 }))
            .expect("waiting");
        let kinds: Vec<String> = vec![
            format!("{:?}", sends.next_answer().await),
            format!("{:?}", sends.next_answer().await),
            format!("{:?}", sends.next_answer().await),
        ];
        assert!(
            kinds[0].contains("Sent") && kinds[0].contains("\"a\""),
            "{kinds:?}"
        );
        assert!(
            kinds[1].contains("Invalid") && kinds[1].contains("\"b\""),
            "{kinds:?}"
        );
        assert!(kinds[2].contains("duplicate: true"), "{kinds:?}");
        assert!(sends.is_empty());
    }
}
