//! The HTTP API: the subset of ThingsBoard's REST API that the walkthrough
//! and the `tb-rest-client` Python package use, with the same paths and JSON
//! shapes, plus `/health`, `/ready` and `/metrics`, shardflow's own
//! endpoints under `/api/shardflow/`, and the browser pages at `/`.
//!
//! The API reads the store and, for attribute saves and deletes, hands an
//! ATTRIBUTES_UPDATED or ATTRIBUTES_DELETED message to the rule engine.
//! `/api/...` needs a token, as `X-Authorization: Bearer` or, for the
//! pages, the session cookie (with a CSRF token on every POST and DELETE);
//! the probes and metrics do not.

pub mod auth;
mod integrations;
mod live;
mod rules;
mod session;
pub mod tls;
mod ui;

pub use integrations::IntegrationInfo;

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, RawQuery, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Extension;
use axum::{Json, Router};
use serde_json::{json, Map, Value};
use uuid::Uuid;

use crate::chain::Rules;
use crate::convert::ConverterWorker;
use crate::ingest::{entity_json, entity_metadata};
use crate::msg::{self, EntityId, EntityType, TbMsg};
use crate::replay::Replayer;
use crate::status::StatusBoard;
use crate::store::{DeadLetter, DeadLetterFilter, Entity, KvValue, Scope, Store, TsValue, Write};
use auth::Auth;

/// What the handlers share.
#[derive(Clone)]
pub struct ApiState {
    pub store: Store,
    pub rules: Arc<Rules>,
    pub auth: Arc<Auth>,
    pub status: StatusBoard,
    pub replayer: Arc<Replayer>,
    /// The converter pool, for the converter test.
    pub js: actix::Addr<ConverterWorker>,
    /// Each integration's name and stream, in config order.
    pub integrations: Arc<Vec<IntegrationInfo>>,
    /// Turns true when the service stops (ends the event streams).
    pub stopping: tokio::sync::watch::Receiver<bool>,
    /// Whether the API itself serves TLS (session cookies are then Secure).
    pub serves_tls: bool,
    /// Password checks run at once (each takes argon2's memory).
    pub password_checks: Arc<tokio::sync::Semaphore>,
    /// Host names the API answers to besides IP addresses and `localhost`.
    pub allowed_hosts: Arc<Vec<String>>,
}

/// An API error in ThingsBoard's shape: `{status, message, errorCode}`.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
    code: u16,
}

impl ApiError {
    fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            code: 31,
        }
    }

    fn not_found(message: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::NOT_FOUND,
            message: message.into(),
            code: 32,
        }
    }

    fn unauthorized(message: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::UNAUTHORIZED,
            message: message.into(),
            code: 10,
        }
    }

    fn forbidden(message: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::FORBIDDEN,
            message: message.into(),
            code: 20,
        }
    }

    /// The store failed while the change waited for its commit: it stays
    /// queued and is applied when the store recovers.
    fn unavailable() -> ApiError {
        ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            message: "the store is not writable right now (see the service log); the change \
                      is queued and will be applied once it recovers"
                .into(),
            code: 2,
        }
    }

    /// The store was already failing: the change was not taken.
    fn not_writable() -> ApiError {
        ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            message: "the store is not writable right now (see the service log and /ready); \
                      nothing was saved: send the change again once it recovers"
                .into(),
            code: 2,
        }
    }

    fn internal(error: impl std::fmt::Display) -> ApiError {
        tracing::error!(error = %error, "API request failed");
        ApiError {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            message: "internal error; see the service log".into(),
            code: 2,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({
            "status": self.status.as_u16(),
            "message": self.message,
            "errorCode": self.code,
            "timestamp": msg::now_millis(),
        });
        (self.status, Json(body)).into_response()
    }
}

type ApiResult<T> = Result<T, ApiError>;

/// Longest wait for a store commit in a request.
const STORE_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// The router with every route.
pub fn router(state: ApiState) -> Router {
    let protected = Router::new()
        .route("/api/auth/user", get(current_user))
        .route("/api/tenant/devices", get(tenant_devices))
        .route("/api/tenant/device", get(tenant_device_by_name))
        .route("/api/tenant/assets", get(tenant_assets))
        .route("/api/device/{id}", get(device_by_id))
        .route(
            "/api/plugins/telemetry/{entity_type}/{entity_id}/values/timeseries",
            get(latest_timeseries),
        )
        .route(
            "/api/plugins/telemetry/{entity_type}/{entity_id}/keys/timeseries",
            get(timeseries_keys),
        )
        .route(
            "/api/plugins/telemetry/{entity_type}/{entity_id}/values/attributes",
            get(all_attributes),
        )
        .route(
            "/api/plugins/telemetry/{entity_type}/{entity_id}/values/attributes/{scope}",
            get(scope_attributes),
        )
        .route(
            "/api/plugins/telemetry/{entity_type}/{entity_id}/attributes/{scope}",
            post(save_entity_attributes).delete(delete_entity_attributes),
        )
        .route(
            "/api/plugins/telemetry/{entity_type}/{entity_id}/{scope}",
            post(save_entity_attributes).delete(delete_entity_attributes),
        )
        .route(
            "/api/plugins/telemetry/{device_id}/{scope}",
            post(save_device_attributes).delete(delete_device_attributes),
        )
        .route("/api/shardflow/ruleChains", get(rules::rule_chains))
        .route("/api/shardflow/events", get(rules::debug_events))
        .route("/api/shardflow/session", get(session::current))
        .route("/api/shardflow/logout", post(session::logout))
        .route("/api/shardflow/live", get(live::stream))
        .route("/api/shardflow/integrations", get(integrations::status))
        .route("/api/shardflow/converters", get(integrations::converters))
        .route("/api/shardflow/converters/test", post(integrations::test))
        .route("/api/shardflow/deadLetters", get(list_dead_letters))
        .route(
            "/api/shardflow/deadLetters/replay",
            post(replay_dead_letters),
        )
        .route("/api/shardflow/deadLetters/{id}", get(dead_letter))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_token));

    Router::new()
        .route("/api/auth/login", post(login))
        .route("/api/auth/token", post(refresh))
        .route("/api/shardflow/login", post(session::login))
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .merge(ui::routes())
        .merge(protected)
        .layer(middleware::from_fn(ui::security_headers))
        .layer(middleware::from_fn_with_state(state.clone(), check_host))
        .with_state(state)
}

/// Refuses requests whose Host header names a host this server does not
/// answer to: a page of another site whose name was made to resolve to
/// this address (DNS rebinding) must not reach the API as if it were
/// same-origin. IP addresses and `localhost` are always accepted (a
/// rebinding needs a name), other names only from `[http] allowed_hosts`.
async fn check_host(State(state): State<ApiState>, request: Request, next: Next) -> Response {
    // Every Host header (and the authority of an absolute request target)
    // must be allowed; one that is not text is not.
    let mut hosts: Vec<String> = request
        .headers()
        .get_all(axum::http::header::HOST)
        .iter()
        .map(|v| v.to_str().unwrap_or("(not text)").to_string())
        .collect();
    hosts.extend(request.uri().authority().map(|a| a.to_string()));
    match hosts
        .into_iter()
        .find(|host| !host_allowed(host, &state.allowed_hosts))
    {
        Some(host) => {
            tracing::warn!(host = %host, path = %request.uri().path(), "request refused: Host is not one this server answers to");
            ApiError {
                status: StatusCode::MISDIRECTED_REQUEST,
                message: format!(
                    "this server does not answer to the host {host:?}; add it to [http] allowed_hosts"
                ),
                code: 2,
            }
            .into_response()
        }
        None => next.run(request).await,
    }
}

/// Whether `host` (a Host header: name or address, with or without port)
/// is an IP address, `localhost`, or one of `allowed`.
fn host_allowed(host: &str, allowed: &[String]) -> bool {
    let (name, port) = match host.strip_prefix('[') {
        // [IPv6] or [IPv6]:port
        Some(rest) => match rest.split_once(']') {
            Some((address, after)) => match after {
                "" => (address, None),
                _ => match after.strip_prefix(':') {
                    Some(port) => (address, Some(port)),
                    None => return false,
                },
            },
            None => return false,
        },
        None => match host.rsplit_once(':') {
            Some((name, port)) => (name, Some(port)),
            None => (host, None),
        },
    };
    if port.is_some_and(|p| p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit())) {
        return false;
    }
    let name = name.strip_suffix('.').unwrap_or(name);
    let is_ip = if host.starts_with('[') {
        name.parse::<std::net::Ipv6Addr>().is_ok()
    } else {
        name.parse::<std::net::Ipv4Addr>().is_ok()
    };
    is_ip
        || name.eq_ignore_ascii_case("localhost")
        || allowed.iter().any(|a| a.eq_ignore_ascii_case(name))
}

/// Who made a request, and how: a bearer token (API clients) or the
/// session cookie (the pages).
#[derive(Clone)]
pub struct Caller {
    pub subject: String,
    pub token_id: String,
    pub expires: i64,
    pub via_cookie: bool,
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get("x-authorization")
        .or_else(|| headers.get("authorization"))
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
}

/// Lets a request through with a valid access token: from
/// `X-Authorization: Bearer` as is, or from the session cookie with, for a
/// state-changing method, the session's CSRF token and a same-origin
/// Origin (or Referer).
async fn require_token(
    State(state): State<ApiState>,
    mut request: Request,
    next: Next,
) -> Response {
    let headers = request.headers();
    let (token, via_cookie) = match (bearer(headers), session::cookie_token(headers)) {
        (Some(token), _) => (token.to_string(), false),
        (None, Some(token)) => (token, true),
        (None, None) => {
            return ApiError::unauthorized(
                "Authentication failed: X-Authorization: Bearer <token> is missing",
            )
            .into_response();
        }
    };
    let claims = match state.auth.verify(&token) {
        Ok(claims) if !claims.refresh => claims,
        Ok(_) => {
            return ApiError::unauthorized("a refresh token cannot be used for API calls")
                .into_response()
        }
        Err(reason) => {
            let mut error = ApiError::unauthorized(format!("Authentication failed: {reason}"));
            if reason.contains("expired") {
                error.code = 11;
            }
            return error.into_response();
        }
    };
    if via_cookie && !request.method().is_safe() {
        if let Err(reason) = session::check_forgery(&state.auth, &claims.id, headers) {
            tracing::warn!(method = %request.method(), path = %request.uri().path(), reason, "request refused: possible cross-site request forgery");
            return ApiError::forbidden(format!("request refused: {reason}")).into_response();
        }
    }
    request.extensions_mut().insert(Caller {
        subject: claims.subject,
        token_id: claims.id,
        expires: claims.expires,
        via_cookie,
    });
    next.run(request).await
}

fn json_body(body: &Bytes) -> ApiResult<Value> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("the body is not valid JSON: {e}")))
}

async fn login(
    State(state): State<ApiState>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult<Json<Value>> {
    // API clients send no Origin or Referer; a browser sends Origin on a
    // cross-site POST (or at least a Referer), so a page of another site
    // cannot use up the failed-login limit.
    if headers.contains_key(axum::http::header::ORIGIN)
        || headers.contains_key(axum::http::header::REFERER)
    {
        if let Err(reason) = session::same_origin(&headers) {
            return Err(ApiError::forbidden(format!("login refused: {reason}")));
        }
    }
    let username = check_login(&state, &body).await?;
    Ok(Json(state.auth.issue(&username)))
}

/// Checks a `{username, password}` login body, with the failed-login rate
/// limit; returns the user name. Shared by API clients and the pages.
async fn check_login(state: &ApiState, body: &Bytes) -> ApiResult<String> {
    let body = json_body(body)?;
    let (Some(username), Some(password)) = (
        body.get("username").and_then(Value::as_str),
        body.get("password").and_then(Value::as_str),
    ) else {
        return Err(ApiError::bad_request(
            "username and password must be given as strings",
        ));
    };
    let Some(attempt) = state.auth.begin_login() else {
        return Err(ApiError {
            status: StatusCode::TOO_MANY_REQUESTS,
            message: "too many failed logins; try again in a minute".into(),
            code: 10,
        });
    };
    // argon2 takes tens of milliseconds and megabytes of memory: off the
    // reactor and a few at a time, in a task of its own that keeps its
    // place in the limit until the hash is done, also when the client
    // goes away meanwhile.
    let checks = state.password_checks.clone();
    let (user, pass) = (username.to_string(), password.to_string());
    let check = tokio::spawn(async move {
        let _permit = checks.acquire_owned().await.ok()?;
        let auth = attempt.auth().clone();
        let valid = tokio::task::spawn_blocking(move || auth.check_password(&user, &pass))
            .await
            .ok()?;
        if !valid {
            attempt.failed();
            tracing::warn!("failed login");
        }
        Some(valid)
    });
    let valid = check
        .await
        .ok()
        .flatten()
        .ok_or_else(|| ApiError::internal("the password check failed"))?;
    if !valid {
        return Err(ApiError::unauthorized("Invalid username or password"));
    }
    Ok(username.to_string())
}

async fn refresh(State(state): State<ApiState>, body: Bytes) -> ApiResult<Json<Value>> {
    let body = json_body(&body)?;
    let token = body
        .get("refreshToken")
        .and_then(Value::as_str)
        .unwrap_or_default();
    match state.auth.verify(token) {
        Ok(claims) if claims.refresh => Ok(Json(state.auth.issue(&claims.subject))),
        Ok(_) => Err(ApiError::unauthorized("not a refresh token")),
        Err(reason) => Err(ApiError::unauthorized(format!(
            "Authentication failed: {reason}"
        ))),
    }
}

async fn current_user(Extension(caller): Extension<Caller>) -> ApiResult<Json<Value>> {
    let subject = caller.subject;
    Ok(Json(json!({
        "email": subject,
        "name": subject,
        "authority": "TENANT_ADMIN",
    })))
}

/// Query parameters; repeated names keep every value.
fn query(raw: Option<String>) -> BTreeMap<String, Vec<String>> {
    let mut map: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (k, v) in form_urlencoded::parse(raw.unwrap_or_default().as_bytes()) {
        map.entry(k.into_owned()).or_default().push(v.into_owned());
    }
    map
}

fn first<'a>(q: &'a BTreeMap<String, Vec<String>>, key: &str) -> Option<&'a str> {
    q.get(key).and_then(|v| v.first()).map(String::as_str)
}

/// Keys from `keys=a,b` and `key=a&key=b`.
fn keys(q: &BTreeMap<String, Vec<String>>) -> Vec<String> {
    let mut keys: Vec<String> = q
        .get("keys")
        .into_iter()
        .flatten()
        .flat_map(|v| v.split(','))
        .chain(q.get("key").into_iter().flatten().map(String::as_str))
        .map(str::trim)
        .filter(|k| !k.is_empty())
        .map(str::to_string)
        .collect();
    keys.dedup();
    keys
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> ApiResult<T> + Send + 'static,
) -> ApiResult<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(ApiError::internal)?
}

async fn tenant_devices(
    State(state): State<ApiState>,
    RawQuery(raw): RawQuery,
) -> ApiResult<Json<Value>> {
    let q = query(raw);
    if let Some(name) = first(&q, "deviceName") {
        return device_by_name(&state, name).map(Json);
    }
    list_entities(state, EntityType::Device, q).await
}

async fn tenant_assets(
    State(state): State<ApiState>,
    RawQuery(raw): RawQuery,
) -> ApiResult<Json<Value>> {
    let q = query(raw);
    if let Some(name) = first(&q, "assetName") {
        return state
            .store
            .entity_by_name(EntityType::Asset, name)
            .map(|e| Json(entity_json(&e)))
            .ok_or_else(|| ApiError::not_found(format!("Asset with name [{name}] is not found")));
    }
    list_entities(state, EntityType::Asset, q).await
}

async fn tenant_device_by_name(
    State(state): State<ApiState>,
    RawQuery(raw): RawQuery,
) -> ApiResult<Json<Value>> {
    let q = query(raw);
    let name =
        first(&q, "deviceName").ok_or_else(|| ApiError::bad_request("deviceName is required"))?;
    device_by_name(&state, name).map(Json)
}

fn device_by_name(state: &ApiState, name: &str) -> ApiResult<Value> {
    state
        .store
        .entity_by_name(EntityType::Device, name)
        .map(|e| entity_json(&e))
        .ok_or_else(|| ApiError::not_found(format!("Device with name [{name}] is not found")))
}

async fn list_entities(
    state: ApiState,
    entity_type: EntityType,
    q: BTreeMap<String, Vec<String>>,
) -> ApiResult<Json<Value>> {
    let number = |key: &str, default: usize| -> ApiResult<usize> {
        match first(&q, key) {
            None => Ok(default),
            Some(v) => v.parse().map_err(|_| {
                ApiError::bad_request(format!("{key} must be a non-negative integer"))
            }),
        }
    };
    let page_size = number("pageSize", 10)?.clamp(1, 10_000);
    let page = number("page", 0)?;
    let text_search = first(&q, "textSearch").map(str::to_string);
    let wanted_type = first(&q, "type")
        .filter(|t| !t.is_empty())
        .map(str::to_string);
    let store = state.store.clone();
    let all = blocking(move || {
        store
            .entities(entity_type, text_search.as_deref())
            .map_err(ApiError::internal)
    })
    .await?;
    let all: Vec<Entity> = all
        .into_iter()
        .filter(|e| wanted_type.as_ref().is_none_or(|t| &e.profile == t))
        .collect();
    let total = all.len();
    let skip = page
        .checked_mul(page_size)
        .ok_or_else(|| ApiError::bad_request("page is too large"))?;
    let data: Vec<Value> = all
        .iter()
        .skip(skip)
        .take(page_size)
        .map(entity_json)
        .collect();
    Ok(Json(json!({
        "data": data,
        "totalPages": total.div_ceil(page_size),
        "totalElements": total,
        "hasNext": skip.saturating_add(page_size) < total,
    })))
}

async fn device_by_id(
    State(state): State<ApiState>,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    let entity = find_entity(&state, "DEVICE", &id)?;
    Ok(Json(entity_json(&entity)))
}

fn find_entity(state: &ApiState, entity_type: &str, id: &str) -> ApiResult<Entity> {
    let entity_type = EntityType::parse(entity_type).ok_or_else(|| {
        ApiError::bad_request(format!(
            "unsupported entity type {entity_type:?}; use DEVICE or ASSET"
        ))
    })?;
    let uuid = Uuid::parse_str(id)
        .map_err(|_| ApiError::bad_request(format!("{id:?} is not a valid UUID")))?;
    if entity_type == EntityType::Tenant {
        // The tenant is no stored entity, but nodes may store telemetry of
        // it (message counts, generated messages).
        return (uuid == msg::TENANT_ID)
            .then(|| Entity {
                id: EntityId::tenant(),
                name: "Tenant".into(),
                profile: "TENANT".into(),
                label: None,
                customer_name: None,
                group_name: None,
                created_time: 0,
            })
            .ok_or_else(|| ApiError::not_found(format!("TENANT with id [{id}] is not found")));
    }
    state
        .store
        .entity(uuid)
        .map_err(ApiError::internal)?
        .filter(|e| e.id.entity_type == entity_type)
        .ok_or_else(|| {
            ApiError::not_found(format!(
                "{} with id [{id}] is not found",
                entity_type.as_str()
            ))
        })
}

async fn latest_timeseries(
    State(state): State<ApiState>,
    Path((entity_type, entity_id)): Path<(String, String)>,
    RawQuery(raw): RawQuery,
) -> ApiResult<Json<Value>> {
    let entity = find_entity(&state, &entity_type, &entity_id)?;
    let q = query(raw);
    let strict = first(&q, "useStrictDataTypes").is_some_and(|v| v.eq_ignore_ascii_case("true"));
    let keys = keys(&q);
    let shown = move |v: &TsValue| {
        let value = if strict {
            v.value.to_json()
        } else {
            Value::String(v.value.to_text())
        };
        json!({"ts": v.ts, "value": value})
    };
    let store = state.store.clone();

    // With startTs and endTs this is ThingsBoard's history query.
    if let (Some(start), Some(end)) = (first(&q, "startTs"), first(&q, "endTs")) {
        let parse = |name: &str, v: &str| {
            v.parse::<i64>()
                .map_err(|_| ApiError::bad_request(format!("{name} must be epoch milliseconds")))
        };
        let (start, end) = (parse("startTs", start)?, parse("endTs", end)?);
        let limit = first(&q, "limit")
            .and_then(|l| l.parse().ok())
            .unwrap_or(100usize)
            .clamp(1, 100_000);
        if keys.is_empty() {
            return Err(ApiError::bad_request(
                "keys is required with startTs and endTs",
            ));
        }
        let history = blocking(move || {
            let mut out = Map::new();
            for key in keys {
                let values = store
                    .history(entity.id, &key, start, end, limit)
                    .map_err(ApiError::internal)?;
                if !values.is_empty() {
                    out.insert(key, Value::Array(values.iter().map(shown).collect()));
                }
            }
            Ok(out)
        })
        .await?;
        return Ok(Json(Value::Object(history)));
    }

    let values =
        blocking(move || store.latest(entity.id, &keys).map_err(ApiError::internal)).await?;
    let mut out = Map::new();
    for v in &values {
        out.insert(v.key.clone(), json!([shown(v)]));
    }
    Ok(Json(Value::Object(out)))
}

async fn timeseries_keys(
    State(state): State<ApiState>,
    Path((entity_type, entity_id)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    let entity = find_entity(&state, &entity_type, &entity_id)?;
    let store = state.store.clone();
    let values = blocking(move || store.latest(entity.id, &[]).map_err(ApiError::internal)).await?;
    Ok(Json(json!(values
        .into_iter()
        .map(|v| v.key)
        .collect::<Vec<_>>())))
}

fn attribute_json(values: Vec<TsValue>) -> Vec<Value> {
    values
        .into_iter()
        .map(|v| json!({"key": v.key, "value": v.value.to_json(), "lastUpdateTs": v.ts}))
        .collect()
}

async fn all_attributes(
    State(state): State<ApiState>,
    Path((entity_type, entity_id)): Path<(String, String)>,
    RawQuery(raw): RawQuery,
) -> ApiResult<Json<Value>> {
    let entity = find_entity(&state, &entity_type, &entity_id)?;
    let keys = keys(&query(raw));
    let store = state.store.clone();
    let values = blocking(move || {
        let mut all = Vec::new();
        for scope in Scope::ALL {
            all.extend(
                store
                    .attributes(entity.id, scope, &keys)
                    .map_err(ApiError::internal)?,
            );
        }
        Ok(all)
    })
    .await?;
    Ok(Json(json!(attribute_json(values))))
}

async fn scope_attributes(
    State(state): State<ApiState>,
    Path((entity_type, entity_id, scope)): Path<(String, String, String)>,
    RawQuery(raw): RawQuery,
) -> ApiResult<Json<Value>> {
    let entity = find_entity(&state, &entity_type, &entity_id)?;
    let scope = Scope::parse(&scope).ok_or_else(|| {
        ApiError::bad_request(format!(
            "invalid scope {scope:?}; use CLIENT_SCOPE, SERVER_SCOPE or SHARED_SCOPE"
        ))
    })?;
    let keys = keys(&query(raw));
    let store = state.store.clone();
    let values = blocking(move || {
        store
            .attributes(entity.id, scope, &keys)
            .map_err(ApiError::internal)
    })
    .await?;
    Ok(Json(json!(attribute_json(values))))
}

async fn save_device_attributes(
    State(state): State<ApiState>,
    Path((device_id, scope)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult<StatusCode> {
    save_attributes(state, "DEVICE", &device_id, &scope, body).await
}

async fn save_entity_attributes(
    State(state): State<ApiState>,
    Path((entity_type, entity_id, scope)): Path<(String, String, String)>,
    body: Bytes,
) -> ApiResult<StatusCode> {
    save_attributes(state, &entity_type, &entity_id, &scope, body).await
}

async fn delete_device_attributes(
    State(state): State<ApiState>,
    Path((device_id, scope)): Path<(String, String)>,
    RawQuery(raw): RawQuery,
) -> ApiResult<StatusCode> {
    delete_attributes(state, "DEVICE", &device_id, &scope, raw).await
}

async fn delete_entity_attributes(
    State(state): State<ApiState>,
    Path((entity_type, entity_id, scope)): Path<(String, String, String)>,
    RawQuery(raw): RawQuery,
) -> ApiResult<StatusCode> {
    delete_attributes(state, &entity_type, &entity_id, &scope, raw).await
}

/// A scope attributes may be changed in through the API: SERVER_SCOPE or
/// SHARED_SCOPE (client attributes come from devices).
fn writable_scope(scope: &str) -> ApiResult<Scope> {
    match Scope::parse(scope) {
        Some(Scope::Client) => Err(ApiError::bad_request(
            "Invalid scope: CLIENT_SCOPE attributes come from devices; use SERVER_SCOPE or SHARED_SCOPE",
        )),
        Some(scope) => Ok(scope),
        None => Err(ApiError::bad_request(format!(
            "invalid scope {scope:?}; use SERVER_SCOPE or SHARED_SCOPE"
        ))),
    }
}

/// Deletes attributes (`?keys=a,b`), then sends ATTRIBUTES_DELETED into
/// the root chain with the entity as originator, data
/// `{"attributes": [keys]}` and metadata `scope`, as ThingsBoard does.
async fn delete_attributes(
    state: ApiState,
    entity_type: &str,
    entity_id: &str,
    scope: &str,
    raw: Option<String>,
) -> ApiResult<StatusCode> {
    let scope = writable_scope(scope)?;
    let entity = find_entity(&state, entity_type, entity_id)?;
    let keys = keys(&query(raw));
    if keys.is_empty() {
        return Err(ApiError::bad_request(
            "keys is required: the attribute keys to delete, comma-separated",
        ));
    }
    let mut metadata = entity_metadata(&entity, "");
    metadata.insert("scope".into(), scope.as_str().into());
    let message = TbMsg::new(
        msg::ATTRIBUTES_DELETED,
        entity.id,
        metadata,
        json!({ "attributes": keys }).to_string(),
        msg::now_millis(),
    );
    let write = Write::DeleteAttributes {
        entity: entity.id,
        scope,
        keys,
    };
    commit_with_message(&state, write, message).await
}

/// Saves attributes, then sends ATTRIBUTES_UPDATED into the root chain with
/// the entity as originator.
async fn save_attributes(
    state: ApiState,
    entity_type: &str,
    entity_id: &str,
    scope: &str,
    body: Bytes,
) -> ApiResult<StatusCode> {
    let scope = writable_scope(scope)?;
    let entity = find_entity(&state, entity_type, entity_id)?;
    let Value::Object(object) = json_body(&body)? else {
        return Err(ApiError::bad_request(
            "the body must be a JSON object of attribute keys and values",
        ));
    };
    if object.is_empty() {
        return Err(ApiError::bad_request("the body has no attributes"));
    }
    let mut values = Vec::new();
    for (key, value) in &object {
        if key.trim().is_empty() {
            return Err(ApiError::bad_request("attribute keys must not be empty"));
        }
        let value = KvValue::from_json(value)
            .ok_or_else(|| ApiError::bad_request(format!("attribute {key:?} has a null value")))?;
        values.push((key.clone(), value));
    }

    let ts = msg::now_millis();
    let mut metadata = entity_metadata(&entity, "");
    metadata.insert("scope".into(), scope.as_str().into());
    let message = TbMsg::new(
        msg::ATTRIBUTES_UPDATED,
        entity.id,
        metadata,
        Value::Object(object).to_string(),
        ts,
    );
    let write = Write::Attributes {
        entity: entity.id,
        scope,
        ts,
        values,
    };
    commit_with_message(&state, write, message).await
}

/// Commits a change made through the API together with the message that
/// announces it (the outbox, so a crash cannot keep one without the
/// other), then hands the message to the root chain. Waits at most
/// [`STORE_WAIT`] for the commit.
async fn commit_with_message(
    state: &ApiState,
    write: Write,
    message: TbMsg,
) -> ApiResult<StatusCode> {
    if !state.store.is_writable() {
        return Err(ApiError::not_writable());
    }
    let writes = vec![write, crate::outbox::entry(&message)];
    // The write stays queued if the store fails meanwhile, and is
    // committed (and its message sent) once it recovers; the caller is
    // told it may not be.
    let store = state.store.clone();
    let rules = state.rules.clone();
    let committed = tokio::spawn(async move {
        let result = store.write(writes, None).await;
        if result.is_ok() {
            crate::outbox::submit(&rules, &store, message);
        }
        result
    });
    match tokio::time::timeout(STORE_WAIT, committed).await {
        Ok(Ok(result)) => result.map_err(ApiError::internal)?,
        Ok(Err(e)) => return Err(ApiError::internal(e)),
        Err(_) => return Err(ApiError::unavailable()),
    }
    Ok(StatusCode::OK)
}

fn dead_letter_json(letter: &DeadLetter, with_payload: bool) -> Value {
    use base64::Engine as _;
    let mut value = serde_json::to_value(letter).unwrap_or(Value::Null);
    if with_payload {
        value["payloadBase64"] =
            Value::String(base64::engine::general_purpose::STANDARD.encode(&letter.payload));
    }
    value["payloadBytes"] = json!(letter.payload.len());
    value
}

async fn list_dead_letters(
    State(state): State<ApiState>,
    RawQuery(raw): RawQuery,
) -> ApiResult<Json<Value>> {
    let q = query(raw);
    let limit = first(&q, "limit")
        .and_then(|l| l.parse().ok())
        .unwrap_or(100usize)
        .clamp(1, 10_000);
    let unreplayed_only = first(&q, "unreplayed").is_some_and(|v| v == "true");
    let store = state.store.clone();
    let letters = blocking(move || {
        let filter = DeadLetterFilter {
            limit,
            unreplayed_only,
            ..Default::default()
        };
        store.dead_letters(&filter).map_err(ApiError::internal)
    })
    .await?;
    Ok(Json(json!(letters
        .iter()
        .map(|l| dead_letter_json(l, false))
        .collect::<Vec<_>>())))
}

async fn dead_letter(
    State(state): State<ApiState>,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    let id: i64 = id
        .parse()
        .map_err(|_| ApiError::bad_request(format!("{id:?} is not a dead-letter id")))?;
    let store = state.store.clone();
    let letters = blocking(move || {
        let filter = DeadLetterFilter {
            ids: vec![id],
            limit: 1,
            ..Default::default()
        };
        store.dead_letters(&filter).map_err(ApiError::internal)
    })
    .await?;
    letters
        .first()
        .map(|l| Json(dead_letter_json(l, true)))
        .ok_or_else(|| ApiError::not_found(format!("dead letter {id} is not found")))
}

/// `{"ids": [..]}` and/or `{"since": epoch ms}`; an empty body replays all.
async fn replay_dead_letters(State(state): State<ApiState>, body: Bytes) -> ApiResult<Json<Value>> {
    let body = if body.is_empty() {
        json!({})
    } else {
        json_body(&body)?
    };
    let ids = match body.get("ids") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| {
                v.as_i64()
                    .ok_or_else(|| ApiError::bad_request("ids must be numbers"))
            })
            .collect::<ApiResult<Vec<i64>>>()?,
        Some(_) => return Err(ApiError::bad_request("ids must be an array of numbers")),
    };
    let since_ms = match body.get("since") {
        None | Some(Value::Null) => None,
        Some(v) => Some(
            v.as_i64()
                .ok_or_else(|| ApiError::bad_request("since must be epoch milliseconds"))?,
        ),
    };
    let filter = DeadLetterFilter {
        ids,
        since_ms,
        unreplayed_only: true,
        limit: 100_000,
    };
    let report = state
        .replayer
        .replay(filter)
        .await
        .map_err(ApiError::internal)?;
    Ok(Json(
        serde_json::to_value(report).map_err(ApiError::internal)?,
    ))
}

/// Liveness, with the rule set's version and the last reload's outcome.
async fn health(State(state): State<ApiState>) -> Json<Value> {
    Json(json!({"status": "UP", "rules": state.rules.status()}))
}

async fn ready(State(state): State<ApiState>) -> Response {
    let readiness = state.status.readiness().and_then(|()| {
        if state.store.is_writable() {
            Ok(())
        } else {
            Err(vec![
                "store: commits are failing (disk full or I/O errors); see the log".into(),
            ])
        }
    });
    match readiness {
        Ok(()) => Json(json!({"status": "READY"})).into_response(),
        Err(reasons) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "NOT_READY", "reasons": reasons})),
        )
            .into_response(),
    }
}

async fn metrics(State(state): State<ApiState>) -> Response {
    let mut text = String::new();
    let snapshot = state.status.snapshot();
    let now = msg::now_millis();
    let series: [(&str, &str, &str); 7] = [
        (
            "shardflow_records_read_total",
            "counter",
            "Records read from the shard.",
        ),
        (
            "shardflow_records_converted_total",
            "counter",
            "Records the uplink converter turned into messages.",
        ),
        (
            "shardflow_checkpoint_age_seconds",
            "gauge",
            "Time since the shard's checkpoint last moved (0 before the first).",
        ),
        (
            "shardflow_records_failed_total",
            "counter",
            "Records kept as dead letters.",
        ),
        (
            "shardflow_user_records_dropped_total",
            "counter",
            "User records of KPL aggregates dropped: hash key outside the shard's range.",
        ),
        (
            "shardflow_in_flight_records",
            "gauge",
            "Records fetched but not yet done.",
        ),
        (
            "shardflow_millis_behind_latest",
            "gauge",
            "MillisBehindLatest of the last GetRecords.",
        ),
    ];
    for (name, kind, help) in series {
        text.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n"));
        for ((integration, shard), s) in &snapshot {
            let value = match name {
                "shardflow_records_read_total" => s.records_read as f64,
                "shardflow_records_converted_total" => s.records_converted as f64,
                "shardflow_checkpoint_age_seconds" => s
                    .checkpoint_ms
                    .map_or(0.0, |at| (now - at).max(0) as f64 / 1000.0),
                "shardflow_records_failed_total" => s.records_failed as f64,
                "shardflow_user_records_dropped_total" => s.user_records_dropped as f64,
                "shardflow_in_flight_records" => s.in_flight as f64,
                _ => s.millis_behind_latest.unwrap_or(0) as f64,
            };
            text.push_str(&format!(
                "{name}{{integration=\"{}\",shard=\"{}\"}} {value}\n",
                escape_label(integration),
                escape_label(shard)
            ));
        }
    }
    let status = &state.status;
    text.push_str(
        "# HELP shardflow_records_done_total Records whose every message finished its path.\n",
    );
    text.push_str("# TYPE shardflow_records_done_total counter\n");
    text.push_str(&format!(
        "shardflow_records_done_total {}\n",
        status
            .records_done
            .load(std::sync::atomic::Ordering::Relaxed)
    ));
    text.push_str("# HELP shardflow_record_latency_seconds Record latency: from hand-over to the pipeline (handover) or from ApproximateArrivalTimestamp (arrival) until done.\n");
    text.push_str("# TYPE shardflow_record_latency_seconds summary\n");
    for (stage, histogram) in [
        ("handover", &status.handover_latency),
        ("arrival", &status.arrival_latency),
    ] {
        for q in [0.5, 0.99] {
            if let Some(value) = histogram.quantile(q) {
                text.push_str(&format!(
                    "shardflow_record_latency_seconds{{stage=\"{stage}\",quantile=\"{q}\"}} {}\n",
                    value.as_secs_f64()
                ));
            }
        }
        text.push_str(&format!(
            "shardflow_record_latency_seconds_count{{stage=\"{stage}\"}} {}\n",
            histogram.count()
        ));
    }
    text.push_str("# HELP shardflow_store_writable 1 while store commits succeed.\n");
    text.push_str("# TYPE shardflow_store_writable gauge\n");
    text.push_str(&format!(
        "shardflow_store_writable {}\n",
        state.store.is_writable() as u8
    ));
    let store = state.store.clone();
    if let Ok(Ok(count)) = tokio::task::spawn_blocking(move || store.dead_letter_count()).await {
        text.push_str("# HELP shardflow_dead_letters Dead letters not replayed.\n");
        text.push_str("# TYPE shardflow_dead_letters gauge\n");
        text.push_str(&format!("shardflow_dead_letters {count}\n"));
    }
    rules::metrics(&state, &mut text);
    let totals = &crate::status::TOTALS;
    totals.js_call.write_prometheus(
        &mut text,
        "shardflow_js_call_duration_seconds",
        "Duration of JavaScript calls (converters and script nodes).",
    );
    totals.store_commit.write_prometheus(
        &mut text,
        "shardflow_store_commit_duration_seconds",
        "Duration of store commits (a batch with its fsync).",
    );
    for (name, help, value) in [
        (
            "shardflow_downlinks_sent_total",
            "Downlink records accepted by PutRecords.",
            &totals.downlinks_sent,
        ),
        (
            "shardflow_downlinks_failed_total",
            "Downlink messages that could not be sent (routed to Failure).",
            &totals.downlinks_failed,
        ),
    ] {
        text.push_str(&format!(
            "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}\n",
            value.load(std::sync::atomic::Ordering::Relaxed)
        ));
    }
    ([("content-type", "text/plain; version=0.0.4")], text).into_response()
}

fn escape_label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::host_allowed;

    #[test]
    fn hosts_are_addresses_localhost_or_allowed_names() {
        let allowed = vec!["shardflow.example".to_string()];
        for host in [
            "127.0.0.1",
            "127.0.0.1:8080",
            "10.1.2.3:80",
            "[::1]",
            "[::1]:8080",
            "localhost:8080",
            "LOCALHOST",
            "localhost.:8080",
            "shardflow.example:443",
            "Shardflow.Example",
        ] {
            assert!(host_allowed(host, &allowed), "{host}");
        }
        for host in [
            "evil.example",
            "evil.example:8080",
            "[::1].evil.example",
            "[::1]x:80",
            "[::1",
            "127.0.0.1:1@evil.example",
            "127.0.0.1:",
            "127.0.0.1.evil.example",
            "::1",
            "",
            "(not text)",
        ] {
            assert!(!host_allowed(host, &allowed), "{host}");
        }
    }
}
