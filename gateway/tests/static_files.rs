//! The JavaScript client and its type declarations are served on the WebSocket listener; the
//! demo page only with `--dev`.

mod common;
use common::*;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// `GET path` on the WebSocket listener: (status, content-type, body).
async fn get(gateway: &TestGateway, path: &str) -> (u16, String, String) {
    let mut stream = TcpStream::connect(gateway.addr).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(WAIT, stream.read_to_end(&mut raw))
        .await
        .expect("response in time")
        .unwrap();
    let text = String::from_utf8(raw).expect("UTF-8 response");
    let (head, body) = text.split_once("\r\n\r\n").expect("a response head");
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    let content_type = head
        .lines()
        .find_map(|line| {
            let (name, value) = line.split_once(':')?;
            name.eq_ignore_ascii_case("content-type")
                .then(|| value.trim().to_string())
        })
        .unwrap_or_default();
    (status, content_type, body.to_string())
}

#[tokio::test]
async fn client_and_declarations_are_served_without_dev() {
    let gateway = TestGateway::start(EngineKind::Embedded).await;
    let (status, content_type, body) = get(&gateway, "/v1/ferry-client.js").await;
    assert_eq!(status, 200);
    assert_eq!(content_type, "text/javascript; charset=utf-8");
    assert!(body.contains("export class FerryClient"), "{body}");
    assert!(body.contains("ferry.v1.json"));

    let (status, content_type, body) = get(&gateway, "/v1/ferry-client.d.ts").await;
    assert_eq!(status, 200);
    assert!(
        content_type.starts_with("application/typescript"),
        "{content_type}"
    );
    assert!(body.contains("export declare class FerryClient"), "{body}");

    for path in ["/", "/demo", "/dev/token?user=alice"] {
        let (status, _, _) = get(&gateway, path).await;
        assert_eq!(status, 404, "{path} without --dev");
    }
    // The WebSocket endpoint is untouched.
    let (mut conn, _welcome) = gateway.raw("alice").await;
    ping_pong(&mut conn).await;
}

#[tokio::test]
async fn demo_page_is_served_with_dev() {
    let gateway = TestGateway::start_with(EngineKind::Embedded, |c| c.dev = true).await;
    for path in ["/", "/demo"] {
        let (status, content_type, body) = get(&gateway, path).await;
        assert_eq!(status, 200, "{path}");
        assert_eq!(content_type, "text/html; charset=utf-8");
        assert!(body.contains("/v1/ferry-client.js"));
        assert!(body.contains("data-role=\"messages\""));
    }
    let (status, _) = http_get(gateway.addr, "/v1/ferry-client.js").await.unwrap();
    assert_eq!(status, 200);
}
