//! The store half of the `Engine` contract, on both engines: seq allocation, dedupe, capacity,
//! paged reads, trims and epochs.

#[macro_use]
mod common;

use common::*;
use ferry_router::{AppendOutcome, Checked, EngineOptions, InboxState};

on_both_engines!(
    append_allocates_consecutive_seqs,
    options(),
    |engine| async move {
        assert_eq!(
            stored(&*engine, &message("alice", "bob", "a-1", b"one")).await,
            1
        );
        assert_eq!(
            stored(&*engine, &message("carol", "bob", "c-1", b"two")).await,
            2
        );
        let binary = [0u8, 0xff, b':', 0x80];
        assert_eq!(
            stored(&*engine, &message("alice", "bob", "a-2", &binary)).await,
            3
        );
        // Seqs are per inbox.
        assert_eq!(
            stored(&*engine, &message("alice", "carol", "a-1", b"x")).await,
            1
        );

        let inbox = read(&*engine, "bob", 0, 10).await;
        assert_eq!(seqs(&inbox), [1, 2, 3]);
        assert_eq!(inbox[1].from, user("carol"));
        assert_eq!(inbox[1].id.as_str(), "c-1");
        assert_eq!(inbox[1].ts, 1_764_086_400_000);
        assert_eq!(&inbox[1].body[..], b"two");
        assert_eq!(&inbox[2].body[..], &binary);
    }
);

on_both_engines!(
    dedupe_returns_the_original_seq_and_writes_nothing,
    options(),
    |engine| async move {
        assert_eq!(
            stored(&*engine, &message("alice", "bob", "m-1", b"first")).await,
            1
        );
        let again = engine
            .append(&message("alice", "bob", "m-1", b"retry"))
            .await
            .unwrap();
        assert_eq!(again, AppendOutcome::Duplicate { seq: 1 });
        let inbox = read(&*engine, "bob", 0, 10).await;
        assert_eq!(seqs(&inbox), [1]);
        assert_eq!(&inbox[0].body[..], b"first");
        assert_eq!(inbox_state(&*engine, "bob").await.head, 1);
        // The same id from another sender, or to another recipient, is another message.
        assert_eq!(
            stored(&*engine, &message("carol", "bob", "m-1", b"x")).await,
            2
        );
        assert_eq!(
            stored(&*engine, &message("alice", "dave", "m-1", b"x")).await,
            1
        );
        // Still a duplicate after the inbox was acknowledged: the dedupe window is independent.
        trim(&*engine, "bob", 2).await;
        let late = engine
            .append(&message("alice", "bob", "m-1", b"late"))
            .await
            .unwrap();
        assert_eq!(late, AppendOutcome::Duplicate { seq: 1 });
    }
);

fn three_max() -> EngineOptions {
    EngineOptions {
        max_inbox: 3,
        ..options()
    }
}

on_both_engines!(inbox_full_until_trimmed, three_max(), |engine| async move {
    assert_eq!(fill(&*engine, "bob", "m", 3).await, [1, 2, 3]);
    let full = engine
        .append(&message("alice", "bob", "x-1", b"x"))
        .await
        .unwrap();
    assert_eq!(full, AppendOutcome::InboxFull);
    // Nothing was written: no seq, no dedupe entry.
    assert_eq!(inbox_state(&*engine, "bob").await.head, 3);
    assert_eq!(seqs(&read(&*engine, "bob", 0, 10).await), [1, 2, 3]);
    trim(&*engine, "bob", 1).await;
    assert_eq!(
        stored(&*engine, &message("alice", "bob", "x-1", b"x")).await,
        4
    );
    let full = engine
        .append(&message("alice", "bob", "x-2", b"x"))
        .await
        .unwrap();
    assert_eq!(full, AppendOutcome::InboxFull);
    // A duplicate is answered even when the inbox is full.
    let dup = engine
        .append(&message("alice", "bob", "x-1", b"x"))
        .await
        .unwrap();
    assert_eq!(dup, AppendOutcome::Duplicate { seq: 4 });
});

on_both_engines!(read_after_pages_by_seq, options(), |engine| async move {
    fill(&*engine, "bob", "m", 10).await;
    assert_eq!(seqs(&read(&*engine, "bob", 0, 3).await), [1, 2, 3]);
    assert_eq!(seqs(&read(&*engine, "bob", 3, 3).await), [4, 5, 6]);
    assert_eq!(seqs(&read(&*engine, "bob", 8, 5).await), [9, 10]);
    assert!(read(&*engine, "bob", 10, 5).await.is_empty());
    assert!(read(&*engine, "bob", 0, 0).await.is_empty());
    // Paging continues past trimmed messages by seq, not by position.
    trim(&*engine, "bob", 4).await;
    assert_eq!(seqs(&read(&*engine, "bob", 2, 3).await), [5, 6, 7]);
    let mut after = 0;
    let mut all = Vec::new();
    loop {
        let page = read(&*engine, "bob", after, 4).await;
        let Some(last) = page.last() else { break };
        after = last.seq;
        all.extend(seqs(&page));
    }
    assert_eq!(all, [5, 6, 7, 8, 9, 10]);
});

on_both_engines!(
    trim_removes_up_to_and_keeps_the_head,
    options(),
    |engine| async move {
        fill(&*engine, "bob", "m", 5).await;
        let bob = user("bob");
        trim(&*engine, "bob", 0).await;
        assert_eq!(seqs(&read(&*engine, "bob", 0, 10).await), [1, 2, 3, 4, 5]);
        trim(&*engine, "bob", 3).await;
        assert_eq!(seqs(&read(&*engine, "bob", 0, 10).await), [4, 5]);
        trim(&*engine, "bob", 3).await;
        trim(&*engine, "bob", u64::MAX).await;
        assert!(read(&*engine, "bob", 5, 10).await.is_empty());
        // An empty inbox keeps its head and epoch; seqs are never reused.
        let state = engine.inbox_state(&bob).await.unwrap().unwrap();
        assert_eq!(state.head, 5);
        assert_eq!(
            stored(&*engine, &message("alice", "bob", "after", b"x")).await,
            6
        );
        assert_eq!(
            engine.inbox_state(&bob).await.unwrap().unwrap().epoch,
            state.epoch
        );
    }
);

on_both_engines!(
    epoch_is_created_once_and_kept,
    options(),
    |engine| async move {
        let bob = user("bob");
        assert_eq!(engine.inbox_state(&bob).await.unwrap(), None);
        // Reads and trims of an inbox without an epoch find their position void, and create
        // nothing.
        let nowhere = at("", 0);
        assert_eq!(
            engine
                .read_after(&bob, &nowhere, 1, usize::MAX)
                .await
                .unwrap(),
            Checked::Void
        );
        assert_eq!(engine.trim(&bob, &nowhere, 1).await.unwrap(), Checked::Void);
        assert_eq!(
            engine.inbox_state(&bob).await.unwrap(),
            None,
            "reads create nothing"
        );

        let opened = open(&*engine, "bob").await;
        assert_eq!(opened.head, 0);
        assert!(!opened.epoch.is_empty() && opened.epoch.len() <= 16);
        assert_eq!(open(&*engine, "bob").await, opened);
        assert_eq!(
            engine.inbox_state(&bob).await.unwrap(),
            Some(opened.clone())
        );
        fill(&*engine, "bob", "m", 2).await;
        let expected = InboxState {
            epoch: opened.epoch.clone(),
            head: 2,
        };
        assert_eq!(
            engine.inbox_state(&bob).await.unwrap(),
            Some(expected.clone())
        );
        assert_eq!(open(&*engine, "bob").await, expected);

        // An inbox first written to gets its epoch then, and keeps it when opened.
        let carol = user("carol");
        fill(&*engine, "carol", "m", 1).await;
        let first = engine.inbox_state(&carol).await.unwrap().unwrap();
        assert_eq!(first.head, 1);
        assert_eq!(open(&*engine, "carol").await, first);
        assert_ne!(first.epoch, opened.epoch, "each inbox has its own epoch");
    }
);

on_both_engines!(ping_and_name, options(), |engine| async move {
    engine.ping().await.unwrap();
    assert!(["redis", "embedded"].contains(&engine.name()));
    let _events = live_events(&*engine);
});

// Redis reads a page in chunks of 16 members: pages across chunk boundaries are whole and in
// order, and stop at the count bound.
on_both_engines!(
    a_page_spans_chunks_in_order,
    options(),
    |engine| async move {
        let all = fill(&*engine, "bob", "m", 40).await;
        assert_eq!(seqs(&read(&*engine, "bob", 0, 37).await), all[..37]);
        assert_eq!(seqs(&read(&*engine, "bob", 0, 100).await), all);
        assert_eq!(seqs(&read(&*engine, "bob", all[15], 16).await), all[16..32]);
        assert_eq!(
            seqs(&read(&*engine, "bob", all[39], 16).await),
            Vec::<u64>::new()
        );
    }
);

on_both_engines!(
    a_read_stops_at_its_byte_bound,
    options(),
    |engine| async move {
        let bob = user("bob");
        for i in 0..5 {
            let body = vec![b'x'; 100];
            stored(&*engine, &message("alice", "bob", &format!("m{i}"), &body)).await;
        }
        let epoch = epoch(&*engine, "bob").await;
        let page = |limit, max_bytes| {
            let engine = engine.clone();
            let (bob, epoch) = (bob.clone(), epoch.clone());
            async move {
                match engine
                    .read_after(&bob, &at(&epoch, 0), limit, max_bytes)
                    .await
                    .unwrap()
                {
                    Checked::Valid(page) => (page.entries.len(), page.cut),
                    Checked::Void => panic!("void"),
                }
            }
        };
        assert_eq!(page(10, usize::MAX).await, (5, false));
        assert_eq!(
            page(3, usize::MAX).await,
            (3, false),
            "the count bound is no cut"
        );
        // Room for two members of about 130 bytes, not three.
        assert_eq!(page(10, 300).await, (2, true));
        // The first member always comes, however small the bound.
        assert_eq!(page(10, 1).await, (1, true));
    }
);
