//! A session lasts as long as its token (PROTOCOL.md, Token lifetime): it ends with
//! `token_expired` and close 1008 when the token expires, unless an `auth` frame brings a fresh
//! one; a bad `auth` changes nothing, one for another user ends the session; and the Rust client
//! with a token source keeps its session across expiries. Tokens expire after a second or two;
//! the server adds its 5 s leeway.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::*;
use ferry_shared::client::{ClientConfig, Event, TokenSource};
use ferry_shared::{ClientFrame, ErrorCode, ServerFrame};

/// The server's leeway on `exp` (auth.rs `LEEWAY_SECS`).
const LEEWAY: Duration = Duration::from_secs(5);

fn expires_at(welcome: &ServerFrame) -> u64 {
    match welcome {
        ServerFrame::Welcome {
            expires_at: Some(at),
            ..
        } => *at,
        other => panic!("a welcome with expires_at, got {other:?}"),
    }
}

both_engines! {
    // The session ends when its token expires: `token_expired`, then 1008.
    async fn an_expired_token_ends_the_session(kind: EngineKind) {
        let gw = TestGateway::start(kind).await;
        let (mut bob, welcome) = gw.raw_hello(gw.token_for("bob", Duration::from_secs(1)), 0, None).await;
        let now = jsonwebtoken_now();
        assert!((now..=now + 2).contains(&expires_at(&welcome)));
        // Alive before the expiry (plus leeway)...
        ping_pong(&mut bob).await;
        // ...and ended after it, whatever the client does.
        let (message, _, _) = expect_error(&mut bob, ErrorCode::TokenExpired).await;
        assert!(message.contains("auth"), "{message}");
        expect_closed(&mut bob, 1008).await;
    }

    // A fresh token in `auth` moves the end: the session outlives the first token.
    async fn auth_with_a_fresh_token_extends_the_session(kind: EngineKind) {
        let gw = TestGateway::start(kind).await;
        let (mut bob, _) = gw.raw_hello(gw.token_for("bob", Duration::from_secs(1)), 0, None).await;
        let fresh = gw.token_for("bob", Duration::from_secs(600));
        bob.send_frame(&ClientFrame::Auth { token: fresh }).await.expect("auth");
        match next_frame(&mut bob).await {
            ServerFrame::Authed { expires_at } => {
                assert!(expires_at >= jsonwebtoken_now() + 590);
            }
            other => panic!("expected authed, got {other:?}"),
        }
        tokio::time::sleep(Duration::from_secs(1) + LEEWAY + Duration::from_millis(500)).await;
        ping_pong(&mut bob).await;
        let (mut alice, _) = gw.raw("alice").await;
        raw_send(&mut alice, "m1", "bob", "still here").await;
        assert_eq!(raw_messages(&mut bob, 1).await, [(1, "m1".to_string())]);
    }

    // A token that does not verify is refused and changes nothing; one for another user ends
    // the session.
    async fn a_bad_auth_is_refused_and_another_users_ends_the_session(kind: EngineKind) {
        let gw = TestGateway::start(kind).await;
        let (mut bob, _) = gw.raw("bob").await;
        bob.send_frame(&ClientFrame::Auth { token: "not.a.jwt".into() })
            .await
            .expect("auth");
        expect_error(&mut bob, ErrorCode::Unauthorized).await;
        ping_pong(&mut bob).await;
        let expired = gw.token_for("bob", Duration::ZERO);
        tokio::time::sleep(LEEWAY + Duration::from_secs(1)).await;
        bob.send_frame(&ClientFrame::Auth { token: expired }).await.expect("auth");
        expect_error(&mut bob, ErrorCode::Unauthorized).await;
        ping_pong(&mut bob).await;
        // A 512 KiB token: refused, and the answer does not echo it.
        let huge = "x".repeat(512 * 1024);
        bob.send_frame(&ClientFrame::Auth { token: huge }).await.expect("auth");
        let (message, _, _) = expect_error(&mut bob, ErrorCode::Unauthorized).await;
        assert!(message.len() < 200, "a short reason: {} bytes", message.len());
        ping_pong(&mut bob).await;
        let carol = gw.token("carol");
        bob.send_frame(&ClientFrame::Auth { token: carol }).await.expect("auth");
        expect_error(&mut bob, ErrorCode::Unauthorized).await;
        expect_closed(&mut bob, 1008).await;
    }

    // The Rust client with a token source sends fresh tokens before each expires: one session,
    // no reconnect, across several token lifetimes.
    async fn the_client_refreshes_its_token_before_it_expires(kind: EngineKind) {
        let gw = Arc::new(TestGateway::start(kind).await);
        let fetched = Arc::new(AtomicUsize::new(0));
        let source: TokenSource = {
            let (gw, fetched) = (Arc::clone(&gw), Arc::clone(&fetched));
            Arc::new(move || {
                fetched.fetch_add(1, Ordering::Relaxed);
                let token = gw.token_for("bob", Duration::from_secs(2));
                Box::pin(async move { Ok(token) })
            })
        };
        let config = ClientConfig {
            token_source: Some(source),
            ..gw.client_config("bob")
        };
        let (bob, mut events) = ferry_shared::client::Client::connect(config)
            .await
            .expect("connects");
        // Three token lifetimes and the leeway: the first token alone would have ended it.
        tokio::time::sleep(Duration::from_secs(2) * 3 + LEEWAY).await;
        let (mut alice, _) = gw.raw("alice").await;
        raw_send(&mut alice, "m1", "bob", "hi").await;
        let mut welcomes = 0;
        loop {
            match tokio::time::timeout(WAIT, events.recv()).await.expect("an event") {
                Some(Event::Welcome(_)) => welcomes += 1,
                Some(Event::Message(m)) => {
                    assert_eq!(m.id, "m1");
                    break;
                }
                Some(Event::Disconnected { close_code, reason }) => {
                    panic!("disconnected ({close_code:?}): {reason}")
                }
                Some(_) => {}
                None => panic!("events ended"),
            }
        }
        assert!(welcomes <= 1, "one session: {welcomes} welcomes after the first");
        assert!(
            fetched.load(Ordering::Relaxed) >= 4,
            "the first token and at least three refreshes: {}",
            fetched.load(Ordering::Relaxed)
        );
        bob.close().await;
    }
}

fn jsonwebtoken_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .as_secs()
}
