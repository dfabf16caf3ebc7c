//! The recipient policy an append enforces for its sender (issue 13, M1 and H4): a sender holds
//! at most its share of an inbox, so that no single sender fills a victim's inbox alone, and an
//! append may require a known recipient (one with a device record), so that a sender cannot
//! store into inboxes nobody reads. On every engine.

#[macro_use]
mod common;

use common::*;
use ferry_router::{AppendOutcome, EngineOptions, NewMessage, SenderChecks};

fn ten_max() -> EngineOptions {
    EngineOptions {
        max_inbox: 10,
        ..options()
    }
}

/// A message from `from` to `to` under `checks`.
fn checked(from: &str, to: &str, id: &str, checks: SenderChecks) -> NewMessage {
    NewMessage {
        checks,
        ..message(from, to, id, b"x")
    }
}

const SHARE_OF_FOUR: SenderChecks = SenderChecks {
    known_recipient: false,
    max_share: 4,
};

const KNOWN: SenderChecks = SenderChecks {
    known_recipient: true,
    max_share: 0,
};

on_both_engines!(
    a_sender_holds_at_most_its_share,
    ten_max(),
    |engine| async move {
        let send = |from: &'static str, id: String| {
            let engine = engine.clone();
            async move {
                engine
                    .append(&checked(from, "bob", &id, SHARE_OF_FOUR))
                    .await
                    .unwrap()
            }
        };
        // Shares are counted once the inbox holds a quarter of one (here, one message).
        stored(&*engine, &message("alice", "bob", "a0", b"x")).await;
        for i in 1..=4 {
            assert_eq!(
                send("mallory", format!("m{i}")).await,
                AppendOutcome::Stored { seq: i + 1 }
            );
        }
        assert_eq!(send("mallory", "m5".into()).await, AppendOutcome::ShareFull);
        // Nothing was written, and a duplicate of what was stored is still answered.
        assert_eq!(inbox_state(&*engine, "bob").await.head, 5);
        assert_eq!(
            send("mallory", "m2".into()).await,
            AppendOutcome::Duplicate { seq: 3 }
        );
        // Others still have room: the inbox is not full.
        for i in 1..=3 {
            assert!(matches!(
                send("alice", format!("a{i}")).await,
                AppendOutcome::Stored { .. }
            ));
        }
        // Messages without checks (the server API) do not count against a share either way.
        stored(&*engine, &message("mallory", "bob", "api-1", b"x")).await;
        assert_eq!(send("mallory", "m5".into()).await, AppendOutcome::ShareFull);
        // Once bob acknowledges up to seq 3 (alice's first, mallory's first two), mallory has room
        // for two more.
        trim(&*engine, "bob", 3).await;
        assert!(matches!(
            send("mallory", "m5".into()).await,
            AppendOutcome::Stored { .. }
        ));
        assert!(matches!(
            send("mallory", "m6".into()).await,
            AppendOutcome::Stored { .. }
        ));
        assert_eq!(send("mallory", "m7".into()).await, AppendOutcome::ShareFull);
    }
);

// What a sender stored before the inbox held a quarter of a share is not counted: it holds at
// most a share and a quarter (so an inbox that is read costs nothing to count).
on_both_engines!(
    a_share_counts_from_a_quarter_full_inbox,
    ten_max(),
    |engine| async move {
        for i in 1..=5 {
            let outcome = engine
                .append(&checked("mallory", "bob", &format!("m{i}"), SHARE_OF_FOUR))
                .await
                .unwrap();
            assert_eq!(outcome, AppendOutcome::Stored { seq: i });
        }
        let sixth = engine
            .append(&checked("mallory", "bob", "m6", SHARE_OF_FOUR))
            .await
            .unwrap();
        assert_eq!(sixth, AppendOutcome::ShareFull);
    }
);

// Messages made room for at `max_inbox` leave the sender's share too.
on_both_engines!(
    room_made_at_the_bound_leaves_the_share,
    ten_max(),
    |engine| async move {
        // The laptop lags at 0; the phone acknowledges everything: the oldest make room.
        let (phone, laptop) = (device("phone"), device("laptop"));
        open_as(&*engine, "bob", &laptop).await;
        open_as(&*engine, "bob", &phone).await;
        fill(&*engine, "bob", "a", 1).await;
        for i in 1..=4 {
            let outcome = engine
                .append(&checked("mallory", "bob", &format!("m{i}"), SHARE_OF_FOUR))
                .await
                .unwrap();
            assert_eq!(outcome, AppendOutcome::Stored { seq: i + 1 });
        }
        fill(&*engine, "bob", "b", 5).await;
        ack_as(&*engine, "bob", &phone, 10).await;
        assert_eq!(
            engine
                .append(&checked("mallory", "bob", "m5", SHARE_OF_FOUR))
                .await
                .unwrap(),
            AppendOutcome::ShareFull
        );
        // Four more from carol push out alice's first and mallory's first three.
        fill(&*engine, "bob", "c", 4).await;
        let info = engine
            .inbox_info(&user("bob"))
            .await
            .unwrap()
            .expect("an inbox");
        assert_eq!(info.floor, 4);
        assert!(matches!(
            engine
                .append(&checked("mallory", "bob", "m5", SHARE_OF_FOUR))
                .await
                .unwrap(),
            AppendOutcome::Stored { .. }
        ));
    }
);

// An erased inbox starts every sender's share afresh (the seq counter is kept).
on_both_engines!(
    erasure_empties_every_share,
    ten_max(),
    |engine| async move {
        let send = |id: String| {
            let engine = engine.clone();
            async move {
                engine
                    .append(&checked("mallory", "bob", &id, SHARE_OF_FOUR))
                    .await
                    .unwrap()
            }
        };
        fill(&*engine, "bob", "a", 1).await;
        for i in 1..=4 {
            send(format!("m{i}")).await;
        }
        assert_eq!(send("m5".into()).await, AppendOutcome::ShareFull);
        assert!(engine.delete_inbox(&user("bob")).await.unwrap());
        fill(&*engine, "bob", "b", 1).await;
        for i in 5..=8 {
            assert_eq!(
                send(format!("m{i}")).await,
                AppendOutcome::Stored { seq: i + 2 }
            );
        }
    }
);

on_both_engines!(
    a_known_recipient_can_be_required,
    options(),
    |engine| async move {
        let send = |id: &'static str| {
            let engine = engine.clone();
            async move {
                engine
                    .append(&checked("alice", "bob", id, KNOWN))
                    .await
                    .unwrap()
            }
        };
        assert_eq!(send("m1").await, AppendOutcome::UnknownRecipient);
        // Nothing was written: bob's inbox does not exist.
        assert_eq!(engine.inbox_info(&user("bob")).await.unwrap(), None);
        // Without the check, anyone may be sent to; that alone does not make bob known.
        stored(&*engine, &message("alice", "bob", "api-1", b"x")).await;
        assert_eq!(send("m2").await, AppendOutcome::UnknownRecipient);
        // Once bob has connected (a device record), he is known.
        open(&*engine, "bob").await;
        assert_eq!(send("m3").await, AppendOutcome::Stored { seq: 2 });
        // Erased, he is unknown again until he connects.
        assert!(engine.delete_inbox(&user("bob")).await.unwrap());
        assert_eq!(send("m4").await, AppendOutcome::UnknownRecipient);
    }
);
