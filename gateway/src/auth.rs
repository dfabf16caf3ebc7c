//! Token verification: a client's JWT is checked against the one configured algorithm and key, and
//! names the `UserId` the connection acts as; with an HS256 secret, tokens can also be minted.

use std::collections::HashSet;
use std::fmt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use ferry_shared::{ErrorCode, UserId};
use jsonwebtoken::errors::{Error as JwtError, ErrorKind};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::config::{Config, JwtAlg, Recipients};
use crate::metrics;

/// Clock skew tolerated on `exp` and `nbf`, in seconds.
const LEEWAY_SECS: u64 = 5;

/// Why a token was refused, or why the authenticator could not be built. The session answers every
/// one of them with the protocol error `unauthorized` (see [`AuthError::code`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("no token given")]
    Missing,
    #[error(
        "malformed token (not a compact JWT, bad base64 or JSON, or an unknown `alg` such as none)"
    )]
    Malformed,
    #[error("token expired")]
    Expired,
    #[error("token signature does not verify")]
    BadSignature,
    #[error("token signed with an algorithm other than the configured one")]
    WrongAlgorithm,
    #[error("token claims refused: {0}")]
    BadClaims(String),
    #[error("JWT key: {0}")]
    Key(String),
}

impl AuthError {
    /// The protocol error code a client gets for this.
    pub fn code(&self) -> ErrorCode {
        ErrorCode::Unauthorized
    }

    /// The message a client gets with [`AuthError::code`]: always `unauthorized`. Why a token
    /// was refused tells a caller probing with forged tokens what to change; the reason goes to
    /// the log (`Display`) and to `ferry_auth_failures_total` ([`AuthError::reason`]) instead.
    pub fn client_message(&self) -> &'static str {
        "unauthorized"
    }

    /// A label for this failure, from a closed set ([`AuthError::REASONS`]), for metrics and
    /// structured logs.
    pub fn reason(&self) -> &'static str {
        match self {
            AuthError::Missing => "missing",
            AuthError::Malformed => "malformed",
            AuthError::Expired => "expired",
            AuthError::BadSignature => "bad_signature",
            AuthError::WrongAlgorithm => "wrong_algorithm",
            AuthError::BadClaims(_) => "claims",
            AuthError::Key(_) => "key",
        }
    }

    /// Every value of [`AuthError::reason`].
    pub const REASONS: [&'static str; 7] = [
        "missing",
        "malformed",
        "expired",
        "bad_signature",
        "wrong_algorithm",
        "claims",
        "key",
    ];

    /// Counts this refusal in `ferry_auth_failures_total{at, reason}`.
    pub fn record(&self, at: AuthAt) {
        metrics::AUTH_FAILURES
            .with_label_values(&[at.label(), self.reason()])
            .inc();
    }

    fn from_jwt(e: JwtError) -> AuthError {
        let claims = |s: &str| AuthError::BadClaims(s.to_owned());
        match e.kind() {
            ErrorKind::InvalidToken
            | ErrorKind::Base64(_)
            | ErrorKind::Json(_)
            | ErrorKind::Utf8(_) => AuthError::Malformed,
            ErrorKind::InvalidSignature => AuthError::BadSignature,
            ErrorKind::InvalidAlgorithm
            | ErrorKind::MissingAlgorithm
            | ErrorKind::UnsupportedAlgorithm
            | ErrorKind::InvalidAlgorithmName => AuthError::WrongAlgorithm,
            ErrorKind::ExpiredSignature => AuthError::Expired,
            ErrorKind::ImmatureSignature => claims("not valid yet (nbf is in the future)"),
            ErrorKind::MissingRequiredClaim(c) => AuthError::BadClaims(format!("missing {c}")),
            ErrorKind::InvalidClaimFormat(c) => AuthError::BadClaims(format!("{c} is not a time")),
            ErrorKind::InvalidIssuer => claims("iss is not the configured issuer"),
            ErrorKind::InvalidAudience => claims("aud does not name the configured audience"),
            ErrorKind::InvalidSubject => claims("sub refused"),
            ErrorKind::InvalidRsaKey(_)
            | ErrorKind::InvalidEcdsaKey
            | ErrorKind::InvalidEddsaKey
            | ErrorKind::InvalidKeyFormat => AuthError::Key(e.to_string()),
            _ => AuthError::BadClaims(e.to_string()),
        }
    }
}

/// Where a token was refused: the `at` label of `ferry_auth_failures_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthAt {
    /// The token of `hello` (or of the upgrade): the connection is closed.
    Hello,
    /// A fresh token in an `auth` frame: the session goes on under its current token.
    Auth,
}

impl AuthAt {
    /// Every place, in label order.
    pub const ALL: [AuthAt; 2] = [AuthAt::Hello, AuthAt::Auth];

    pub fn label(self) -> &'static str {
        match self {
            AuthAt::Hello => "hello",
            AuthAt::Auth => "auth",
        }
    }
}

/// Verifies tokens with the configured algorithm and key; built once at start and shared.
#[derive(Clone)]
pub struct Authenticator {
    /// The only algorithm accepted; a token with any other `alg` is refused before its signature.
    alg: Algorithm,
    /// The HS256 secret or the PEM public key.
    decoding: DecodingKey,
    /// `exp` and `sub` required, `nbf` checked when present, `iss` / `aud` required and checked
    /// when configured.
    validation: Validation,
    /// The HS256 secret as a signing key, for `mint_dev_token`; `None` with a public key.
    minting: Option<EncodingKey>,
    /// Whether `send_to` is read (`--recipients token`).
    reads_send_to: bool,
    /// Put into minted tokens so that they pass `verify`.
    issuer: Option<String>,
    audience: Option<String>,
}

/// The claims Ferry reads; `exp`, `nbf`, `iss` and `aud` are checked by `Validation`.
#[derive(Deserialize)]
struct Claims {
    #[serde(default)]
    sub: Option<serde_json::Value>,
    /// Required and checked as a time by `Validation`; read as a value so that a malformed one
    /// is reported by the validation (`BadClaims`), not as an undecodable token.
    #[serde(default)]
    exp: Option<serde_json::Value>,
    /// Read under `--recipients token` only.
    #[serde(default)]
    send_to: Option<serde_json::Value>,
}

/// Most users a token's `send_to` may name: a session keeps the set for its lifetime.
pub const MAX_SEND_TO: usize = 10_000;

/// Who a token names, and until when it is good.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    pub user: UserId,
    /// The token's `exp`, unix seconds.
    pub expires_at: u64,
    /// Under `--recipients token`: whom the token's `send_to` claim lets its user send to.
    pub send_to: SendTo,
}

/// The users a token's `send_to` claim names (`--recipients token`): the app decides, when it
/// mints the token, whom its user may send to.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum SendTo {
    /// No claim (or not read): nobody, under `--recipients token`.
    #[default]
    Nobody,
    /// `["*"]`.
    Anyone,
    Only(Arc<HashSet<UserId>>),
}

impl SendTo {
    pub fn allows(&self, to: &UserId) -> bool {
        match self {
            SendTo::Nobody => false,
            SendTo::Anyone => true,
            SendTo::Only(users) => users.contains(to),
        }
    }

    /// Reads a `send_to` claim: an array of at most `MAX_SEND_TO` user ids, or `["*"]`.
    fn parse(claim: &serde_json::Value) -> Result<SendTo, AuthError> {
        let bad = |why: &str| AuthError::BadClaims(format!("send_to: {why}"));
        let serde_json::Value::Array(items) = claim else {
            return Err(bad("not an array"));
        };
        if items.len() > MAX_SEND_TO {
            return Err(bad("too many users"));
        }
        if let [serde_json::Value::String(only)] = items.as_slice()
            && only == "*"
        {
            return Ok(SendTo::Anyone);
        }
        let users = items
            .iter()
            .map(|item| match item {
                serde_json::Value::String(user) => {
                    UserId::parse(user).map_err(|_| bad("a bad user id"))
                }
                _ => Err(bad("not a string")),
            })
            .collect::<Result<HashSet<_>, _>>()?;
        Ok(SendTo::Only(Arc::new(users)))
    }
}

impl Verified {
    /// How long until the token is refused, from now: its `exp` plus the leeway tokens get at
    /// `hello` (so a session ends exactly when a new `hello` with it would be refused).
    pub fn remaining(&self) -> Duration {
        let now = jsonwebtoken::get_current_timestamp();
        Duration::from_secs(
            self.expires_at
                .saturating_add(LEEWAY_SECS)
                .saturating_sub(now),
        )
    }
}

#[derive(Serialize)]
struct MintedClaims<'a> {
    sub: &'a str,
    iat: u64,
    exp: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    iss: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    aud: Option<&'a str>,
}

impl Authenticator {
    /// Builds the verifier the config describes: HS256 from `--jwt-secret`, RS256 / ES256 from the
    /// PEM public key at `--jwt-public-key` (read now), or in `--dev` without any key an HS256
    /// secret drawn at random for this process.
    pub fn from_config(config: &Config) -> Result<Authenticator, AuthError> {
        config
            .validate_jwt()
            .map_err(|e| AuthError::Key(e.to_string()))?;
        let (alg, decoding, minting) = match (&config.jwt_secret, &config.jwt_public_key) {
            // `validate_jwt` refused a secret shorter than `MIN_JWT_SECRET_BYTES`.
            (Some(secret), None) => hs256(secret.expose().as_bytes()),
            (None, Some(path)) => public_key(path, config.jwt_alg)?,
            (None, None) => hs256(&rand::random::<[u8; 32]>()),
            (Some(_), Some(_)) => return Err(AuthError::Key("two keys configured".into())),
        };

        let mut validation = Validation::new(alg);
        validation.leeway = LEEWAY_SECS;
        validation.validate_exp = true;
        validation.validate_nbf = true;
        let mut required = vec!["exp", "sub"];
        if let Some(issuer) = &config.jwt_issuer {
            validation.set_issuer(&[issuer]);
            required.push("iss");
        }
        match &config.jwt_audience {
            Some(audience) => {
                validation.set_audience(&[audience]);
                required.push("aud");
            }
            // jsonwebtoken refuses a token carrying `aud` unless an audience is configured; Ferry
            // checks `aud` only when configured, so a token from a multi-audience issuer passes.
            None => validation.validate_aud = false,
        }
        validation.set_required_spec_claims(&required);

        Ok(Authenticator {
            alg,
            decoding,
            validation,
            minting,
            reads_send_to: config.recipients == Recipients::Token,
            issuer: config.jwt_issuer.clone(),
            audience: config.jwt_audience.clone(),
        })
    }

    /// Checks `token`'s algorithm, signature and claims, and returns the user it names (`sub`).
    pub fn verify(&self, token: &str) -> Result<UserId, AuthError> {
        self.verify_with_expiry(token).map(|verified| verified.user)
    }

    /// As `verify`, with the token's expiry.
    pub fn verify_with_expiry(&self, token: &str) -> Result<Verified, AuthError> {
        if token.is_empty() {
            return Err(AuthError::Missing);
        }
        let data = jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation)
            .map_err(AuthError::from_jwt)?;
        // An integer `exp` is read exactly (through an `f64`, one past 2^53 would move).
        let expires_at = data.claims.exp.as_ref().map_or(0, |exp| {
            exp.as_u64()
                .or_else(|| exp.as_f64().map(|exp| exp as u64))
                .unwrap_or(0)
        });
        let send_to = match &data.claims.send_to {
            Some(claim) if self.reads_send_to => SendTo::parse(claim)?,
            _ => SendTo::Nobody,
        };
        match data.claims.sub {
            Some(serde_json::Value::String(sub)) => UserId::parse(&sub)
                .map(|user| Verified {
                    user,
                    expires_at,
                    send_to,
                })
                .map_err(|e| AuthError::BadClaims(format!("sub: {e}"))),
            Some(_) => Err(AuthError::BadClaims("sub is not a string".into())),
            None => Err(AuthError::BadClaims("missing sub".into())),
        }
    }

    /// Whether `mint_dev_token` can work: the key is an HS256 secret.
    pub fn can_mint(&self) -> bool {
        self.minting.is_some()
    }

    /// Signs a token for `user` valid for `ttl` (whole seconds), carrying the configured issuer
    /// and audience. Only with an HS256 secret; for the `--dev` token endpoint and tests.
    pub fn mint_dev_token(&self, user: &UserId, ttl: Duration) -> Result<String, AuthError> {
        let key = self.minting.as_ref().ok_or_else(|| {
            AuthError::Key("tokens can only be minted with an HS256 secret".into())
        })?;
        let now = jsonwebtoken::get_current_timestamp();
        let claims = MintedClaims {
            sub: user.as_str(),
            iat: now,
            exp: now.saturating_add(ttl.as_secs()),
            iss: self.issuer.as_deref(),
            aud: self.audience.as_deref(),
        };
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, key)
            .map_err(|e| AuthError::Key(format!("signing failed: {e}")))
    }
}

impl fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Authenticator")
            .field("alg", &self.alg)
            .field("can_mint", &self.can_mint())
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .finish_non_exhaustive()
    }
}

fn hs256(secret: &[u8]) -> (Algorithm, DecodingKey, Option<EncodingKey>) {
    let minting = EncodingKey::from_secret(secret);
    (
        Algorithm::HS256,
        DecodingKey::from_secret(secret),
        Some(minting),
    )
}

/// Reads a PEM public key for RS256 or ES256 and checks it is usable for that algorithm.
fn public_key(
    path: &Path,
    alg: JwtAlg,
) -> Result<(Algorithm, DecodingKey, Option<EncodingKey>), AuthError> {
    let shown = path.display();
    let pem = std::fs::read(path).map_err(|e| AuthError::Key(format!("reading {shown}: {e}")))?;
    if pem
        .windows(b"PRIVATE KEY".len())
        .any(|w| w == b"PRIVATE KEY")
    {
        return Err(AuthError::Key(format!(
            "{shown} holds a private key; give the public key (openssl pkey -pubout)"
        )));
    }
    let (alg, key) = match alg {
        JwtAlg::Rs256 => (Algorithm::RS256, DecodingKey::from_rsa_pem(&pem)),
        JwtAlg::Es256 => (Algorithm::ES256, DecodingKey::from_ec_pem(&pem)),
        JwtAlg::Hs256 => {
            return Err(AuthError::Key(
                "HS256 takes a secret, not a key file".into(),
            ));
        }
    };
    let key = key.map_err(|e| AuthError::Key(format!("{shown} is not a {alg:?} PEM key: {e}")))?;
    // Builds the verifier once, which parses the key: an EC key on another curve than P-256 fails
    // here instead of on every token. The empty signature itself simply does not verify.
    jsonwebtoken::crypto::verify("", b"", &key, alg)
        .map_err(|e| AuthError::Key(format!("{shown} is not a {alg:?} key: {e}")))?;
    Ok((alg, key, None))
}

#[cfg(test)]
mod tests {
    use base64::Engine as _;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use jsonwebtoken::get_current_timestamp;
    use serde_json::{Value, json};

    use super::*;

    const SECRET: &str = "a-test-secret-of-at-least-32-bytes";
    const RSA_PRIVATE: &[u8] = include_bytes!("../tests/keys/rsa-private.pem");
    const EC_PRIVATE: &[u8] = include_bytes!("../tests/keys/ec-private.pem");

    fn key_path(name: &str) -> String {
        format!("{}/tests/keys/{name}", env!("CARGO_MANIFEST_DIR"))
    }

    fn auth(args: &[&str]) -> Result<Authenticator, AuthError> {
        let args = std::iter::once("ferry-gateway").chain(args.iter().copied());
        Authenticator::from_config(&Config::from_args(args).expect("arguments parse"))
    }

    fn hs256_auth(extra: &[&str]) -> Authenticator {
        auth(&[&["--jwt-secret", SECRET][..], extra].concat()).expect("HS256 authenticator")
    }

    fn rs256_auth() -> Authenticator {
        let path = key_path("rsa-public.pem");
        auth(&["--jwt-alg", "RS256", "--jwt-public-key", &path]).expect("RS256 authenticator")
    }

    fn es256_auth() -> Authenticator {
        let path = key_path("ec-public.pem");
        auth(&["--jwt-alg", "ES256", "--jwt-public-key", &path]).expect("ES256 authenticator")
    }

    fn sign(alg: Algorithm, key: &EncodingKey, claims: &Value) -> String {
        jsonwebtoken::encode(&Header::new(alg), claims, key).expect("signing")
    }

    fn hs(claims: Value) -> String {
        sign(
            Algorithm::HS256,
            &EncodingKey::from_secret(SECRET.as_bytes()),
            &claims,
        )
    }

    /// Valid claims for `alice`, with `extra` merged in (a `null` removes a claim).
    fn claims(extra: Value) -> Value {
        let mut c = json!({"sub": "alice", "exp": get_current_timestamp() + 600});
        if let (Some(c), Some(extra)) = (c.as_object_mut(), extra.as_object()) {
            for (k, v) in extra {
                if v.is_null() {
                    c.remove(k);
                } else {
                    c.insert(k.clone(), v.clone());
                }
            }
        }
        c
    }

    fn alice() -> UserId {
        UserId::parse("alice").expect("valid id")
    }

    fn bad_claims(r: Result<UserId, AuthError>) -> bool {
        matches!(r, Err(AuthError::BadClaims(_)))
    }

    #[test]
    fn hs256_good_token() {
        let a = hs256_auth(&[]);
        assert_eq!(a.verify(&hs(claims(json!({})))), Ok(alice()));
    }

    #[test]
    fn expired_tokens_are_refused_beyond_the_leeway() {
        let a = hs256_auth(&[]);
        let now = get_current_timestamp();
        assert_eq!(
            a.verify(&hs(claims(json!({"exp": now - 60})))),
            Err(AuthError::Expired)
        );
        assert_eq!(a.verify(&hs(claims(json!({"exp": now - 2})))), Ok(alice()));
        assert_eq!(
            a.verify(&hs(claims(json!({"exp": null})))),
            Err(AuthError::BadClaims("missing exp".into()))
        );
        assert!(bad_claims(
            a.verify(&hs(claims(json!({"exp": "tomorrow"}))))
        ));
    }

    #[test]
    fn wrong_secret_is_a_bad_signature() {
        let other = EncodingKey::from_secret(b"another-secret-another-secret-xx");
        let token = sign(Algorithm::HS256, &other, &claims(json!({})));
        assert_eq!(hs256_auth(&[]).verify(&token), Err(AuthError::BadSignature));
    }

    #[test]
    fn alg_none_is_refused() {
        let part = |v: Value| URL_SAFE_NO_PAD.encode(v.to_string());
        let token = format!(
            "{}.{}.",
            part(json!({"alg": "none", "typ": "JWT"})),
            part(claims(json!({})))
        );
        assert_eq!(hs256_auth(&[]).verify(&token), Err(AuthError::Malformed));
        assert_eq!(rs256_auth().verify(&token), Err(AuthError::Malformed));
        let none_lower = format!(
            "{}.{}.",
            part(json!({"alg": "None"})),
            part(claims(json!({})))
        );
        assert!(hs256_auth(&[]).verify(&none_lower).is_err());
    }

    #[test]
    fn other_algorithms_are_refused() {
        let secret = EncodingKey::from_secret(SECRET.as_bytes());
        let hs512 = sign(Algorithm::HS512, &secret, &claims(json!({})));
        assert_eq!(
            hs256_auth(&[]).verify(&hs512),
            Err(AuthError::WrongAlgorithm)
        );

        // The classic key confusion: HS256 keyed with the RS256 public key's bytes.
        let public = std::fs::read(key_path("rsa-public.pem")).expect("public key");
        let confused = sign(
            Algorithm::HS256,
            &EncodingKey::from_secret(&public),
            &claims(json!({})),
        );
        assert_eq!(
            rs256_auth().verify(&confused),
            Err(AuthError::WrongAlgorithm)
        );

        let es = EncodingKey::from_ec_pem(EC_PRIVATE).expect("EC key");
        let es256 = sign(Algorithm::ES256, &es, &claims(json!({})));
        assert_eq!(rs256_auth().verify(&es256), Err(AuthError::WrongAlgorithm));
        assert_eq!(
            hs256_auth(&[]).verify(&es256),
            Err(AuthError::WrongAlgorithm)
        );
    }

    #[test]
    fn rs256_and_es256_good_tokens() {
        let rsa = EncodingKey::from_rsa_pem(RSA_PRIVATE).expect("RSA key");
        assert_eq!(
            rs256_auth().verify(&sign(Algorithm::RS256, &rsa, &claims(json!({})))),
            Ok(alice())
        );
        let ec = EncodingKey::from_ec_pem(EC_PRIVATE).expect("EC key");
        assert_eq!(
            es256_auth().verify(&sign(Algorithm::ES256, &ec, &claims(json!({})))),
            Ok(alice())
        );

        // A valid RS256 token whose payload was swapped keeps its signature: refused.
        let token = sign(Algorithm::RS256, &rsa, &claims(json!({})));
        let mallory = sign(Algorithm::RS256, &rsa, &claims(json!({"sub": "mallory"})));
        let mut parts: Vec<&str> = token.split('.').collect();
        parts[1] = mallory.split('.').nth(1).expect("payload");
        assert_eq!(
            rs256_auth().verify(&parts.join(".")),
            Err(AuthError::BadSignature)
        );
    }

    #[test]
    fn sub_is_required_and_must_be_a_user_id() {
        let a = hs256_auth(&[]);
        assert!(bad_claims(a.verify(&hs(claims(json!({"sub": null}))))));
        assert!(bad_claims(a.verify(&hs(claims(json!({"sub": "a b"}))))));
        assert!(bad_claims(a.verify(&hs(claims(json!({"sub": ""}))))));
        assert!(bad_claims(a.verify(&hs(claims(json!({"sub": 42}))))));
        let ok = a.verify(&hs(claims(json!({"sub": "u-1@example.com"}))));
        assert_eq!(ok.map(|u| u.to_string()), Ok("u-1@example.com".to_owned()));
    }

    #[test]
    fn issuer_and_audience_are_checked_when_configured() {
        let a = hs256_auth(&["--jwt-issuer", "idp", "--jwt-audience", "ferry"]);
        let good = json!({"iss": "idp", "aud": "ferry"});
        assert_eq!(a.verify(&hs(claims(good))), Ok(alice()));
        let both = json!({"iss": "idp", "aud": ["other", "ferry"]});
        assert_eq!(a.verify(&hs(claims(both))), Ok(alice()));
        assert!(bad_claims(
            a.verify(&hs(claims(json!({"iss": "evil", "aud": "ferry"}))))
        ));
        assert!(bad_claims(
            a.verify(&hs(claims(json!({"iss": "idp", "aud": "other"}))))
        ));
        assert!(
            bad_claims(a.verify(&hs(claims(json!({"aud": "ferry"}))))),
            "iss missing"
        );
        assert!(
            bad_claims(a.verify(&hs(claims(json!({"iss": "idp"}))))),
            "aud missing"
        );
    }

    #[test]
    fn aud_is_accepted_when_no_audience_is_configured() {
        let a = hs256_auth(&[]);
        assert_eq!(
            a.verify(&hs(claims(json!({"aud": "someone-else"})))),
            Ok(alice())
        );
        assert_eq!(
            a.verify(&hs(claims(json!({"aud": ["x", "y"], "iss": "any"})))),
            Ok(alice())
        );
    }

    #[test]
    fn nbf_is_checked_when_present() {
        let a = hs256_auth(&[]);
        let now = get_current_timestamp();
        assert!(bad_claims(a.verify(&hs(claims(json!({"nbf": now + 60}))))));
        assert_eq!(
            a.verify(&hs(claims(json!({"nbf": now + 2})))),
            Ok(alice()),
            "leeway"
        );
        assert_eq!(a.verify(&hs(claims(json!({"nbf": now - 60})))), Ok(alice()));
    }

    #[test]
    fn garbage_is_missing_or_malformed() {
        let a = hs256_auth(&[]);
        assert_eq!(a.verify(""), Err(AuthError::Missing));
        for garbage in [
            "x",
            "a.b",
            "a.b.c",
            "a.b.c.d",
            "..",
            "Bearer x.y.z",
            "\u{0}.\u{0}.\u{0}",
        ] {
            assert!(a.verify(garbage).is_err(), "{garbage}");
        }
        assert_eq!(
            a.verify("e30.e30.e30"),
            Err(AuthError::Malformed),
            "header without alg"
        );
    }

    #[test]
    fn dev_mode_mints_with_a_per_process_secret() {
        let dev = auth(&["--dev"]).expect("dev authenticator");
        assert!(dev.can_mint());
        let token = dev
            .mint_dev_token(&alice(), Duration::from_secs(60))
            .expect("mint");
        assert_eq!(dev.verify(&token), Ok(alice()));
        let other = auth(&["--dev"]).expect("dev authenticator");
        assert_eq!(other.verify(&token), Err(AuthError::BadSignature));

        let a = hs256_auth(&["--jwt-issuer", "idp", "--jwt-audience", "ferry"]);
        let token = a
            .mint_dev_token(&alice(), Duration::from_secs(60))
            .expect("mint");
        assert_eq!(a.verify(&token), Ok(alice()));

        assert!(!rs256_auth().can_mint());
        let refused = rs256_auth().mint_dev_token(&alice(), Duration::from_secs(60));
        assert!(matches!(refused, Err(AuthError::Key(_))));
    }

    #[test]
    fn unusable_keys_are_refused_at_start() {
        let key_err = |alg: &str, file: &str| {
            let path = key_path(file);
            matches!(
                auth(&["--jwt-alg", alg, "--jwt-public-key", &path]),
                Err(AuthError::Key(_))
            )
        };
        assert!(key_err("RS256", "rsa-private.pem"), "private key");
        assert!(key_err("ES256", "ec-private.pem"), "private key");
        assert!(key_err("RS256", "missing.pem"));
        assert!(key_err("RS256", "README.md"));
        assert!(key_err("RS256", "ec-public.pem"));
        assert!(key_err("ES256", "rsa-public.pem"));
        assert!(
            key_err("ES256", "ec-p384-public.pem"),
            "ES256 is P-256 only"
        );
        assert!(
            matches!(auth(&[]), Err(AuthError::Key(_))),
            "no key without --dev"
        );
        let short = auth(&["--jwt-secret", &SECRET[..31]]);
        assert!(
            matches!(&short, Err(AuthError::Key(e)) if e.contains("at least 32 bytes")),
            "a 31-byte secret"
        );
    }

    #[test]
    fn debug_shows_no_key_material() {
        let shown = format!("{:?}", hs256_auth(&[]));
        assert!(
            shown.contains("HS256") && !shown.contains(SECRET),
            "{shown}"
        );
    }
}
