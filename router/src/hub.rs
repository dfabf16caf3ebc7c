//! The node-local hub: which sessions of which users are on this node, the node's live
//! subscriptions (the first session of a user subscribes, the last one to leave unsubscribes),
//! and the dispatch that hands live events to sessions without ever waiting for one (called by
//! the engine's live task itself).
//!
//! A session whose live queue is full is not waited for: it is flagged *lagged* and catches up
//! from the store. A `Resync` from the engine flags every session, a `ResyncUsers` the sessions of
//! those users. Either way the inbox is the
//! truth and the live queue only a hint, so nothing is lost and no queue grows without bound.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use ferry_shared::UserId;
use tokio::sync::{Notify, watch};

use crate::engine::{Engine, EngineError, Live, LiveEvent};

/// Hub settings.
#[derive(Debug, Clone)]
pub struct HubOptions {
    /// Live messages queued per session before it is flagged lagged.
    pub session_queue: usize,
}

impl Default for HubOptions {
    fn default() -> Self {
        Self { session_queue: 256 }
    }
}

/// What a session's live feed says next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LiveSignal {
    /// An entry stored in the user's inbox (possibly one the session already has, one past a
    /// gap, or one of another epoch: the session compares it with its position).
    Message(Arc<Live>),
    /// Live messages were lost: read the inbox after what was delivered.
    CatchUp(CatchUpReason),
}

/// Why a session must catch up from the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CatchUpReason {
    /// The session's live queue was full and messages were left out.
    Lagged,
    /// The node's live bus may have lost messages (pub/sub reconnected, or a buffer overflowed).
    Resync,
}

const LAGGED: u8 = 1;
const RESYNC: u8 = 2;

/// The users and sessions on this node.
pub struct Hub {
    engine: Arc<dyn Engine>,
    options: HubOptions,
    state: Mutex<HubState>,
}

struct HubState {
    users: HashMap<UserId, UserSessions>,
    sessions: usize,
    next_session: u64,
}

/// One user's sessions on this node, and the node's subscription for that user.
struct UserSessions {
    sessions: HashMap<u64, SessionHandle>,
    /// `None` while the subscription is being confirmed, then its outcome.
    subscription: watch::Receiver<Option<Result<(), EngineError>>>,
}

/// The hub's side of one session.
struct SessionHandle {
    signal: Arc<Signal>,
}

/// One session's live queue and catch-up flags, filled by the hub's dispatch, with the wake-up
/// that goes with them. The queue is a plain `VecDeque`: it holds no memory while empty, which
/// is what an idle connection's is.
#[derive(Default)]
struct Signal {
    flags: AtomicU8,
    notify: Notify,
    queue: Mutex<VecDeque<Arc<Live>>>,
}

impl Signal {
    fn raise(&self, flag: u8) {
        self.flags.fetch_or(flag, Ordering::SeqCst);
        self.notify.notify_one();
    }

    /// Queues a live message, or raises `LAGGED` when `cap` are queued already.
    fn offer(&self, live: &Arc<Live>, cap: usize) {
        let mut queue = lock(&self.queue);
        if queue.len() >= cap {
            drop(queue);
            self.raise(LAGGED);
            return;
        }
        queue.push_back(Arc::clone(live));
        drop(queue);
        self.notify.notify_one();
    }

    fn pop(&self) -> Option<Arc<Live>> {
        let mut queue = lock(&self.queue);
        let live = queue.pop_front();
        // A queue that grew in a burst gives its memory back once drained.
        if queue.is_empty() && queue.capacity() > 32 {
            *queue = VecDeque::new();
        }
        live
    }

    fn clear(&self) {
        *lock(&self.queue) = VecDeque::new();
    }

    /// Clears the flags and says which catch-up they ask for (a resync covers a lag).
    fn take(&self) -> Option<CatchUpReason> {
        let flags = self.flags.swap(0, Ordering::SeqCst);
        if flags & RESYNC != 0 {
            Some(CatchUpReason::Resync)
        } else if flags & LAGGED != 0 {
            Some(CatchUpReason::Lagged)
        } else {
            None
        }
    }
}

impl Hub {
    /// Creates the hub and makes it the engine's live sink: the engine's own task hands each
    /// live event to the sessions' queues (inside the current Tokio runtime). If another hub
    /// already is the sink, this one receives nothing.
    pub fn new(engine: Arc<dyn Engine>, options: HubOptions) -> Arc<Hub> {
        let hub = Arc::new(Hub {
            engine: Arc::clone(&engine),
            options,
            state: Mutex::new(HubState {
                users: HashMap::new(),
                sessions: 0,
                next_session: 0,
            }),
        });
        let weak = Arc::downgrade(&hub);
        engine.set_live_sink(Arc::new(move |event| {
            if let Some(hub) = weak.upgrade() {
                hub.deliver(event);
            }
        }));
        hub
    }

    /// The engine the hub subscribes through.
    pub fn engine(&self) -> &Arc<dyn Engine> {
        &self.engine
    }

    /// Sessions on this node.
    pub fn sessions(&self) -> usize {
        self.lock().sessions
    }

    /// Users with at least one session on this node.
    pub fn users(&self) -> usize {
        self.lock().users.len()
    }

    /// Registers a session of `user` and returns once the node's live subscription for the user is
    /// confirmed, so every message stored from then on reaches the session live (or as a catch-up).
    /// On failure, or if this future is dropped, the registration is undone.
    pub async fn join(self: &Arc<Self>, user: &UserId) -> Result<Membership, EngineError> {
        let signal = Arc::new(Signal::default());
        let (id, mut subscription) = {
            let mut guard = self.lock();
            let state = &mut *guard;
            let id = state.next_session;
            state.next_session += 1;
            state.sessions += 1;
            let handle = SessionHandle {
                signal: Arc::clone(&signal),
            };
            let subscription = match state.users.get_mut(user) {
                Some(entry) => {
                    entry.sessions.insert(id, handle);
                    // A failed subscription is retried by the next session that joins.
                    if matches!(*entry.subscription.borrow(), Some(Err(_))) {
                        entry.subscription = self.subscribe_locked(user);
                    }
                    entry.subscription.clone()
                }
                None => {
                    let subscription = self.subscribe_locked(user);
                    let entry = UserSessions {
                        sessions: HashMap::from([(id, handle)]),
                        subscription: subscription.clone(),
                    };
                    state.users.insert(user.clone(), entry);
                    subscription
                }
            };
            (id, subscription)
        };
        // From here on, dropping `membership` (an error, or this future dropped) leaves again.
        let membership = Membership {
            hub: Arc::clone(self),
            user: user.clone(),
            id,
            signal,
        };
        let outcome = match subscription.wait_for(Option::is_some).await {
            Ok(outcome) => outcome.clone().unwrap_or(Ok(())),
            Err(_) => Err(EngineError::Internal("the subscription task ended".into())),
        };
        match outcome {
            Ok(()) => Ok(membership),
            Err(e) => {
                tracing::debug!(%user, error = %e, "live subscription failed; join undone");
                Err(e)
            }
        }
    }

    /// Asks the engine to subscribe `user`; called under the hub's lock, so the engine receives
    /// subscribe and unsubscribe requests in the order the hub decided them.
    fn subscribe_locked(&self, user: &UserId) -> watch::Receiver<Option<Result<(), EngineError>>> {
        let (tx, rx) = watch::channel(None);
        let confirmed = self.engine.subscribe(user);
        // Driven by its own task, so a cancelled join cannot strand the sessions waiting on it.
        tokio::spawn(async move {
            let _ = tx.send(Some(confirmed.await));
        });
        rx
    }

    fn leave(&self, user: &UserId, id: u64) {
        let mut guard = self.lock();
        let state = &mut *guard;
        let Some(entry) = state.users.get_mut(user) else {
            return;
        };
        if entry.sessions.remove(&id).is_some() {
            state.sessions -= 1;
        }
        if entry.sessions.is_empty() {
            state.users.remove(user);
            // Queued now, under the lock; the engine applies it even if the future is dropped.
            let done = self.engine.unsubscribe(user);
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                let user = user.clone();
                runtime.spawn(async move {
                    if let Err(e) = done.await {
                        tracing::debug!(%user, error = %e, "live unsubscription not confirmed");
                    }
                });
            }
        }
    }

    fn deliver(&self, event: LiveEvent) {
        let state = self.lock();
        match event {
            LiveEvent::Message { user, live } => {
                let Some(entry) = state.users.get(&user) else {
                    return;
                };
                let cap = self.options.session_queue.max(1);
                for session in entry.sessions.values() {
                    session.signal.offer(&live, cap);
                }
            }
            LiveEvent::Resync => {
                for entry in state.users.values() {
                    for session in entry.sessions.values() {
                        session.signal.raise(RESYNC);
                    }
                }
            }
            LiveEvent::ResyncUsers(users) => {
                for entry in users.iter().filter_map(|user| state.users.get(user)) {
                    for session in entry.sessions.values() {
                        session.signal.raise(RESYNC);
                    }
                }
            }
        }
    }

    fn lock(&self) -> MutexGuard<'_, HubState> {
        lock(&self.state)
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section leaves its state consistent before anything can panic.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// One session's place in the hub; dropping it leaves (the last session of a user on the node
/// unsubscribes the node).
pub struct Membership {
    hub: Arc<Hub>,
    user: UserId,
    id: u64,
    signal: Arc<Signal>,
}

impl Membership {
    pub fn user(&self) -> &UserId {
        &self.user
    }

    /// The next live signal. Catch-up flags come first and are cleared when returned; returning
    /// one also discards the queued live messages, since each of them is already in the store the
    /// catch-up reads.
    ///
    /// Cancel-safe: it can be a branch of `tokio::select!` in a loop; a cancelled call loses
    /// neither a message nor a flag.
    pub async fn next(&mut self) -> LiveSignal {
        let signal = Arc::clone(&self.signal);
        loop {
            let notified = signal.notify.notified();
            let mut notified = std::pin::pin!(notified);
            // Registered before the flags are read, so a flag raised after the read still wakes us.
            notified.as_mut().enable();
            if let Some(reason) = signal.take() {
                signal.clear();
                return LiveSignal::CatchUp(reason);
            }
            if let Some(live) = signal.pop() {
                return LiveSignal::Message(live);
            }
            notified.await;
        }
    }
}

impl std::fmt::Debug for Membership {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Membership")
            .field("user", &self.user)
            .field("session", &self.id)
            .finish()
    }
}

impl Drop for Membership {
    fn drop(&mut self) {
        self.hub.leave(&self.user, self.id);
    }
}
