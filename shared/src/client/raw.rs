//! `RawConnection`: a WebSocket with no client logic, for tests that send exactly the frames
//! (or the malformed bytes) they mean to and read exactly what comes back.

use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{self, Message};

use super::error::ClientError;
use super::transport::{Ws, close_parts, dial, to_message, to_wire};
use crate::codec::{Codec, Wire};
use crate::frame::{ClientFrame, ServerFrame};

/// What [`RawConnection::next_frame`] read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RawEvent {
    /// A decoded frame.
    Frame(ServerFrame),
    /// The connection ended.
    Closed {
        /// The server's close code; `None` when the TCP connection ended without a close frame.
        code: Option<u16>,
        /// The close reason.
        reason: String,
    },
}

/// A bare WebSocket to a gateway: no `hello`, no retries, no acks, no reconnects.
#[derive(Debug)]
pub struct RawConnection {
    ws: Ws,
    codec: Codec,
    subprotocol: Option<String>,
    closed: Option<(Option<u16>, String)>,
}

impl RawConnection {
    /// Opens a WebSocket to `url` offering `subprotocols` (none: no `Sec-WebSocket-Protocol`
    /// header) with `extra_headers` added to the upgrade request. A refused upgrade is
    /// [`ClientError::Handshake`] with the HTTP status.
    pub async fn connect(
        url: &str,
        subprotocols: &[&str],
        extra_headers: &[(&str, &str)],
    ) -> Result<RawConnection, ClientError> {
        let (ws, subprotocol) = dial(url, None, subprotocols, extra_headers).await?;
        let codec = subprotocol
            .as_deref()
            .and_then(Codec::from_subprotocol)
            .unwrap_or(Codec::MsgPack);
        Ok(RawConnection {
            ws,
            codec,
            subprotocol,
            closed: None,
        })
    }

    /// The subprotocol the server chose, if it sent one.
    pub fn subprotocol(&self) -> Option<&str> {
        self.subprotocol.as_deref()
    }

    /// The codec frames are encoded and decoded with: the chosen subprotocol's, MessagePack if
    /// none was chosen.
    pub fn codec(&self) -> Codec {
        self.codec
    }

    /// Encodes `frame` with the connection's codec and sends it.
    pub async fn send_frame(&mut self, frame: &ClientFrame) -> Result<(), ClientError> {
        let wire = self.codec.encode_client(frame)?;
        self.send_wire(wire).await
    }

    /// Sends one data message as is.
    pub async fn send_wire(&mut self, wire: Wire) -> Result<(), ClientError> {
        self.ws.send(to_message(wire)).await?;
        Ok(())
    }

    /// Sends a text message as is (a JSON frame, or anything else).
    pub async fn send_text(&mut self, text: impl Into<String>) -> Result<(), ClientError> {
        self.send_wire(Wire::Text(text.into())).await
    }

    /// Sends a binary message as is (a MessagePack frame, or anything else).
    pub async fn send_binary(&mut self, data: impl Into<Bytes>) -> Result<(), ClientError> {
        self.send_wire(Wire::Binary(data.into())).await
    }

    /// Waits up to `timeout` for the next frame, skipping WebSocket pings and pongs (pings are
    /// answered). Once the connection has ended every call returns the same
    /// [`RawEvent::Closed`]. An undecodable message is [`ClientError::Protocol`];
    /// [`ClientError::Timeout`] if nothing came.
    pub async fn next_frame(&mut self, timeout: Duration) -> Result<RawEvent, ClientError> {
        if let Some((code, reason)) = &self.closed {
            return Ok(RawEvent::Closed {
                code: *code,
                reason: reason.clone(),
            });
        }
        let read = async {
            loop {
                let message = match self.ws.next().await {
                    Some(Ok(message)) => message,
                    Some(Err(tungstenite::Error::ConnectionClosed)) | None => {
                        return Ok(RawEvent::Closed {
                            code: None,
                            reason: String::new(),
                        });
                    }
                    Some(Err(e)) => return Err(ClientError::from(e)),
                };
                if let Message::Close(frame) = message {
                    let (code, reason) = close_parts(frame);
                    let _ = self.ws.flush().await;
                    return Ok(RawEvent::Closed { code, reason });
                }
                if let Some(wire) = to_wire(message) {
                    return Ok(RawEvent::Frame(self.codec.decode_server(&wire)?));
                }
            }
        };
        let event = tokio::time::timeout(timeout, read)
            .await
            .unwrap_or(Err(ClientError::Timeout))?;
        if let RawEvent::Closed { code, reason } = &event {
            self.closed = Some((*code, reason.clone()));
        }
        Ok(event)
    }

    /// Sends a close frame with `code` and `reason` and waits briefly for the server's.
    pub async fn close(&mut self, code: u16, reason: &str) -> Result<(), ClientError> {
        let frame = CloseFrame {
            code: code.into(),
            reason: reason.into(),
        };
        self.ws.close(Some(frame)).await?;
        let drain = async { while let Some(Ok(_)) = self.ws.next().await {} };
        let _ = tokio::time::timeout(Duration::from_secs(1), drain).await;
        Ok(())
    }
}
