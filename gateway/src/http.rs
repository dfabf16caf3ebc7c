//! Just enough HTTP/1.1 for the edge: read one request head (bounded in size and time), answer
//! with a small response, and hand the bytes read past the head to the WebSocket layer.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Largest request head accepted; browsers send well under 4 KiB.
const MAX_HEAD_BYTES: usize = 16 * 1024;
const MAX_HEADERS: usize = 48;

/// A parsed request head. Header names are lower-cased.
#[derive(Debug)]
pub struct Request {
    pub method: String,
    pub path: String,
    pub query: Option<String>,
    pub headers: Vec<(String, String)>,
    /// Bytes that arrived after the head (a client may pipeline its first WebSocket frame).
    pub rest: Bytes,
}

impl Request {
    /// The first header with this (lower-case) name.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// Every comma-separated value of every header with this name.
    pub fn header_values<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.headers
            .iter()
            .filter(move |(n, _)| n == name)
            .flat_map(|(_, v)| v.split(','))
            .map(str::trim)
            .filter(|v| !v.is_empty())
    }

    /// A query parameter, percent-decoded.
    pub fn query_param(&self, name: &str) -> Option<String> {
        self.query.as_deref()?.split('&').find_map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (k == name).then(|| percent_decode(v))
        })
    }
}

/// Why no request could be read.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("connection closed before a request")]
    Closed,
    #[error("request head not received in time")]
    Timeout,
    #[error("request head too large")]
    TooLarge,
    #[error("malformed request: {0}")]
    Malformed(String),
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
}

/// Reads one request head within `timeout`.
pub async fn read_request<S: tokio::io::AsyncRead + Unpin>(
    stream: &mut S,
    timeout: Duration,
) -> Result<Request, HttpError> {
    tokio::time::timeout(timeout, read_head(stream))
        .await
        .map_err(|_| HttpError::Timeout)?
}

async fn read_head<S: tokio::io::AsyncRead + Unpin>(stream: &mut S) -> Result<Request, HttpError> {
    let mut buf = BytesMut::with_capacity(1024);
    loop {
        let before = buf.len();
        if stream.read_buf(&mut buf).await? == 0 {
            return Err(HttpError::Closed);
        }
        // Parsed on the first read (so garbage is refused at once), then only once the blank
        // line that ends a head has arrived, or the bound is reached: a client that sends its
        // head a byte at a time does not make the node parse it again at every byte. Garbage
        // after a well-formed start is refused then, or at the head timeout.
        if before > 0 && buf.len() < MAX_HEAD_BYTES && !ends_a_head(&buf, before) {
            continue;
        }
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(&buf) {
            Ok(httparse::Status::Complete(len)) => {
                let target = req.path.unwrap_or("/");
                let (path, query) = match target.split_once('?') {
                    Some((p, q)) => (p.to_string(), Some(q.to_string())),
                    None => (target.to_string(), None),
                };
                let headers = req
                    .headers
                    .iter()
                    .map(|h| {
                        let value = String::from_utf8_lossy(h.value).into_owned();
                        (h.name.to_ascii_lowercase(), value)
                    })
                    .collect();
                let method = req.method.unwrap_or("").to_string();
                let rest = buf.split_off(len).freeze();
                return Ok(Request {
                    method,
                    path,
                    query,
                    headers,
                    rest,
                });
            }
            Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD_BYTES => continue,
            Ok(httparse::Status::Partial) => return Err(HttpError::TooLarge),
            Err(e) => return Err(HttpError::Malformed(e.to_string())),
        }
    }
}

/// Whether the bytes from `from` on (with the two before them) hold the empty line that ends a
/// head: `\n\n` or `\n\r\n`, as httparse accepts either line ending.
fn ends_a_head(buf: &[u8], from: usize) -> bool {
    buf[from.saturating_sub(2)..]
        .windows(2)
        .enumerate()
        .any(|(i, w)| match w {
            b"\n\n" => true,
            b"\r\n" => {
                let at = from.saturating_sub(2) + i;
                at > 0 && buf[at - 1] == b'\n'
            }
            _ => false,
        })
}

/// Writes a complete response and flushes it. The connection is not reused.
pub async fn respond<S: tokio::io::AsyncWrite + Unpin>(
    stream: &mut S,
    status: u16,
    content_type: &str,
    body: &[u8],
) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status} {}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\n\
         cache-control: no-store\r\nconnection: close\r\n\r\n",
        reason(status),
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body).await?;
    stream.flush().await
}

/// A plain-text response, for errors.
pub async fn respond_text<S: tokio::io::AsyncWrite + Unpin>(
    stream: &mut S,
    status: u16,
    text: &str,
) -> std::io::Result<()> {
    respond(stream, status, "text/plain; charset=utf-8", text.as_bytes()).await
}

fn reason(status: u16) -> &'static str {
    match status {
        101 => "Switching Protocols",
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        426 => "Upgrade Required",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "Status",
    }
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok();
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(b) => {
                        out.push(b);
                        i += 3;
                        continue;
                    }
                    None => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn parses_head_and_keeps_the_rest() {
        let raw = b"GET /v1/ws?token=a%2Eb&x=1 HTTP/1.1\r\nHost: h\r\nSec-WebSocket-Protocol: a, b\r\n\r\n\x82\x00";
        let mut input = &raw[..];
        let req = read_request(&mut input, Duration::from_secs(1))
            .await
            .unwrap();
        assert_eq!(req.method, "GET");
        assert_eq!(req.path, "/v1/ws");
        assert_eq!(req.query_param("token").as_deref(), Some("a.b"));
        assert_eq!(req.query_param("missing"), None);
        assert_eq!(req.header("host"), Some("h"));
        let offered: Vec<_> = req.header_values("sec-websocket-protocol").collect();
        assert_eq!(offered, ["a", "b"]);
        assert_eq!(&req.rest[..], b"\x82\x00");
    }

    #[tokio::test]
    async fn rejects_garbage_and_oversized_heads() {
        let mut garbage = &b"\x00\x01\x02 nonsense\r\n\r\n"[..];
        assert!(matches!(
            read_request(&mut garbage, Duration::from_secs(1)).await,
            Err(HttpError::Malformed(_))
        ));
        let huge = format!("GET / HTTP/1.1\r\nx: {}\r\n", "a".repeat(MAX_HEAD_BYTES));
        let mut input = huge.as_bytes();
        assert!(matches!(
            read_request(&mut input, Duration::from_secs(1)).await,
            Err(HttpError::TooLarge)
        ));
        let mut empty = &b""[..];
        assert!(matches!(
            read_request(&mut empty, Duration::from_secs(1)).await,
            Err(HttpError::Closed)
        ));
    }

    /// Reads one byte per `read`, as a client that sends its head a byte at a time.
    struct Trickle<'a>(&'a [u8]);

    impl tokio::io::AsyncRead for Trickle<'_> {
        fn poll_read(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            out: &mut tokio::io::ReadBuf<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            if let Some((&first, rest)) = self.0.split_first() {
                out.put_slice(&[first]);
                self.0 = rest;
            }
            std::task::Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn a_head_a_byte_at_a_time_is_read_whole() {
        for head in [
            &b"GET /v1/ws?token=t HTTP/1.1\r\nHost: x\r\n\r\nrest"[..],
            b"GET /v1/ws HTTP/1.1\nHost: x\n\nrest",
        ] {
            let req = read_request(&mut Trickle(head), Duration::from_secs(1))
                .await
                .expect("a head");
            assert_eq!(
                (req.path.as_str(), req.header("host")),
                ("/v1/ws", Some("x"))
            );
            // Read a byte at a time, nothing past the head has arrived yet.
            assert!(req.rest.is_empty());
        }
        let mut garbage = Trickle(b"\x00\x01 nonsense");
        assert!(matches!(
            read_request(&mut garbage, Duration::from_secs(1)).await,
            Err(HttpError::Malformed(_))
        ));
    }

    #[test]
    fn the_end_of_a_head_is_found_in_new_bytes() {
        let head = b"GET / HTTP/1.1\r\nx: y\r\n\r\n";
        for from in 0..head.len() {
            assert!(ends_a_head(head, from), "from {from}");
        }
        assert!(!ends_a_head(b"GET / HTTP/1.1\r\nx: y\r\n", 0));
        assert!(ends_a_head(b"GET / HTTP/1.1\nx: y\n\n", 20));
    }

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode("a%20b+c%zz%4"), "a b c%zz%4");
    }
}
