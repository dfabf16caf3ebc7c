//! Handing events to the application, and what that moves: the resume point (what the
//! application has) and the acks (which may only cover what it has). Events go through a bounded
//! channel; while it is full a few wait here, and past `QUEUE_MAX` the driver stops reading.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TrySendError;
use tokio::time::Instant;

use super::events::Event;
use super::state::{Acks, Position};

/// Events held here when the channel is full, before the driver stops reading the socket.
pub(crate) const QUEUE_MAX: usize = 16;

/// State the handles read without asking the driver.
#[derive(Debug, Default)]
pub(crate) struct Shared {
    /// The resume point: what the application has been handed.
    pub(crate) position: Mutex<Position>,
}

impl Shared {
    pub(crate) fn position(&self) -> std::sync::MutexGuard<'_, Position> {
        self.position.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// An event waiting for room, with the connection it came from.
struct Queued {
    event: Event,
    conn: u64,
}

/// What handing over an event changes.
enum Effect {
    None,
    Message(u64),
    /// A `gap` up to this seq: the position moves as if it had been delivered.
    Gap(u64),
    Welcome {
        epoch: String,
        reset: bool,
        resumed_from: u64,
        conn: u64,
    },
}

impl Effect {
    fn of(event: &Event, conn: u64) -> Effect {
        match event {
            Event::Message(m) => Effect::Message(m.seq),
            Event::Gap { to, .. } => Effect::Gap(*to),
            Event::Welcome(w) => Effect::Welcome {
                epoch: w.epoch.clone(),
                reset: w.reset,
                resumed_from: w.resumed_from,
                conn,
            },
            _ => Effect::None,
        }
    }
}

/// The application side of a client.
pub(crate) struct Delivery {
    events: mpsc::Sender<Event>,
    /// False once the application dropped its `Events`.
    open: bool,
    queue: VecDeque<Queued>,
    shared: Arc<Shared>,
    /// The resume point; mirrored into `shared`.
    delivered: Position,
    /// The connection whose `welcome` the application saw last: acks go only to it.
    delivered_conn: u64,
    acks: Acks,
}

impl Delivery {
    pub(crate) fn new(events: mpsc::Sender<Event>, shared: Arc<Shared>, acks: Acks) -> Self {
        let delivered = shared.position().clone();
        Delivery {
            events,
            open: true,
            queue: VecDeque::new(),
            shared,
            delivered,
            delivered_conn: 0,
            acks,
        }
    }

    /// The resume point for the next `hello`.
    pub(crate) fn position(&self) -> &Position {
        &self.delivered
    }

    /// Whether the driver should stop reading until the application catches up.
    pub(crate) fn backed_up(&self) -> bool {
        self.queue.len() >= QUEUE_MAX
    }

    /// Whether events wait for room in the channel.
    pub(crate) fn has_queued(&self) -> bool {
        !self.queue.is_empty()
    }

    /// Resolves when the channel has room or is closed. Holds no permit: the driver is the
    /// only sender, so the room is still there for [`Delivery::drain`].
    pub(crate) async fn room(&self) {
        let _ = self.events.reserve().await;
    }

    /// Hands an event from connection `conn` to the application, or queues it.
    pub(crate) fn push(&mut self, event: Event, conn: u64) {
        if !self.open {
            self.lost(Effect::of(&event, conn));
        } else if self.queue.is_empty() {
            self.send(Queued { event, conn });
        } else {
            self.queue.push_back(Queued { event, conn });
        }
    }

    /// Moves queued events into the channel while it has room.
    pub(crate) fn drain(&mut self) {
        while self.open
            && let Some(queued) = self.queue.pop_front()
        {
            if !self.send(queued) {
                return;
            }
        }
    }

    /// Tries one event; `false` (and it is queued first again) if the channel is full.
    fn send(&mut self, Queued { event, conn }: Queued) -> bool {
        let effect = Effect::of(&event, conn);
        match self.events.try_send(event) {
            Ok(()) => self.apply(effect),
            Err(TrySendError::Full(event)) => {
                self.queue.push_front(Queued { event, conn });
                return false;
            }
            Err(TrySendError::Closed(_)) => {
                // The application dropped its `Events`: nothing more is delivered, so nothing
                // more is acknowledged, but the position still follows epoch changes.
                self.open = false;
                self.lost(effect);
                while let Some(Queued { event, conn }) = self.queue.pop_front() {
                    self.lost(Effect::of(&event, conn));
                }
            }
        }
        true
    }

    /// Hands over what is queued, waiting for the application; for a stopping client.
    pub(crate) async fn flush(&mut self) {
        while let Some(Queued { event, conn }) = self.queue.pop_front() {
            let effect = Effect::of(&event, conn);
            if self.events.send(event).await.is_err() {
                return;
            }
            self.apply(effect);
        }
    }

    /// The cumulative ack to send on connection `conn` now, if one is pending and the
    /// application has seen that connection's `welcome`.
    pub(crate) fn take_ack(&mut self, conn: u64) -> Option<u64> {
        if self.delivered_conn != conn {
            self.acks.defer(); // `Welcome` delivery restarts the acks for the new connection
            return None;
        }
        self.acks.take()
    }

    /// When the next ack is due.
    pub(crate) fn ack_due_at(&self) -> Option<Instant> {
        self.acks.due_at()
    }

    /// An event the application will never see: only a `welcome`'s epoch still counts.
    fn lost(&mut self, effect: Effect) {
        if let Effect::Welcome { .. } = effect {
            self.apply(effect);
        }
    }

    fn apply(&mut self, effect: Effect) {
        match effect {
            Effect::None => {}
            // A gap is acknowledged like a delivery, so the server need not announce it again.
            Effect::Message(seq) | Effect::Gap(seq) => {
                self.delivered.last_seq = self.delivered.last_seq.max(seq);
                self.shared.position().last_seq = self.delivered.last_seq;
                self.acks.delivered(seq, Instant::now());
            }
            Effect::Welcome {
                epoch,
                reset,
                resumed_from,
                conn,
            } => {
                // Delivery resumes after `resumed_from`: a reset starts over from it, and one
                // further than what was delivered (the server kept the device further, or
                // skipped to past a `gap` that follows) is where the position goes, so acks
                // never go below it. That jump is acknowledged once, so the server's record of
                // the device catches up and a gap is not announced again.
                let (acked, delivered) = if reset {
                    (0, resumed_from)
                } else {
                    let had = self.delivered.last_seq;
                    (had.min(resumed_from), had.max(resumed_from))
                };
                self.delivered.last_seq = delivered;
                self.delivered.epoch = Some(epoch);
                *self.shared.position() = self.delivered.clone();
                self.delivered_conn = conn;
                self.acks.restart(acked, delivered, Instant::now());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use bytes::Bytes;

    use super::*;
    use crate::client::events::{Delivered, Welcome};

    fn delivery(capacity: usize, position: Position) -> (Delivery, mpsc::Receiver<Event>) {
        let (tx, rx) = mpsc::channel(capacity);
        let shared = Arc::new(Shared {
            position: Mutex::new(position),
        });
        (Delivery::new(tx, shared, Acks::new(Duration::ZERO)), rx)
    }

    fn welcome(epoch: &str, reset: bool, resumed_from: u64) -> Event {
        Event::Welcome(Welcome {
            user: "alice".into(),
            device: Some("default".into()),
            node: "gw".into(),
            epoch: epoch.into(),
            head: 0,
            reset,
            heartbeat_ms: 0,
            resumed_from,
            expires_at: None,
        })
    }

    fn message(seq: u64) -> Event {
        Event::Message(Delivered {
            seq,
            from: "bob".into(),
            id: seq.to_string(),
            ts: 0,
            body: Bytes::new(),
        })
    }

    #[test]
    fn the_position_moves_only_when_the_application_gets_the_event() {
        let (mut d, mut rx) = delivery(2, Position::default());
        d.push(welcome("e1", false, 0), 1);
        d.push(message(1), 1);
        d.push(message(2), 1);
        assert!(d.has_queued(), "channel of 2 is full");
        assert_eq!(*d.shared.position(), d.delivered);
        assert_eq!(d.position().last_seq, 1);
        assert_eq!(d.take_ack(1), Some(1), "only what was handed over is acked");
        assert!(matches!(rx.try_recv(), Ok(Event::Welcome(_))));
        d.drain();
        assert!(!d.has_queued());
        assert_eq!(d.position().last_seq, 2);
        assert_eq!(d.shared.position().epoch.as_deref(), Some("e1"));
        assert_eq!(d.take_ack(1), Some(2));
        assert_eq!(d.take_ack(1), None);
    }

    #[test]
    fn acks_never_cross_connections() {
        let (mut d, mut rx) = delivery(1, Position::default());
        d.push(welcome("e1", false, 0), 1);
        rx.try_recv().unwrap();
        d.push(message(5), 1);
        // Connection 2 opened while message 5 was being handed over: its welcome is queued.
        d.push(welcome("e2", true, 0), 2);
        assert_eq!(d.take_ack(2), None, "5 belongs to connection 1's epoch");
        rx.try_recv().unwrap();
        d.drain();
        assert_eq!(
            d.position(),
            &Position {
                last_seq: 0,
                epoch: Some("e2".into())
            }
        );
        d.push(message(1), 2);
        assert_eq!(d.take_ack(2), None, "the channel is full");
        rx.try_recv().unwrap();
        d.drain();
        assert_eq!(d.take_ack(2), Some(1));
    }

    #[test]
    fn a_dropped_receiver_stops_delivery_but_follows_epochs() {
        let start = Position {
            last_seq: 3,
            epoch: Some("e1".into()),
        };
        let (mut d, rx) = delivery(4, start);
        drop(rx);
        d.push(message(4), 1);
        assert_eq!(d.position().last_seq, 3, "not delivered, not acknowledged");
        d.push(welcome("e2", true, 0), 2);
        assert_eq!(
            d.position(),
            &Position {
                last_seq: 0,
                epoch: Some("e2".into())
            }
        );
        assert_eq!(d.take_ack(2), None);
    }

    #[test]
    fn a_gap_moves_the_position_and_is_acknowledged_once_handed_over() {
        let (mut d, mut rx) = delivery(2, Position::default());
        d.push(welcome("e1", false, 0), 1);
        d.push(message(1), 1);
        d.push(Event::Gap { from: 2, to: 6 }, 1);
        assert_eq!(d.position().last_seq, 1, "the gap waits for room");
        assert_eq!(d.take_ack(1), Some(1));
        rx.try_recv().unwrap();
        d.drain();
        assert_eq!(d.position().last_seq, 6);
        assert_eq!(d.shared.position().last_seq, 6);
        assert_eq!(d.take_ack(1), Some(6));
        drop(rx);
        d.push(Event::Gap { from: 7, to: 9 }, 1);
        assert_eq!(d.position().last_seq, 6, "a gap nobody saw moves nothing");
    }

    #[test]
    fn a_resume_point_above_the_position_moves_it_there() {
        let start = Position {
            last_seq: 3,
            epoch: Some("e1".into()),
        };
        let (mut d, _rx) = delivery(4, start);
        d.push(welcome("e1", false, 9), 1);
        assert_eq!(d.position().last_seq, 9);
        assert_eq!(d.shared.position().last_seq, 9);
        assert_eq!(d.take_ack(1), Some(9), "the device's record catches up");
        d.push(message(10), 1);
        assert_eq!(d.take_ack(1), Some(10));
        d.push(welcome("e1", false, 10), 2);
        assert_eq!(d.take_ack(2), None, "the hello acknowledged 10");
    }

    #[test]
    fn backed_up_after_queue_max() {
        let (mut d, _rx) = delivery(1, Position::default());
        for seq in 0..=QUEUE_MAX as u64 {
            assert!(!d.backed_up());
            d.push(message(seq + 1), 1);
        }
        assert!(d.backed_up());
    }
}
