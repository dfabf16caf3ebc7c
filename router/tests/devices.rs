//! Devices (issue 12): each device of a user has its own acknowledged position; the inbox is
//! trimmed to the lowest position of the devices that hold it; a silent device stops holding, a
//! full inbox makes room past a lagging device, the device cap evicts the device seen longest
//! ago; devices are listed and removed; an inbox's state is read and erased. On every engine.

#[macro_use]
mod common;

use std::time::Duration;

use common::*;
use ferry_router::{AppendOutcome, Checked, DeviceSeen, Engine, EngineOptions, Page, Position};
use ferry_shared::DeviceId;

/// Reads `name`'s inbox after `after` as `device`.
async fn page_as(engine: &dyn Engine, name: &str, device: &DeviceId, after: u64) -> Page {
    let epoch = epoch(engine, name).await;
    let at = Position {
        epoch: &epoch,
        delivered: after,
        stamp: 0,
        device,
    };
    match engine.read_after(&user(name), &at, 100, usize::MAX).await {
        Ok(Checked::Valid(page)) => page,
        other => panic!("read: {other:?}"),
    }
}

fn page_seqs(page: &Page) -> Vec<u64> {
    page.entries.iter().map(|e| e.seq()).collect()
}

on_both_engines!(
    an_ack_of_one_device_keeps_what_another_has_not_acknowledged,
    options(),
    |engine| async move {
        let (phone, laptop) = (device("phone"), device("laptop"));
        open_as(&*engine, "bob", &phone).await;
        open_as(&*engine, "bob", &laptop).await;
        fill(&*engine, "bob", "m", 5).await;
        ack_as(&*engine, "bob", &phone, 5).await;
        let page = page_as(&*engine, "bob", &laptop, 0).await;
        assert_eq!(
            page_seqs(&page),
            [1, 2, 3, 4, 5],
            "the laptop still gets all"
        );
        assert_eq!((page.floor, page.device_acked), (0, 0));
        assert_eq!(page_as(&*engine, "bob", &phone, 0).await.device_acked, 5);
        ack_as(&*engine, "bob", &laptop, 3).await;
        let info = engine.inbox_info(&user("bob")).await.unwrap().unwrap();
        assert_eq!(
            (info.head, info.floor, info.oldest, info.count),
            (5, 3, Some(4), 2)
        );
        // A position never moves back.
        ack_as(&*engine, "bob", &laptop, 1).await;
        let devices = engine.devices(&user("bob")).await.unwrap();
        let acked: Vec<_> = devices
            .iter()
            .map(|d| (d.device.as_str(), d.acked))
            .collect();
        assert_eq!(acked, [("laptop", 3), ("phone", 5)]);
        assert!(devices.iter().all(|d| d.holding && d.last_seen_ms > 0));
    }
);

on_both_engines!(
    a_silent_device_stops_holding_and_keeps_its_position,
    EngineOptions {
        device_ttl: Duration::from_millis(1_500),
        ..options()
    },
    |engine| async move {
        let (phone, laptop) = (device("phone"), device("laptop"));
        open_as(&*engine, "bob", &phone).await;
        open_as(&*engine, "bob", &laptop).await;
        fill(&*engine, "bob", "m", 3).await;
        ack_as(&*engine, "bob", &phone, 1).await;
        assert_eq!(
            page_seqs(&page_as(&*engine, "bob", &laptop, 0).await),
            [1, 2, 3]
        );
        tokio::time::sleep(Duration::from_millis(1_700)).await;
        // The laptop went silent: the phone's ack is no longer held back.
        ack_as(&*engine, "bob", &phone, 3).await;
        let devices = engine.devices(&user("bob")).await.unwrap();
        let holding: Vec<_> = devices
            .iter()
            .map(|d| (d.device.as_str(), d.holding))
            .collect();
        assert_eq!(holding, [("laptop", false), ("phone", true)]);
        let page = page_as(&*engine, "bob", &laptop, 0).await;
        assert_eq!(page_seqs(&page), Vec::<u64>::new());
        assert_eq!(
            (page.floor, page.device_acked),
            (3, 0),
            "the laptop's gap is 1..=3"
        );
        // Back: it is known, at its old position, below the floor.
        let back = open_as(&*engine, "bob", &laptop).await;
        assert_eq!((back.device, back.floor), (DeviceSeen::At(0), 3));
        // A device never seen starts new.
        let tablet = open_as(&*engine, "bob", &device("tablet")).await;
        assert_eq!((tablet.device, tablet.floor), (DeviceSeen::New, 3));
    }
);

on_both_engines!(
    a_full_inbox_makes_room_past_a_lagging_device_only,
    EngineOptions {
        max_inbox: 5,
        ..options()
    },
    |engine| async move {
        let (phone, laptop) = (device("phone"), device("laptop"));
        open_as(&*engine, "bob", &phone).await;
        open_as(&*engine, "bob", &laptop).await;
        fill(&*engine, "bob", "m", 5).await;
        ack_as(&*engine, "bob", &phone, 5).await;
        // The laptop holds 1..=5, the phone nothing: the oldest make room.
        for i in 6..=10 {
            let seq = stored(&*engine, &message("alice", "bob", &format!("n{i}"), b"x")).await;
            assert_eq!(seq, i);
        }
        let info = engine.inbox_info(&user("bob")).await.unwrap().unwrap();
        assert_eq!((info.floor, info.oldest, info.count), (5, Some(6), 5));
        // Now the phone itself has 5 unacknowledged: full.
        let full = engine
            .append(&message("alice", "bob", "n11", b"x"))
            .await
            .unwrap();
        assert_eq!(full, AppendOutcome::InboxFull);
        let page = page_as(&*engine, "bob", &laptop, 0).await;
        assert_eq!((page.floor, page.device_acked), (5, 0));
        assert_eq!(page_seqs(&page), [6, 7, 8, 9, 10]);
    }
);

on_both_engines!(
    a_user_without_devices_is_full_at_max_inbox_as_before,
    EngineOptions {
        max_inbox: 3,
        ..options()
    },
    |engine| async move {
        fill(&*engine, "bob", "m", 3).await;
        let full = engine
            .append(&message("alice", "bob", "m4", b"x"))
            .await
            .unwrap();
        assert_eq!(full, AppendOutcome::InboxFull);
    }
);

on_both_engines!(
    a_full_inbox_whose_devices_all_went_silent_makes_room,
    EngineOptions {
        max_inbox: 3,
        device_ttl: Duration::from_millis(500),
        ..options()
    },
    |engine| async move {
        open_as(&*engine, "bob", &device("laptop")).await;
        fill(&*engine, "bob", "m", 3).await;
        assert_eq!(
            engine
                .append(&message("alice", "bob", "m4", b"x"))
                .await
                .unwrap(),
            AppendOutcome::InboxFull,
            "the laptop holds all three"
        );
        tokio::time::sleep(Duration::from_millis(700)).await;
        assert_eq!(
            stored(&*engine, &message("alice", "bob", "m4", b"x")).await,
            4
        );
        let info = engine.inbox_info(&user("bob")).await.unwrap().unwrap();
        assert_eq!((info.floor, info.oldest, info.count), (1, Some(2), 3));
    }
);

on_both_engines!(
    the_device_cap_evicts_the_device_seen_longest_ago,
    EngineOptions {
        max_devices: 2,
        ..options()
    },
    |engine| async move {
        for name in ["a", "b", "c"] {
            open_as(&*engine, "bob", &device(name)).await;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let names: Vec<_> = engine
            .devices(&user("bob"))
            .await
            .unwrap()
            .into_iter()
            .map(|d| d.device)
            .collect();
        assert_eq!(names, ["b", "c"]);
        assert_eq!(
            open_as(&*engine, "bob", &device("a")).await.device,
            DeviceSeen::New
        );
        // Back with a position of this epoch below the floor: recorded there, so that its gap
        // is told again until it acknowledges past it.
        let epoch = epoch(&*engine, "bob").await;
        fill(&*engine, "bob", "m", 2).await;
        ack_as(&*engine, "bob", &device("a"), 2).await;
        ack_as(&*engine, "bob", &device("c"), 2).await;
        let back = engine
            .open_inbox(&user("bob"), &device("b"), Some((&epoch, 0)))
            .await
            .unwrap();
        assert_eq!((back.device, back.floor), (DeviceSeen::New, 2));
        let again = engine
            .open_inbox(&user("bob"), &device("b"), None)
            .await
            .unwrap();
        assert_eq!(again.device, DeviceSeen::At(0));
    }
);

on_both_engines!(
    a_removed_device_stops_holding_at_once,
    options(),
    |engine| async move {
        let (phone, laptop) = (device("phone"), device("laptop"));
        open_as(&*engine, "bob", &phone).await;
        open_as(&*engine, "bob", &laptop).await;
        fill(&*engine, "bob", "m", 4).await;
        ack_as(&*engine, "bob", &phone, 4).await;
        assert_eq!(
            engine
                .inbox_info(&user("bob"))
                .await
                .unwrap()
                .unwrap()
                .count,
            4
        );
        assert!(engine.remove_device(&user("bob"), &laptop).await.unwrap());
        assert!(!engine.remove_device(&user("bob"), &laptop).await.unwrap());
        let info = engine.inbox_info(&user("bob")).await.unwrap().unwrap();
        assert_eq!((info.floor, info.count, info.oldest), (4, 0, None));
    }
);

on_both_engines!(
    a_deleted_inbox_is_gone_and_its_positions_void,
    options(),
    |engine| async move {
        let phone = device("phone");
        let opened = open_as(&*engine, "bob", &phone).await;
        fill(&*engine, "bob", "m", 2).await;
        assert!(engine.delete_inbox(&user("bob")).await.unwrap());
        assert_eq!(engine.inbox_info(&user("bob")).await.unwrap(), None);
        assert!(engine.devices(&user("bob")).await.unwrap().is_empty());
        assert!(!engine.delete_inbox(&user("bob")).await.unwrap());
        let at = Position {
            epoch: &opened.epoch,
            delivered: 0,
            stamp: 0,
            device: &phone,
        };
        let read = engine.read_after(&user("bob"), &at, 10, usize::MAX).await;
        assert_eq!(read.unwrap(), Checked::Void);
        let again = open_as(&*engine, "bob", &phone).await;
        assert_ne!(again.epoch, opened.epoch);
        // The seq counter outlives the erasure: no seq is given twice, and a send retried within
        // the dedupe window is answered with the seq it got.
        assert_eq!((again.head, again.device), (2, DeviceSeen::New));
        assert_eq!(
            stored(&*engine, &message("alice", "bob", "n1", b"x")).await,
            3
        );
        assert_eq!(
            engine
                .append(&message("alice", "bob", "m-0", b"x"))
                .await
                .unwrap(),
            AppendOutcome::Duplicate { seq: 1 }
        );
    }
);
