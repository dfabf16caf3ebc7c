//! Tokens for the load generator's users: HS256 JWTs minted with the gateway's secret, or fetched
//! from a `--dev` gateway's `/dev/token` endpoint.

use std::time::Duration;

use anyhow::{Context, bail};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::config::Auth;

/// Lifetime of a minted token: longer than any run.
const TOKEN_TTL_SECS: u64 = 24 * 3600;
/// Limit on one `/dev/token` request.
const DEV_TOKEN_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest `/dev/token` answer read.
const DEV_TOKEN_MAX_BYTES: u64 = 64 * 1024;

#[derive(Serialize)]
struct Claims<'a> {
    sub: &'a str,
    iat: u64,
    exp: u64,
}

#[derive(Deserialize)]
struct DevToken {
    token: String,
}

/// Hands out a token for any user of the run.
pub struct Tokens {
    /// The signing key when tokens are minted here.
    key: Option<EncodingKey>,
}

impl Tokens {
    pub fn new(auth: &Auth) -> Self {
        Tokens {
            key: match auth {
                Auth::Secret(secret) => Some(EncodingKey::from_secret(secret.as_bytes())),
                Auth::DevEndpoint => None,
            },
        }
    }

    /// A token for `user`, minted or fetched from the gateway behind `url`.
    pub async fn token(&self, url: &str, user: &str) -> anyhow::Result<String> {
        match &self.key {
            Some(key) => mint(key, user),
            None => fetch_dev_token(url, user).await,
        }
    }
}

fn mint(key: &EncodingKey, user: &str) -> anyhow::Result<String> {
    let now = jsonwebtoken::get_current_timestamp();
    let claims = Claims {
        sub: user,
        iat: now,
        exp: now + TOKEN_TTL_SECS,
    };
    jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, key).context("signing a token")
}

/// `GET /dev/token?user=<user>` on the host and port of the WebSocket URL.
async fn fetch_dev_token(url: &str, user: &str) -> anyhow::Result<String> {
    let authority = url
        .strip_prefix("ws://")
        .and_then(|rest| rest.split('/').next())
        .filter(|a| !a.is_empty())
        .with_context(|| format!("{url}: no host:port"))?;
    let request = format!(
        "GET /dev/token?user={user} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n"
    );
    let exchange = async {
        let mut stream = TcpStream::connect(authority).await?;
        stream.write_all(request.as_bytes()).await?;
        let mut raw = Vec::new();
        stream
            .take(DEV_TOKEN_MAX_BYTES)
            .read_to_end(&mut raw)
            .await?;
        Ok::<_, std::io::Error>(raw)
    };
    let raw = tokio::time::timeout(DEV_TOKEN_TIMEOUT, exchange)
        .await
        .context("/dev/token timed out")?
        .with_context(|| format!("GET /dev/token from {authority}"))?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .context("/dev/token: no HTTP body")?;
    let status = head.split_whitespace().nth(1).unwrap_or("?");
    if status != "200" {
        bail!("/dev/token answered {status}: {body} (is the gateway running with --dev?)");
    }
    let answer: DevToken = serde_json::from_str(body.trim()).context("/dev/token: bad JSON")?;
    Ok(answer.token)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn minted_tokens_are_hs256_jwts_naming_the_user() {
        let tokens = Tokens::new(&Auth::Secret("a-secret-of-at-least-32-bytes!!!!".into()));
        let token = tokens.token("ws://unused/v1/ws", "lt-x-1").await.unwrap();
        let key = jsonwebtoken::DecodingKey::from_secret(b"a-secret-of-at-least-32-bytes!!!!");
        let mut validation = jsonwebtoken::Validation::new(Algorithm::HS256);
        validation.set_required_spec_claims(&["exp", "sub"]);
        let data = jsonwebtoken::decode::<serde_json::Value>(&token, &key, &validation).unwrap();
        assert_eq!(data.claims["sub"], "lt-x-1");
    }
}
