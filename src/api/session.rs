//! Browser sessions for the pages: logging in from the page puts the access
//! token in an HttpOnly, SameSite=Strict cookie, so neither other origins
//! nor the page's own scripts can read it.
//!
//! A cookie is sent by the browser on its own, so every state-changing
//! request authenticated by it must prove it comes from the pages: it
//! carries the session's CSRF token in `X-CSRF-Token` (a page script gets
//! it from `GET /api/shardflow/session`, which other origins cannot read),
//! and its Origin (or, without one, its Referer) names this server.
//! Requests with `X-Authorization: Bearer` are not affected: a browser never
//! adds that header by itself.

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde_json::{json, Value};

use super::auth::Auth;
use super::{check_login, ApiError, ApiResult, ApiState, Caller};

/// The session cookie's name.
pub const COOKIE: &str = "shardflow_session";

/// The header a page sends its CSRF token in.
pub const CSRF_HEADER: &str = "x-csrf-token";

/// The session token from the request's cookies, if any.
pub fn cookie_token(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .map(|(_, value)| value.trim().to_string())
        .filter(|value| !value.is_empty())
}

/// Why a cookie-authenticated, state-changing request is refused, if it
/// is: a foreign or missing origin, or a missing or wrong CSRF token.
pub fn check_forgery(auth: &Auth, token_id: &str, headers: &HeaderMap) -> Result<(), &'static str> {
    same_origin(headers)?;
    let given = headers
        .get(CSRF_HEADER)
        .and_then(|v| v.to_str().ok())
        .ok_or("the X-CSRF-Token header is missing")?;
    if auth.csrf_matches(token_id, given) {
        Ok(())
    } else {
        Err("the X-CSRF-Token header does not match the session")
    }
}

/// Whether Origin (or, when a browser sent none, Referer) names the host
/// the request was sent to.
pub(super) fn same_origin(headers: &HeaderMap) -> Result<(), &'static str> {
    let host = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .ok_or("the request has no Host header")?;
    let source = headers
        .get(header::ORIGIN)
        .or_else(|| headers.get(header::REFERER))
        .and_then(|v| v.to_str().ok())
        .ok_or("the request has neither Origin nor Referer")?;
    let authority = source
        .strip_prefix("http://")
        .or_else(|| source.strip_prefix("https://"))
        .map(|rest| rest.split(['/', '?', '#']).next().unwrap_or_default());
    match authority {
        Some(authority) if authority.eq_ignore_ascii_case(host) => Ok(()),
        _ => Err("the request comes from another origin"),
    }
}

/// Whether the page was reached over TLS (served by shardflow itself, or
/// through a proxy that says so), for the cookie's Secure attribute.
fn over_tls(state: &ApiState, headers: &HeaderMap) -> bool {
    if state.serves_tls {
        return true;
    }
    let says = |name: &str, value: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.to_ascii_lowercase().starts_with(value))
    };
    says("origin", "https://") || says("x-forwarded-proto", "https")
}

fn cookie(value: &str, max_age: u64, secure: bool) -> HeaderValue {
    let secure = if secure { "; Secure" } else { "" };
    let text =
        format!("{COOKIE}={value}; HttpOnly; SameSite=Strict; Path=/; Max-Age={max_age}{secure}");
    HeaderValue::from_str(&text).expect("a token is a valid header value")
}

/// `POST /api/shardflow/login` `{username, password}`: the same check and
/// rate limit as `/api/auth/login`; the token goes into the cookie and the
/// answer holds only the user name and the session's CSRF token.
pub async fn login(
    State(state): State<ApiState>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult<Response> {
    // Only the pages of this server may log a browser in.
    if let Err(reason) = same_origin(&headers) {
        return Err(ApiError::forbidden(format!("login refused: {reason}")));
    }
    let username = check_login(&state, &body).await?;
    let token = state.auth.issue_access(&username);
    let claims = state
        .auth
        .verify(&token)
        .map_err(|e| ApiError::internal(format!("a new token does not verify: {e}")))?;
    let answer = json!({
        "username": claims.subject,
        "csrfToken": state.auth.csrf_token(&claims.id),
        "expiresMs": claims.expires * 1000,
    });
    let set_cookie = cookie(
        &token,
        state.auth.token_ttl_secs(),
        over_tls(&state, &headers),
    );
    Ok(([(header::SET_COOKIE, set_cookie)], Json(answer)).into_response())
}

/// `GET /api/shardflow/session`: who is logged in and, for a cookie
/// session, its CSRF token (a page that was reloaded asks for it again).
pub async fn current(
    State(state): State<ApiState>,
    Extension(caller): Extension<Caller>,
) -> Json<Value> {
    let csrf = caller
        .via_cookie
        .then(|| state.auth.csrf_token(&caller.token_id));
    Json(json!({
        "username": caller.subject,
        "csrfToken": csrf,
        "expiresMs": caller.expires * 1000,
    }))
}

/// `POST /api/shardflow/logout`: revokes the token and clears the cookie.
pub async fn logout(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Extension(caller): Extension<Caller>,
) -> Response {
    state.auth.revoke(&caller.token_id, caller.expires);
    let clear = cookie("", 0, over_tls(&state, &headers));
    (
        StatusCode::OK,
        [(header::SET_COOKIE, clear)],
        Json(json!({"loggedOut": true})),
    )
        .into_response()
}
