//! The live bus's own pub/sub connections: TCP or TLS to one node, `AUTH` and `SELECT`, then a
//! reader of RESP2 replies.
//!
//! Why not the redis crate's: its async `PubSub` has no sharded subscribe, and both its
//! multiplexed and cluster connections take an unsolicited `sunsubscribe` (which Redis sends when
//! a slot moves away) for the answer to whatever command is pending. A subscribed RESP2
//! connection only ever carries a handful of reply shapes, so reading them here is small, and it
//! lets a message's payload reach the hub without a copy.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use redis::ConnectionInfo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::TcpStream;

use crate::cluster::NodeAddr;

/// Largest bulk string read (a live message is far smaller; Redis's own limit is 512 MB).
const MAX_BULK: usize = 64 << 20;
/// Longest line of a simple reply, error or length.
const MAX_LINE: usize = 64 << 10;
/// Deepest nesting of arrays read (pub/sub replies are flat).
const MAX_DEPTH: u8 = 4;
/// Bytes read from the socket at a time, at least.
const READ_CHUNK: usize = 16 << 10;

/// A socket, plain or TLS.
pub(crate) trait Socket: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Socket for T {}

/// Opens live connections with the engine's credentials and TLS settings.
pub(crate) struct Connector {
    tls: Option<Arc<rustls::ClientConfig>>,
    username: Option<String>,
    password: Option<String>,
    db: i64,
    timeout: Duration,
}

/// A connection's two halves: replies and messages come in on the reader, commands go out on
/// the writer.
pub(crate) type Halves = (
    Reader<ReadHalf<Box<dyn Socket>>>,
    WriteHalf<Box<dyn Socket>>,
);

impl Connector {
    /// From the settings of any of the target's nodes (they share credentials and TLS).
    pub fn new(
        info: &ConnectionInfo,
        tls: Option<Arc<rustls::ClientConfig>>,
        timeout: Duration,
    ) -> Self {
        let settings = info.redis_settings();
        Self {
            tls,
            username: settings.username().map(str::to_owned),
            password: settings.password().map(str::to_owned),
            db: settings.db(),
            timeout,
        }
    }

    /// Connects to `addr`, authenticates, selects the database and names the connection
    /// `ferry-live`, within the store timeout. Errors never contain the password.
    pub async fn connect(&self, addr: &NodeAddr) -> Result<Halves, String> {
        match tokio::time::timeout(self.timeout, self.open(addr)).await {
            Ok(result) => result,
            Err(_) => Err(format!("no connection to {addr} within {:?}", self.timeout)),
        }
    }

    async fn open(&self, addr: &NodeAddr) -> Result<Halves, String> {
        let tcp = TcpStream::connect((addr.host.as_str(), addr.port))
            .await
            .map_err(|e| format!("cannot connect to {addr}: {e}"))?;
        let _ = tcp.set_nodelay(true);
        let socket: Box<dyn Socket> = match &self.tls {
            Some(config) => {
                let name = rustls::pki_types::ServerName::try_from(addr.host.clone())
                    .map_err(|e| format!("{addr} is not a valid TLS server name: {e}"))?;
                let tls = tokio_rustls::TlsConnector::from(Arc::clone(config))
                    .connect(name, tcp)
                    .await
                    .map_err(|e| format!("TLS with {addr} failed: {e}"))?;
                Box::new(tls)
            }
            None => Box::new(tcp),
        };
        let (read, mut write) = tokio::io::split(socket);
        let mut reader = Reader::new(read);
        let mut setup = Vec::new();
        let mut expected = 0;
        if let Some(password) = &self.password {
            let mut auth = redis::cmd("AUTH");
            if let Some(user) = &self.username {
                auth.arg(user);
            }
            auth.arg(password);
            setup.extend(auth.get_packed_command());
            expected += 1;
        }
        if self.db != 0 {
            setup.extend(redis::cmd("SELECT").arg(self.db).get_packed_command());
            expected += 1;
        }
        setup.extend(
            redis::cmd("CLIENT")
                .arg("SETNAME")
                .arg("ferry-live")
                .get_packed_command(),
        );
        expected += 1;
        write
            .write_all(&setup)
            .await
            .map_err(|e| format!("cannot write to {addr}: {e}"))?;
        for answer in 1..=expected {
            match reader.next().await {
                // The name is a courtesy to operators (`CLIENT LIST`); an ACL may refuse it.
                Ok(Some(Frame::Error(_))) if answer == expected => {}
                Ok(Some(Frame::Error(e))) => return Err(format!("{addr} refused the setup: {e}")),
                Ok(Some(_)) => {}
                Ok(None) => return Err(format!("{addr} closed the connection during setup")),
                Err(e) => return Err(format!("reading from {addr}: {e}")),
            }
        }
        Ok((reader, write))
    }
}

/// One RESP2 reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Frame {
    Simple(Bytes),
    Error(String),
    Int(i64),
    Bulk(Option<Bytes>),
    Array(Option<Vec<Frame>>),
}

/// Reads replies off one connection. `next` is cancel-safe: bytes read stay in the buffer.
pub(crate) struct Reader<R> {
    io: R,
    buf: BytesMut,
}

impl<R: AsyncRead + Unpin> Reader<R> {
    pub fn new(io: R) -> Self {
        Self {
            io,
            buf: BytesMut::with_capacity(READ_CHUNK),
        }
    }

    /// The next reply; `None` when the connection ended cleanly between replies.
    pub async fn next(&mut self) -> io::Result<Option<Frame>> {
        loop {
            if let Some(len) = frame_len(&self.buf, 0, 0).map_err(invalid)? {
                let chunk = self.buf.split_to(len).freeze();
                let mut at = 0;
                return Ok(Some(build(&chunk, &mut at)));
            }
            self.buf.reserve(READ_CHUNK);
            if self.io.read_buf(&mut self.buf).await? == 0 {
                return if self.buf.is_empty() {
                    Ok(None)
                } else {
                    Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the connection ended inside a reply",
                    ))
                };
            }
        }
    }
}

fn invalid(reason: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, reason)
}

/// The end of the line that starts at `at` (the index of its `\r`), if it is complete.
fn line_end(data: &[u8], at: usize) -> Result<Option<usize>, String> {
    let window = &data[at..data.len().min(at + MAX_LINE + 2)];
    match window.windows(2).position(|w| w == b"\r\n") {
        Some(i) => Ok(Some(at + i)),
        None if window.len() > MAX_LINE => Err("a reply line is too long".into()),
        None => Ok(None),
    }
}

fn length(line: &[u8]) -> Result<i64, String> {
    std::str::from_utf8(line)
        .ok()
        .and_then(|s| s.parse::<i64>().ok())
        .ok_or_else(|| "a reply has an invalid length".to_owned())
}

/// The length of the complete reply that starts at `at`, `None` while it is incomplete.
fn frame_len(data: &[u8], at: usize, depth: u8) -> Result<Option<usize>, String> {
    let Some(&kind) = data.get(at) else {
        return Ok(None);
    };
    let Some(end) = line_end(data, at + 1)? else {
        return Ok(None);
    };
    let after = end + 2;
    match kind {
        b'+' | b'-' | b':' => Ok(Some(after - at)),
        b'$' => {
            let n = length(&data[at + 1..end])?;
            if n < 0 {
                return Ok(Some(after - at));
            }
            let n = usize::try_from(n).map_err(|_| "a bulk length is invalid".to_owned())?;
            if n > MAX_BULK {
                return Err(format!("a bulk reply of {n} bytes is too large"));
            }
            if data.len() < after + n + 2 {
                return Ok(None);
            }
            if &data[after + n..after + n + 2] != b"\r\n" {
                return Err("a bulk reply does not end with CRLF".into());
            }
            Ok(Some(after + n + 2 - at))
        }
        b'*' => {
            let n = length(&data[at + 1..end])?;
            if n < 0 {
                return Ok(Some(after - at));
            }
            if depth >= MAX_DEPTH {
                return Err("replies are nested too deep".into());
            }
            let mut next = after;
            for _ in 0..n {
                match frame_len(data, next, depth + 1)? {
                    Some(len) => next += len,
                    None => return Ok(None),
                }
            }
            Ok(Some(next - at))
        }
        other => Err(format!("unexpected reply type byte {other:#04x}")),
    }
}

/// Builds the reply at `*at` in `chunk`, which `frame_len` found complete and valid.
fn build(chunk: &Bytes, at: &mut usize) -> Frame {
    let kind = chunk[*at];
    let end = *at
        + 1
        + chunk[*at + 1..]
            .windows(2)
            .position(|w| w == b"\r\n")
            .unwrap_or(0);
    let line = chunk.slice(*at + 1..end);
    *at = end + 2;
    match kind {
        b'+' => Frame::Simple(line),
        b'-' => Frame::Error(String::from_utf8_lossy(&line).into_owned()),
        b':' => Frame::Int(length(&line).unwrap_or(0)),
        b'$' => match usize::try_from(length(&line).unwrap_or(-1)) {
            Ok(n) => {
                let bulk = chunk.slice(*at..*at + n);
                *at += n + 2;
                Frame::Bulk(Some(bulk))
            }
            Err(_) => Frame::Bulk(None),
        },
        _ => match usize::try_from(length(&line).unwrap_or(-1)) {
            Ok(n) => Frame::Array(Some((0..n).map(|_| build(chunk, at)).collect())),
            Err(_) => Frame::Array(None),
        },
    }
}

/// What a pub/sub connection said, read from its frames.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Incoming {
    /// A published message (`message` or `smessage`).
    Message {
        channel: Bytes,
        payload: Bytes,
    },
    /// A subscription confirmed (`subscribe` or `ssubscribe`).
    Subscribed(Bytes),
    /// An unsubscription: confirmed, or unsolicited (the slot moved away).
    Unsubscribed(Bytes),
    Pong,
    /// An error reply (to the oldest pending command).
    Error(String),
    /// Something else, ignored.
    Other,
}

impl From<Frame> for Incoming {
    fn from(frame: Frame) -> Self {
        let items = match frame {
            Frame::Array(Some(items)) => items,
            Frame::Error(e) => return Incoming::Error(e),
            Frame::Simple(s) if s.eq_ignore_ascii_case(b"pong") => return Incoming::Pong,
            _ => return Incoming::Other,
        };
        let mut items = items.into_iter();
        let Some(Frame::Bulk(Some(kind))) = items.next() else {
            return Incoming::Other;
        };
        let channel = match items.next() {
            Some(Frame::Bulk(Some(channel))) => channel,
            _ if kind.eq_ignore_ascii_case(b"pong") => return Incoming::Pong,
            _ => return Incoming::Other,
        };
        match kind.as_ref() {
            b"message" | b"smessage" => match items.next() {
                Some(Frame::Bulk(Some(payload))) => Incoming::Message { channel, payload },
                _ => Incoming::Other,
            },
            b"subscribe" | b"ssubscribe" => Incoming::Subscribed(channel),
            b"unsubscribe" | b"sunsubscribe" => Incoming::Unsubscribed(channel),
            b"pong" => Incoming::Pong,
            _ => Incoming::Other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn read_all(input: &[u8]) -> (Vec<Frame>, Option<io::Error>) {
        // Fed in 3-byte pieces, to cross every boundary.
        let (mut tx, rx) = tokio::io::duplex(7);
        let owned = input.to_vec();
        let writer = tokio::spawn(async move {
            for piece in owned.chunks(3) {
                tx.write_all(piece).await.expect("write");
            }
        });
        let mut reader = Reader::new(rx);
        let mut frames = Vec::new();
        let error = loop {
            match reader.next().await {
                Ok(Some(frame)) => frames.push(frame),
                Ok(None) => break None,
                Err(e) => break Some(e),
            }
        };
        writer.await.expect("writer");
        (frames, error)
    }

    fn bulk(s: &str) -> Frame {
        Frame::Bulk(Some(Bytes::copy_from_slice(s.as_bytes())))
    }

    #[tokio::test]
    async fn replies_are_read_across_reads() {
        let input = b"+OK\r\n-ERR no\r\n:42\r\n$-1\r\n*-1\r\n$0\r\n\r\n\
            *3\r\n$8\r\nsmessage\r\n$2\r\nch\r\n$5\r\nhe\r\nl\r\n\
            *2\r\n$4\r\npong\r\n$0\r\n\r\n";
        let (frames, error) = read_all(input).await;
        assert!(error.is_none(), "{error:?}");
        assert_eq!(
            frames,
            vec![
                Frame::Simple(Bytes::from_static(b"OK")),
                Frame::Error("ERR no".into()),
                Frame::Int(42),
                Frame::Bulk(None),
                Frame::Array(None),
                bulk(""),
                Frame::Array(Some(vec![bulk("smessage"), bulk("ch"), bulk("he\r\nl")])),
                Frame::Array(Some(vec![bulk("pong"), bulk("")])),
            ]
        );
        assert_eq!(
            Incoming::from(frames[6].clone()),
            Incoming::Message {
                channel: Bytes::from_static(b"ch"),
                payload: Bytes::from_static(b"he\r\nl"),
            }
        );
        assert_eq!(Incoming::from(frames[7].clone()), Incoming::Pong);
        assert_eq!(
            Incoming::from(frames[1].clone()),
            Incoming::Error("ERR no".into())
        );
    }

    #[tokio::test]
    async fn confirmations_are_told_apart() {
        let input = b"*3\r\n$10\r\nssubscribe\r\n$1\r\na\r\n:1\r\n\
            *3\r\n$12\r\nsunsubscribe\r\n$1\r\na\r\n:0\r\n\
            *3\r\n$9\r\nsubscribe\r\n$1\r\nb\r\n:1\r\n\
            *3\r\n$7\r\nmessage\r\n$1\r\nb\r\n$1\r\nx\r\n+PONG\r\n";
        let (frames, error) = read_all(input).await;
        assert!(error.is_none());
        let incoming: Vec<Incoming> = frames.into_iter().map(Incoming::from).collect();
        let b = |s: &'static [u8]| Bytes::from_static(s);
        assert_eq!(
            incoming,
            vec![
                Incoming::Subscribed(b(b"a")),
                Incoming::Unsubscribed(b(b"a")),
                Incoming::Subscribed(b(b"b")),
                Incoming::Message {
                    channel: b(b"b"),
                    payload: b(b"x")
                },
                Incoming::Pong,
            ]
        );
    }

    #[tokio::test]
    async fn bad_input_is_an_error_not_a_hang() {
        for input in [
            &b"?what\r\n"[..],
            b"$abc\r\n",
            b"$3\r\nabcXY",
            b"*1\r\n*1\r\n*1\r\n*1\r\n*1\r\n:1\r\n",
            b"$99999999999\r\n",
            b"+OK",
        ] {
            let (_, error) = read_all(input).await;
            assert!(error.is_some(), "{input:?} was accepted");
        }
        let long = vec![b'+'; MAX_LINE + 10];
        let (_, error) = read_all(&long).await;
        assert_eq!(
            error.map(|e| e.kind()),
            Some(io::ErrorKind::InvalidData),
            "an endless line is refused before it fills memory"
        );
    }
}
