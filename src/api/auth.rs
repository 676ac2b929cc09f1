//! JWT authentication as ThingsBoard's API does it: `POST /api/auth/login`
//! returns an access token and a refresh token (HS256 JWTs); requests carry
//! `X-Authorization: Bearer <token>`.
//!
//! The signing key is generated on first start and kept in the data
//! directory with 0600 permissions, so tokens survive a restart. The
//! password is held only as an argon2id hash: the configured hash, or a
//! hash of the configured password made at start. Checking it costs tens
//! of milliseconds by design; callers run it off the reactor.
//!
//! The browser pages hold the same access token in an HttpOnly cookie
//! instead (see `session`); each such session has a CSRF token derived
//! from its token id, and logging out revokes the token id until it
//! expires. Revocations are kept in memory, so a restart forgets them.

use std::collections::{HashMap, VecDeque};
use std::io::Write as _;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use rand::RngCore;
use serde_json::{json, Value};
use sha2::Sha256;

use crate::config::Secret;

type HmacSha256 = Hmac<Sha256>;

const REFRESH_TTL_SECS: u64 = 7 * 24 * 3600;

pub struct Auth {
    key: Vec<u8>,
    username: String,
    /// The password's argon2 hash, as a PHC string.
    password_hash: String,
    token_ttl_secs: u64,
    /// Times of recent failed logins, for rate limiting.
    failures: Mutex<LoginAttempts>,
    /// Token ids logged out, with their expiry (epoch seconds).
    revoked: Mutex<HashMap<String, i64>>,
}

/// Failed logins allowed per `FAILURE_WINDOW`; past that, logins are
/// refused (429) until the window moves on.
const MAX_FAILURES: usize = 10;
const FAILURE_WINDOW: Duration = Duration::from_secs(60);

/// Failed logins of the last `FAILURE_WINDOW`, and checks under way.
#[derive(Default)]
struct LoginAttempts {
    failed: VecDeque<Instant>,
    checking: usize,
}

/// A password check under way (see [`Auth::begin_login`]).
pub struct Attempt {
    auth: Arc<Auth>,
}

impl Attempt {
    /// The credentials the attempt is checked against.
    pub fn auth(&self) -> &Arc<Auth> {
        &self.auth
    }

    /// The password was wrong: counts as a failure for a minute.
    pub fn failed(self) {
        let mut attempts = self.auth.failures.lock().unwrap_or_else(|e| e.into_inner());
        attempts.failed.push_back(Instant::now());
        // Drop runs next and ends the check.
    }
}

impl Drop for Attempt {
    fn drop(&mut self) {
        let mut attempts = self.auth.failures.lock().unwrap_or_else(|e| e.into_inner());
        attempts.checking -= 1;
    }
}

/// A verified token's claims that matter here.
#[derive(Debug)]
pub struct Claims {
    pub subject: String,
    pub refresh: bool,
    /// The token's id (`jti`).
    pub id: String,
    /// Expiry, epoch seconds.
    pub expires: i64,
}

impl Auth {
    /// Loads the signing key from `dir`, creating it on first start.
    /// `password_hash` wins over `password` when given.
    pub fn load(
        dir: &Path,
        username: String,
        password: Secret,
        password_hash: Option<&Secret>,
        token_ttl_secs: u64,
    ) -> std::io::Result<Auth> {
        let path = dir.join("jwt.key");
        let key = match std::fs::read(&path) {
            Ok(key) if key.len() >= 32 => key,
            _ => {
                let mut key = vec![0u8; 64];
                rand::rng().fill_bytes(&mut key);
                write_private(&path, &key)?;
                key
            }
        };
        let password_hash = match password_hash {
            Some(hash) => hash.expose().to_string(),
            None => hash_password(password.expose()).map_err(std::io::Error::other)?,
        };
        Ok(Auth {
            key,
            username,
            password_hash,
            token_ttl_secs,
            failures: Mutex::new(LoginAttempts::default()),
            revoked: Mutex::new(HashMap::new()),
        })
    }

    /// The signing key of a data directory where the service already ran,
    /// to issue a token for a command of the same machine (`shardflow dlq
    /// replay`) without knowing the password.
    pub fn from_key_file(dir: &Path, username: String) -> std::io::Result<Auth> {
        let key = std::fs::read(dir.join("jwt.key"))?;
        if key.len() < 32 {
            return Err(std::io::Error::other("the signing key file is too short"));
        }
        Ok(Auth {
            key,
            username,
            password_hash: String::new(),
            token_ttl_secs: 300,
            failures: Mutex::new(LoginAttempts::default()),
            revoked: Mutex::new(HashMap::new()),
        })
    }

    /// A short-lived access token for the configured user.
    pub fn access_token(&self) -> String {
        self.sign(&self.username, self.token_ttl_secs, false)
    }

    /// Starts a password check, or refuses it when the failed logins of
    /// the last minute and the checks under way together reach the limit:
    /// a check counts before its (slow) hash is computed, so a burst of
    /// parallel logins gets no more checks than the limit allows. Record
    /// the outcome with [`Attempt::failed`]; dropping it counts as success.
    pub fn begin_login(self: &Arc<Self>) -> Option<Attempt> {
        let mut attempts = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        while attempts
            .failed
            .front()
            .is_some_and(|t| t.elapsed() > FAILURE_WINDOW)
        {
            attempts.failed.pop_front();
        }
        if attempts.failed.len() + attempts.checking >= MAX_FAILURES {
            return None;
        }
        attempts.checking += 1;
        Some(Attempt { auth: self.clone() })
    }

    /// Checks credentials against the argon2 hash (slow by design; the
    /// password is checked even for a wrong user name, so timing tells
    /// nothing about which was wrong).
    pub fn check_password(&self, username: &str, password: &str) -> bool {
        let password_ok = hash_matches(&self.password_hash, password);
        password_ok && username == self.username
    }

    /// The access token lifetime, in seconds.
    pub fn token_ttl_secs(&self) -> u64 {
        self.token_ttl_secs
    }

    /// A new access token alone (for a browser session's cookie).
    pub fn issue_access(&self, subject: &str) -> String {
        self.sign(subject, self.token_ttl_secs, false)
    }

    /// The CSRF token of the session whose token id is `token_id`: it
    /// cannot be made without the signing key, and needs no storage.
    pub fn csrf_token(&self, token_id: &str) -> String {
        self.signature(&format!("csrf.{token_id}"))
    }

    /// Compares a CSRF token given by a client in constant time.
    pub fn csrf_matches(&self, token_id: &str, given: &str) -> bool {
        let expected = self.csrf_token(token_id);
        let (a, b) = (expected.as_bytes(), given.as_bytes());
        let mut diff = a.len() ^ b.len();
        for (i, byte) in a.iter().enumerate() {
            diff |= (byte ^ b.get(i).copied().unwrap_or(0)) as usize;
        }
        diff == 0
    }

    /// Refuses the token with this id from now until it expires.
    pub fn revoke(&self, token_id: &str, expires: i64) {
        let now = crate::msg::now_millis() / 1000;
        let mut revoked = self.revoked.lock().unwrap_or_else(|e| e.into_inner());
        revoked.retain(|_, exp| *exp > now);
        revoked.insert(token_id.to_string(), expires);
    }

    fn is_revoked(&self, token_id: &str) -> bool {
        let revoked = self.revoked.lock().unwrap_or_else(|e| e.into_inner());
        revoked.contains_key(token_id)
    }

    /// A ThingsBoard-style `{token, refreshToken}` pair.
    pub fn issue(&self, subject: &str) -> Value {
        json!({
            "token": self.sign(subject, self.token_ttl_secs, false),
            "refreshToken": self.sign(subject, REFRESH_TTL_SECS, true),
        })
    }

    fn sign(&self, subject: &str, ttl: u64, refresh: bool) -> String {
        let now = crate::msg::now_millis() / 1000;
        let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"HS256","typ":"JWT"}"#);
        let mut claims = json!({
            "sub": subject,
            "iss": "shardflow",
            "iat": now,
            "exp": now + ttl as i64,
            "jti": uuid::Uuid::new_v4().to_string(),
        });
        if refresh {
            claims["scopes"] = json!(["REFRESH_TOKEN"]);
        } else {
            claims["scopes"] = json!(["TENANT_ADMIN"]);
            claims["enabled"] = json!(true);
            claims["isPublic"] = json!(false);
        }
        let payload = URL_SAFE_NO_PAD.encode(claims.to_string());
        let signing_input = format!("{header}.{payload}");
        format!("{signing_input}.{}", self.signature(&signing_input))
    }

    fn signature(&self, input: &str) -> String {
        let mut mac = HmacSha256::new_from_slice(&self.key).expect("HMAC takes any key length");
        mac.update(input.as_bytes());
        URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes())
    }

    /// Verifies a token's signature and expiry.
    pub fn verify(&self, token: &str) -> Result<Claims, &'static str> {
        let mut parts = token.split('.');
        let (Some(header), Some(payload), Some(signature), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err("malformed token");
        };
        let mut mac = HmacSha256::new_from_slice(&self.key).expect("HMAC takes any key length");
        mac.update(format!("{header}.{payload}").as_bytes());
        let signature = URL_SAFE_NO_PAD
            .decode(signature)
            .map_err(|_| "malformed token")?;
        mac.verify_slice(&signature)
            .map_err(|_| "invalid token signature")?;
        let claims: Value = URL_SAFE_NO_PAD
            .decode(payload)
            .ok()
            .and_then(|bytes| serde_json::from_slice(&bytes).ok())
            .ok_or("malformed token")?;
        let exp = claims
            .get("exp")
            .and_then(Value::as_i64)
            .ok_or("malformed token")?;
        if exp <= crate::msg::now_millis() / 1000 {
            return Err("token has expired");
        }
        let refresh = claims
            .get("scopes")
            .and_then(Value::as_array)
            .is_some_and(|s| s.iter().any(|v| v == "REFRESH_TOKEN"));
        let id = claims
            .get("jti")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        if self.is_revoked(&id) {
            return Err("the session was logged out");
        }
        Ok(Claims {
            subject: claims
                .get("sub")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string(),
            refresh,
            id,
            expires: exp,
        })
    }
}

/// An argon2id hash of `password` with a random salt, as a PHC string.
pub fn hash_password(password: &str) -> Result<String, String> {
    use argon2::password_hash::{rand_core::OsRng, PasswordHasher, SaltString};
    let salt = SaltString::generate(&mut OsRng);
    argon2::Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|hash| hash.to_string())
        .map_err(|e| format!("cannot hash the password: {e}"))
}

/// Whether `hash` is an argon2 PHC string shardflow can check passwords
/// against (the error never shows the hash).
pub fn parse_hash(hash: &str) -> Result<(), String> {
    let parsed = argon2::PasswordHash::new(hash).map_err(|e| {
        format!("not a PHC hash string ({e}); make one with `shardflow hash-password`")
    })?;
    match parsed.algorithm.as_str() {
        "argon2id" | "argon2i" | "argon2d" => Ok(()),
        other => Err(format!("the hash is {other}, not argon2")),
    }
}

/// Whether `password` matches the PHC `hash` (false for a malformed hash).
pub fn hash_matches(hash: &str, password: &str) -> bool {
    use argon2::PasswordVerifier;
    argon2::PasswordHash::new(hash).is_ok_and(|parsed| {
        argon2::Argon2::default()
            .verify_password(password.as_bytes(), &parsed)
            .is_ok()
    })
}

fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(path)?;
    file.write_all(bytes)?;
    file.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_verify_and_tampering_is_detected() {
        let dir = tempfile::tempdir().unwrap();
        let auth = Auth::load(dir.path(), "u".into(), Secret::new("p"), None, 60).unwrap();
        let pair = auth.issue("u");
        let token = pair["token"].as_str().unwrap();
        assert!(!auth.verify(token).unwrap().refresh);
        assert!(
            auth.verify(pair["refreshToken"].as_str().unwrap())
                .unwrap()
                .refresh
        );
        let forged = token.replacen('.', ".e", 1);
        assert!(auth.verify(&forged).is_err());
        assert!(auth.check_password("u", "p"));
        assert!(!auth.check_password("u", "q"));
        assert!(!auth.check_password("u", "pp"));
        assert!(!auth.check_password("v", "p"));
        assert!(auth.password_hash.starts_with("$argon2id$"));
    }

    #[test]
    fn tokens_expire() {
        let dir = tempfile::tempdir().unwrap();
        let auth = Auth::load(dir.path(), "u".into(), Secret::new("p"), None, 60).unwrap();
        let stale = auth.sign("u", 0, false);
        assert_eq!(auth.verify(&stale).unwrap_err(), "token has expired");
        assert!(auth.verify(&auth.sign("u", 60, false)).is_ok());
    }

    #[test]
    fn a_configured_hash_is_used_as_it_is() {
        let dir = tempfile::tempdir().unwrap();
        let hash = Secret::new(hash_password("s3cret").unwrap());
        let auth = Auth::load(
            dir.path(),
            "u".into(),
            Secret::new("tenant"),
            Some(&hash),
            60,
        )
        .unwrap();
        assert!(auth.check_password("u", "s3cret"));
        assert!(!auth.check_password("u", "tenant"));
        assert!(parse_hash("plain text").is_err());
        assert!(parse_hash(hash.expose()).is_ok());
    }

    #[test]
    fn csrf_tokens_belong_to_one_session_and_logout_revokes_the_token() {
        let dir = tempfile::tempdir().unwrap();
        let auth = Auth::load(dir.path(), "u".into(), Secret::new("p"), None, 60).unwrap();
        let token = auth.issue_access("u");
        let claims = auth.verify(&token).unwrap();
        let csrf = auth.csrf_token(&claims.id);
        assert!(auth.csrf_matches(&claims.id, &csrf));
        assert!(!auth.csrf_matches(&claims.id, ""));
        assert!(!auth.csrf_matches("another-session", &csrf));
        auth.revoke(&claims.id, claims.expires);
        assert_eq!(
            auth.verify(&token).unwrap_err(),
            "the session was logged out"
        );
    }

    #[test]
    fn logins_are_refused_after_ten_failures_a_minute() {
        let dir = tempfile::tempdir().unwrap();
        let auth =
            Arc::new(Auth::load(dir.path(), "u".into(), Secret::new("p"), None, 60).unwrap());
        for _ in 0..9 {
            auth.begin_login().unwrap().failed();
        }
        // Successful checks do not count.
        drop(auth.begin_login().unwrap());
        auth.begin_login().unwrap().failed();
        assert!(auth.begin_login().is_none());
    }

    #[test]
    fn checks_under_way_count_against_the_limit() {
        let dir = tempfile::tempdir().unwrap();
        let auth =
            Arc::new(Auth::load(dir.path(), "u".into(), Secret::new("p"), None, 60).unwrap());
        let under_way: Vec<_> = (0..10).map(|_| auth.begin_login().unwrap()).collect();
        assert!(auth.begin_login().is_none(), "an eleventh parallel check");
        drop(under_way);
        assert!(auth.begin_login().is_some());
    }
}
