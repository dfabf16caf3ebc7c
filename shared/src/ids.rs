//! Validated identifiers: a `UserId` names an inbox, a `MessageId` names one `send` of a sender,
//! a `DeviceId` names one of a user's devices (its own acknowledged position in the inbox).

use std::fmt;
use std::sync::Arc;

/// Why a string is not a valid id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("{kind} must be 1 to {max} bytes long")]
    Length { kind: &'static str, max: usize },
    #[error("{kind} contains a character outside {allowed}")]
    Character {
        kind: &'static str,
        allowed: &'static str,
    },
}

const USER_MAX: usize = 128;
const MESSAGE_MAX: usize = 64;

fn check(s: &str, kind: &'static str, max: usize, extra: &'static [u8]) -> Result<(), IdError> {
    if s.is_empty() || s.len() > max {
        return Err(IdError::Length { kind, max });
    }
    let ok = s
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || extra.contains(&b));
    if !ok {
        let allowed = if extra.contains(&b'@') {
            "A-Z a-z 0-9 . _ - @ :"
        } else {
            "A-Z a-z 0-9 . _ - :"
        };
        return Err(IdError::Character { kind, allowed });
    }
    Ok(())
}

/// A user id: 1 to 128 bytes of `A-Z a-z 0-9 . _ - @ :`. Cheap to clone.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct UserId(Arc<str>);

impl UserId {
    pub fn parse(s: &str) -> Result<Self, IdError> {
        check(s, "user id", USER_MAX, b"._-@:")?;
        Ok(Self(Arc::from(s)))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A message id chosen by its sender: 1 to 64 bytes of `A-Z a-z 0-9 . _ - :`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MessageId(Arc<str>);

impl MessageId {
    pub fn parse(s: &str) -> Result<Self, IdError> {
        check(s, "message id", MESSAGE_MAX, b"._-:")?;
        Ok(Self(Arc::from(s)))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A device of a user, as named in `hello`: 1 to 64 bytes of `A-Z a-z 0-9 . _ - :`. A
/// connection that names none is the user's `default` device.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DeviceId(Arc<str>);

impl DeviceId {
    pub const DEFAULT: &'static str = "default";

    pub fn parse(s: &str) -> Result<Self, IdError> {
        check(s, "device id", MESSAGE_MAX, b"._-:")?;
        Ok(Self(Arc::from(s)))
    }

    /// The device of a connection that names none (shared: no allocation per connection).
    pub fn default_device() -> Self {
        static DEFAULT: std::sync::LazyLock<DeviceId> =
            std::sync::LazyLock::new(|| DeviceId(Arc::from(DeviceId::DEFAULT)));
        DEFAULT.clone()
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

macro_rules! id_traits {
    ($t:ty) => {
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
        impl fmt::Debug for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(&*self.0, f)
            }
        }
        impl std::str::FromStr for $t {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, IdError> {
                Self::parse(s)
            }
        }
        impl AsRef<str> for $t {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }
    };
}
id_traits!(UserId);
id_traits!(MessageId);
id_traits!(DeviceId);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_ids() {
        assert!(UserId::parse("alice").is_ok());
        assert!(UserId::parse("a.b_c-d@e:f9").is_ok());
        assert!(UserId::parse(&"x".repeat(128)).is_ok());
        assert!(matches!(UserId::parse(""), Err(IdError::Length { .. })));
        assert!(matches!(
            UserId::parse(&"x".repeat(129)),
            Err(IdError::Length { .. })
        ));
        for bad in ["a b", "a{b", "é", "a/b", "a}"] {
            assert!(
                matches!(UserId::parse(bad), Err(IdError::Character { .. })),
                "{bad}"
            );
        }
    }

    #[test]
    fn message_ids() {
        assert!(MessageId::parse("b-17:x.y_z").is_ok());
        assert!(MessageId::parse(&"x".repeat(64)).is_ok());
        assert!(MessageId::parse(&"x".repeat(65)).is_err());
        assert!(MessageId::parse("a@b").is_err(), "@ is for user ids only");
        assert!(MessageId::parse("").is_err());
    }

    #[test]
    fn device_ids() {
        assert!(DeviceId::parse("web-0f3a:tab.1_x").is_ok());
        assert!(DeviceId::parse(&"d".repeat(65)).is_err());
        assert!(DeviceId::parse("a@b").is_err());
        assert_eq!(DeviceId::default_device().as_str(), "default");
        assert_eq!(
            DeviceId::parse("default").unwrap(),
            DeviceId::default_device()
        );
    }
}
