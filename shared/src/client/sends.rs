//! The sends waiting for their answers, matched by id: a `sent` or an `error` carrying a
//! send's id answers it, in whatever order they come. Sends made while disconnected are held,
//! in order, until the next connection.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use tokio::sync::oneshot;
use tokio_tungstenite::tungstenite::Message;

use super::error::SendError;
use super::events::Sent;
use crate::frame::ServerFrame;

/// Where a send's answer goes.
pub(crate) type Reply = oneshot::Sender<Result<Sent, SendError>>;

struct PendingSend {
    /// The encoded frame while it is held; `None` once it is on the socket.
    frame: Option<Message>,
    reply: Reply,
}

/// Every send of one client that has no answer yet.
#[derive(Default)]
pub(crate) struct Sends {
    pending: HashMap<Arc<str>, PendingSend>,
    /// Held sends, oldest first.
    held: VecDeque<Arc<str>>,
}

impl Sends {
    /// Registers a send. Returns the frame to write now when `connected`; otherwise holds it
    /// for [`Sends::next_held`]. A send whose id already waits is answered `IdInFlight` at once,
    /// unless the caller waiting for it gave up (timed out): then the new send takes its place,
    /// and whichever answer comes first is its answer (same id, same message: G5).
    pub(crate) fn begin(
        &mut self,
        id: Arc<str>,
        frame: Message,
        reply: Reply,
        connected: bool,
    ) -> Option<Message> {
        if let Some(existing) = self.pending.get(&id) {
            if !existing.reply.is_closed() {
                let _ = reply.send(Err(SendError::IdInFlight));
                return None;
            }
            self.pending.remove(&id);
        }
        if connected {
            // Recorded as written before the write: if the write fails, the outcome is unknown.
            self.pending.insert(id, PendingSend { frame: None, reply });
            Some(frame)
        } else {
            self.held.push_back(Arc::clone(&id));
            self.pending.insert(
                id,
                PendingSend {
                    frame: Some(frame),
                    reply,
                },
            );
            None
        }
    }

    /// The oldest held send, now counted as written; abandoned ones (their caller gave up) are
    /// forgotten on the way.
    pub(crate) fn next_held(&mut self) -> Option<Message> {
        while let Some(id) = self.held.pop_front() {
            let Some(pending) = self.pending.get_mut(&id) else {
                continue;
            };
            if pending.reply.is_closed() {
                self.pending.remove(&id);
                continue;
            }
            if let Some(frame) = pending.frame.take() {
                return Some(frame);
            }
        }
        None
    }

    /// Answers the send a `sent` or `error` frame names. Gives the frame back when it is not
    /// such an answer (an `error` without id, any other frame) or when no send waits for it.
    pub(crate) fn answer(&mut self, frame: ServerFrame) -> Option<ServerFrame> {
        let waiting = match &frame {
            ServerFrame::Sent { id, .. } | ServerFrame::Error { id: Some(id), .. } => self
                .pending
                .get(id.as_str())
                .is_some_and(|p| p.frame.is_none()),
            _ => false,
        };
        if !waiting {
            return Some(frame);
        }
        let (id, answer) = match frame {
            ServerFrame::Sent {
                id, seq, duplicate, ..
            } => (id, Ok(Sent { seq, duplicate })),
            ServerFrame::Error {
                code,
                message,
                id: Some(id),
                retry_after_ms,
            } => (
                id,
                Err(SendError::Rejected {
                    code,
                    message,
                    retry_after_ms,
                }),
            ),
            other => return Some(other),
        };
        if let Some(pending) = self.pending.remove(id.as_str()) {
            let _ = pending.reply.send(answer);
        }
        None
    }

    /// The connection dropped: written sends get `Disconnected` (outcome unknown; their callers
    /// may retry with the same id); held ones stay held.
    pub(crate) fn connection_lost(&mut self, close_code: Option<u16>) {
        for (_, pending) in self.pending.extract_if(|_, p| p.frame.is_none()) {
            let _ = pending
                .reply
                .send(Err(SendError::Disconnected { close_code }));
        }
    }

    /// The client stops: written sends get `Disconnected`, held ones `Stopped`.
    pub(crate) fn stop(&mut self, close_code: Option<u16>) {
        self.held.clear();
        for (_, pending) in self.pending.drain() {
            let error = match pending.frame {
                None => SendError::Disconnected { close_code },
                Some(_) => SendError::Stopped,
            };
            let _ = pending.reply.send(Err(error));
        }
    }

    /// Sends without an answer, held or written.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.pending.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::ErrorCode;
    use tokio::sync::oneshot::Receiver;

    type Answer = Receiver<Result<Sent, SendError>>;

    fn begin(sends: &mut Sends, id: &str, connected: bool) -> (Option<Message>, Answer) {
        let (reply, answer) = oneshot::channel();
        let frame = Message::text(id.to_owned());
        (sends.begin(Arc::from(id), frame, reply, connected), answer)
    }

    fn sent(id: &str, seq: u64) -> ServerFrame {
        ServerFrame::Sent {
            id: id.into(),
            to: "bob".into(),
            seq,
            duplicate: false,
        }
    }

    #[test]
    fn answers_are_matched_by_id_in_any_order() {
        let mut sends = Sends::default();
        let (frame, mut a) = begin(&mut sends, "a", true);
        assert_eq!(
            frame,
            Some(Message::text("a")),
            "connected: written at once"
        );
        let (_, mut b) = begin(&mut sends, "b", true);
        let rejected = ServerFrame::Error {
            code: ErrorCode::RateLimited,
            message: "slow".into(),
            id: Some("b".into()),
            retry_after_ms: Some(20),
        };
        assert_eq!(sends.answer(rejected), None);
        assert_eq!(sends.answer(sent("a", 4)), None);
        assert_eq!(
            a.try_recv().unwrap().unwrap(),
            Sent {
                seq: 4,
                duplicate: false
            }
        );
        assert!(matches!(
            b.try_recv().unwrap(),
            Err(SendError::Rejected {
                code: ErrorCode::RateLimited,
                retry_after_ms: Some(20),
                ..
            })
        ));
        assert_eq!(sends.len(), 0);
    }

    #[test]
    fn frames_for_nobody_are_given_back() {
        let mut sends = Sends::default();
        let (_, _held) = begin(&mut sends, "held", false);
        for frame in [
            sent("unknown", 1),
            sent("held", 2), // not written yet: cannot be its answer
            ServerFrame::error(ErrorCode::Internal, "no id"),
            ServerFrame::Pong,
        ] {
            assert_eq!(sends.answer(frame.clone()), Some(frame));
        }
        assert_eq!(sends.len(), 1);
    }

    #[test]
    fn an_id_in_flight_is_refused() {
        let mut sends = Sends::default();
        let (_, _first) = begin(&mut sends, "x", true);
        let (frame, mut second) = begin(&mut sends, "x", false);
        assert_eq!(frame, None);
        assert!(matches!(second.try_recv(), Ok(Err(SendError::IdInFlight))));
        assert_eq!(sends.len(), 1);
    }

    #[test]
    fn a_retry_replaces_a_send_whose_caller_gave_up() {
        let mut sends = Sends::default();
        let (_, first) = begin(&mut sends, "x", true);
        drop(first); // timed out
        let (frame, mut retry) = begin(&mut sends, "x", true);
        assert_eq!(frame, Some(Message::text("x")));
        assert_eq!(sends.answer(sent("x", 6)), None);
        assert_eq!(retry.try_recv().unwrap().unwrap().seq, 6);
    }

    #[test]
    fn held_sends_go_out_in_order_and_abandoned_ones_are_skipped() {
        let mut sends = Sends::default();
        let (_, _one) = begin(&mut sends, "1", false);
        let (_, two) = begin(&mut sends, "2", false);
        let (_, _three) = begin(&mut sends, "3", false);
        drop(two); // its caller timed out
        assert_eq!(sends.next_held(), Some(Message::text("1")));
        assert_eq!(sends.next_held(), Some(Message::text("3")));
        assert_eq!(sends.next_held(), None);
        assert_eq!(sends.len(), 2);
        assert_eq!(
            sends.answer(sent("3", 1)),
            None,
            "written now, so answerable"
        );
    }

    #[test]
    fn a_lost_connection_fails_written_sends_and_keeps_held_ones() {
        let mut sends = Sends::default();
        let (_, mut written) = begin(&mut sends, "w", true);
        let (_, mut held) = begin(&mut sends, "h", false);
        sends.connection_lost(Some(1011));
        assert!(matches!(
            written.try_recv(),
            Ok(Err(SendError::Disconnected {
                close_code: Some(1011)
            }))
        ));
        assert!(held.try_recv().is_err(), "still waiting");
        sends.stop(None);
        assert!(matches!(held.try_recv(), Ok(Err(SendError::Stopped))));
        assert_eq!(sends.len(), 0);
    }
}
