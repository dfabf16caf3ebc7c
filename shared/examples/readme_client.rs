use ferry_shared::client::{Client, ClientConfig, Event, TokenSource};
use std::sync::Arc;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Called before every connection and again before each token expires (Err: why not).
    let tokens: TokenSource = Arc::new(|| Box::pin(async { token_from_backend("bob").await }));
    let (last_seq, epoch) = load_position(); // what you saved last time; (0, None) the first time
    let config = ClientConfig {
        token_source: Some(tokens),
        device: Some("bob-laptop".into()), // its own position in the inbox: keep it stable
        last_seq,
        epoch,
        ..ClientConfig::new("ws://127.0.0.1:8080/v1/ws", "") // the token comes from token_source
    };
    let (client, mut events) = Client::connect(config).await?;

    // Your own id: every retry (the client's, or yours within the dedupe window) stores it once.
    let sent = client.send("alice", "bob-1", "hello alice").await?;
    println!("stored as seq {} (duplicate: {})", sent.seq, sent.duplicate);

    while let Some(event) = events.recv().await {
        match event {
            Event::Message(m) => {
                handle(&m.from, &m.id, &m.body); // also m.seq, m.ts (ms)
                save_position(client.position()); // (last_seq, epoch)
            }
            Event::Reset { .. } => resync_from_backend(), // the inbox's epoch changed
            Event::Gap { from, to } => resync_range_from_backend(from, to), // will never come
            _ => {} // Welcome, Error, Reconnect, Disconnected, ConnectFailed
        }
    }
    Ok(())
}

// What the README leaves to the app (shared/tests/readme.rs checks that everything above this
// line is the README's example as it stands).

async fn token_from_backend(_user: &str) -> Result<String, String> {
    Ok(String::new())
}
fn load_position() -> (u64, Option<String>) {
    (0, None)
}
fn save_position<T>(_position: T) {}
fn handle<A, B, C>(_a: A, _b: B, _c: C) {}
fn resync_from_backend() {}
fn resync_range_from_backend(_from: u64, _to: u64) {}
