//! The HTTP API's keys: read from `--api-keys-file` at start, each with a name (for logs and
//! metrics) and its own rate bucket, and looked up in constant time.

use std::fmt;
use std::path::Path;
use std::sync::{Mutex, PoisonError};

use ferry_shared::MessageId;
use subtle::ConstantTimeEq;

use crate::limits::TokenBucket;

/// Shortest secret accepted, in bytes (256 bits when drawn from a good alphabet).
pub const MIN_SECRET_BYTES: usize = 32;

/// Why the keys file was refused. No variant carries a secret or any part of one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeysError {
    #[error("cannot read --api-keys-file {path}: {reason}")]
    Read { path: String, reason: String },
    #[error("--api-keys-file line {line}: {reason}")]
    Line { line: usize, reason: &'static str },
    #[error("--api-keys-file holds no key (each line: `<name> <secret>`)")]
    Empty,
}

/// One API key.
pub struct ApiKey {
    /// Names the key in logs and metrics (never the secret).
    pub name: String,
    secret: Vec<u8>,
    /// Recipient-messages this key may publish now (`--api-rate`, `--api-burst`).
    bucket: Mutex<TokenBucket>,
}

impl ApiKey {
    /// Takes `n` tokens of this key's bucket, or none: then the milliseconds until they are there.
    pub fn take(&self, n: u32) -> Result<(), u64> {
        // Nothing under the lock can panic.
        let mut bucket = self.bucket.lock().unwrap_or_else(PoisonError::into_inner);
        bucket.take_n(n)
    }
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ApiKey({:?}, <redacted>)", self.name)
    }
}

/// Every configured key; several are valid at once (rotation).
#[derive(Debug)]
pub struct ApiKeys {
    keys: Vec<ApiKey>,
}

impl ApiKeys {
    /// Reads the keys file; each key's bucket holds `burst` tokens and refills at `rate` a second.
    pub fn load(path: &Path, rate: f64, burst: u32) -> Result<ApiKeys, KeysError> {
        let text = std::fs::read_to_string(path).map_err(|e| KeysError::Read {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        Self::parse(&text, rate, burst)
    }

    /// The keys of a file's text: one `<name> <secret>` per line, whitespace-separated; blank
    /// lines and lines starting with `#` are skipped.
    pub fn parse(text: &str, rate: f64, burst: u32) -> Result<ApiKeys, KeysError> {
        let mut keys: Vec<ApiKey> = Vec::new();
        for (index, line) in text.lines().enumerate() {
            let line_error = |reason| KeysError::Line {
                line: index + 1,
                reason,
            };
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let mut fields = line.split_whitespace();
            let (Some(name), Some(secret), None) = (fields.next(), fields.next(), fields.next())
            else {
                return Err(line_error("expected `<name> <secret>`"));
            };
            if MessageId::parse(name).is_err() {
                return Err(line_error(
                    "the name must be 1 to 64 bytes of A-Z a-z 0-9 . _ - :",
                ));
            }
            if secret.len() < MIN_SECRET_BYTES {
                return Err(line_error("the secret must be at least 32 bytes"));
            }
            if keys.iter().any(|k| k.name == name) {
                return Err(line_error("a key of this name is already in the file"));
            }
            if keys.iter().any(|k| k.secret == secret.as_bytes()) {
                return Err(line_error("this secret is already in the file"));
            }
            keys.push(ApiKey {
                name: name.to_owned(),
                secret: secret.as_bytes().to_vec(),
                bucket: Mutex::new(TokenBucket::new(rate, f64::from(burst))),
            });
        }
        if keys.is_empty() {
            return Err(KeysError::Empty);
        }
        Ok(ApiKeys { keys })
    }

    /// The key whose secret is `presented`. Every key is compared, each in constant time, so the
    /// time taken says nothing about how much of a secret matched, or which one (only whether
    /// the lengths differ, as with any comparison of secrets of different lengths).
    pub fn find(&self, presented: &[u8]) -> Option<&ApiKey> {
        let mut found = None;
        for key in &self.keys {
            if bool::from(key.secret.as_slice().ct_eq(presented)) {
                found = Some(key);
            }
        }
        found
    }

    /// The keys' names, in file order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.keys.iter().map(|k| k.name.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    const B: &str = "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";

    fn parse(text: &str) -> Result<ApiKeys, KeysError> {
        ApiKeys::parse(text, 10.0, 10)
    }

    #[test]
    fn lines_comments_and_rotation() {
        let keys = parse(&format!("# rotation\n\nnotify {A}\n  bots:v2\t{B}  \n")).expect("parses");
        assert_eq!(keys.names().collect::<Vec<_>>(), ["notify", "bots:v2"]);
        assert_eq!(
            keys.find(A.as_bytes()).map(|k| k.name.as_str()),
            Some("notify")
        );
        assert_eq!(
            keys.find(B.as_bytes()).map(|k| k.name.as_str()),
            Some("bots:v2")
        );
        assert!(keys.find(&A.as_bytes()[1..]).is_none());
        assert!(keys.find(b"").is_none());
        assert!(keys.find(format!("{A}a").as_bytes()).is_none());
    }

    #[test]
    fn bad_files_are_refused_without_their_secrets() {
        let short = "s3cr3t-but-short";
        let cases = [
            (format!("notify {short}"), 1),
            (format!("notify {A} extra"), 1),
            (format!("\nnotify{A}"), 2),
            (format!("no/slash {A}"), 1),
            (format!("{} {A}", "n".repeat(65)), 1),
            (format!("a {A}\na {B}"), 2),
            (format!("a {A}\nb {A}"), 2),
        ];
        for (text, line) in cases {
            let err = parse(&text).expect_err(&text);
            assert!(
                matches!(err, KeysError::Line { line: l, .. } if l == line),
                "{err}"
            );
            let shown = format!("{err} {err:?}");
            for secret in [A, short] {
                assert!(!shown.contains(secret), "{shown}");
            }
        }
        assert_eq!(parse("# only a comment\n\n").err(), Some(KeysError::Empty));
        let missing = ApiKeys::load(Path::new("/nonexistent/keys"), 1.0, 1).expect_err("missing");
        assert!(
            missing.to_string().contains("/nonexistent/keys"),
            "{missing}"
        );
    }

    #[test]
    fn debug_hides_secrets() {
        let keys = parse(&format!("notify {A}")).expect("parses");
        let shown = format!("{keys:?}");
        assert!(shown.contains("notify") && !shown.contains(A), "{shown}");
    }

    #[tokio::test(start_paused = true)]
    async fn each_key_has_its_own_bucket() {
        let keys = parse(&format!("a {A}\nb {B}")).expect("parses");
        let (a, b) = (keys.find(A.as_bytes()), keys.find(B.as_bytes()));
        let (Some(a), Some(b)) = (a, b) else {
            panic!("both keys found")
        };
        assert_eq!(a.take(10), Ok(()));
        assert_eq!(a.take(1), Err(100));
        assert_eq!(b.take(10), Ok(()));
    }
}
