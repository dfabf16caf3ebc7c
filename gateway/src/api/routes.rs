//! Which path is which route: the routes the API serves, their templates (for metrics and the
//! OpenAPI check) and the ids in their paths.

use super::reply::ApiError;

/// Every route the API serves, as (method, path template); docs/openapi.yaml documents each.
pub const ROUTES: [(&str, &str); 5] = [
    ("POST", "/v1/messages"),
    ("GET", "/v1/users/{user}/inbox"),
    ("DELETE", "/v1/users/{user}/inbox"),
    ("GET", "/v1/users/{user}/devices"),
    ("DELETE", "/v1/users/{user}/devices/{device}"),
];

/// A path the API serves, with its raw (percent-decoded) ids.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Route {
    Messages,
    Inbox(String),
    Devices(String),
    Device(String, String),
}

impl Route {
    pub(super) fn parse(path: &str) -> Option<Route> {
        let mut segments = path.strip_prefix('/')?.split('/');
        let mut next = || segments.next();
        let route = match (next(), next(), next(), next(), next(), next()) {
            (Some("v1"), Some("messages"), None, ..) => Route::Messages,
            (Some("v1"), Some("users"), Some(user), Some("inbox"), None, _) => {
                Route::Inbox(percent_decode(user))
            }
            (Some("v1"), Some("users"), Some(user), Some("devices"), None, _) => {
                Route::Devices(percent_decode(user))
            }
            (Some("v1"), Some("users"), Some(user), Some("devices"), Some(device), None) => {
                Route::Device(percent_decode(user), percent_decode(device))
            }
            _ => return None,
        };
        Some(route)
    }

    /// The `route` label of `ferry_api_requests_total`: the template, never the ids.
    pub(super) fn template(&self) -> &'static str {
        match self {
            Route::Messages => "/v1/messages",
            Route::Inbox(_) => "/v1/users/{user}/inbox",
            Route::Devices(_) => "/v1/users/{user}/devices",
            Route::Device(..) => "/v1/users/{user}/devices/{device}",
        }
    }

    /// The methods the route takes (a 405's `Allow`).
    pub(super) fn allow(&self) -> &'static str {
        match self {
            Route::Messages => "POST",
            Route::Inbox(_) => "GET, DELETE",
            Route::Devices(_) => "GET",
            Route::Device(..) => "DELETE",
        }
    }
}

/// `%XX` escapes decoded (a client may write `@` as `%40`); a segment that does not decode to
/// UTF-8 is kept as it came, and fails the id check.
fn percent_decode(segment: &str) -> String {
    let bytes = segment.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = (bytes[i] == b'%')
            .then(|| bytes.get(i + 1..i + 3))
            .flatten()
            .and_then(|hex| std::str::from_utf8(hex).ok())
            .and_then(|hex| u8::from_str_radix(hex, 16).ok());
        match escaped {
            Some(byte) => {
                out.push(byte);
                i += 3;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8(out).unwrap_or_else(|_| segment.to_owned())
}

/// A path id checked by `parse`; a bad one is `invalid`, naming `field`.
pub(super) fn path_id<T, E: std::fmt::Display>(
    raw: &str,
    field: &str,
    parse: impl Fn(&str) -> Result<T, E>,
) -> Result<T, ApiError> {
    parse(raw).map_err(|e| ApiError::Invalid(format!("{field}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_parse_to_their_templates() {
        let cases = [
            ("/v1/messages", Some(Route::Messages)),
            ("/v1/users/alice/inbox", Some(Route::Inbox("alice".into()))),
            (
                "/v1/users/a%40b.c/inbox",
                Some(Route::Inbox("a@b.c".into())),
            ),
            (
                "/v1/users/alice/devices",
                Some(Route::Devices("alice".into())),
            ),
            (
                "/v1/users/alice/devices/phone",
                Some(Route::Device("alice".into(), "phone".into())),
            ),
            ("/v1/users//inbox", Some(Route::Inbox(String::new()))),
            ("/v1/messages/", None),
            ("/v1/users/alice", None),
            ("/v1/users/alice/inbox/x", None),
            ("/v1/users/alice/devices/phone/x", None),
            ("/v2/messages", None),
            ("", None),
            ("/", None),
        ];
        for (path, route) in cases {
            assert_eq!(Route::parse(path), route, "{path}");
        }
        // Each template is one of ROUTES, and each route's methods are the ones ROUTES lists.
        for route in [
            Route::Messages,
            Route::Inbox(String::new()),
            Route::Devices(String::new()),
            Route::Device(String::new(), String::new()),
        ] {
            let listed: Vec<&str> = ROUTES
                .iter()
                .filter(|(_, path)| *path == route.template())
                .map(|(method, _)| *method)
                .collect();
            assert_eq!(listed.join(", "), route.allow(), "{route:?}");
        }
    }

    #[test]
    fn percent_escapes() {
        assert_eq!(percent_decode("a%3Ab%40c"), "a:b@c");
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%zz%4"), "%zz%4");
        assert_eq!(percent_decode("%ff"), "%ff", "not UTF-8: kept as it came");
    }
}
