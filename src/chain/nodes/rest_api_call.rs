//! TbRestApiCallNode: sends the message to an HTTP endpoint and emits the
//! response on `Success` (its body becomes the message data; `status`,
//! `statusCode`, `statusReason` and the response headers go into the
//! metadata), or on `Failure` for a non-2xx answer or a transport error
//! (with `error`, and `error_body` when there is one).
//!
//! The URL and header values take `${metadata}` and `$[data]` patterns.
//! `maxParallelRequestsCount` bounds the requests in flight (0: no bound);
//! `readTimeoutMs` bounds each (0: 30 s). Basic credentials are sent as
//! an Authorization header and never appear in logs, errors or debug
//! events. Proxies are not supported.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use serde_json::Value;

use super::template::substitute;
use super::{failure, flag, success, NodeOutput};
use crate::chain::{Envelope, Services};
use crate::config::Secret;

/// The timeout of a call with `readTimeoutMs` 0.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// The most response bytes kept as message data.
const MAX_BODY: usize = 16 << 20;

#[derive(Debug, Clone)]
pub struct Config {
    pub url: String,
    pub method: reqwest::Method,
    pub headers: BTreeMap<String, String>,
    pub timeout: Duration,
    pub ignore_body: bool,
    pub plain_text: bool,
    pub basic: Option<(String, Secret)>,
    pub limit: Option<Arc<tokio::sync::Semaphore>>,
}

impl Config {
    pub fn parse(config: &Value) -> Result<Config, String> {
        let url = config
            .get("restEndpointUrlPattern")
            .and_then(Value::as_str)
            .filter(|u| !u.trim().is_empty())
            .ok_or("restEndpointUrlPattern is missing")?
            .to_string();
        if !url.starts_with("http://") && !url.starts_with("https://") && !url.starts_with("${") {
            return Err(format!(
                "restEndpointUrlPattern {url:?} is not an http:// or https:// URL"
            ));
        }
        let method = config
            .get("requestMethod")
            .and_then(Value::as_str)
            .unwrap_or("POST");
        let method = match method.to_ascii_uppercase().as_str() {
            m @ ("GET" | "POST" | "PUT" | "DELETE" | "PATCH" | "HEAD" | "OPTIONS") => {
                reqwest::Method::from_bytes(m.as_bytes()).map_err(|e| e.to_string())?
            }
            other => return Err(format!("requestMethod {other:?} is not an HTTP method")),
        };
        let headers = match config.get("headers") {
            None | Some(Value::Null) => BTreeMap::new(),
            Some(Value::Object(map)) => map
                .iter()
                .map(|(k, v)| match v.as_str() {
                    Some(v) => Ok((k.clone(), v.to_string())),
                    None => Err(format!("header {k:?} must have a string value")),
                })
                .collect::<Result<_, String>>()?,
            Some(other) => return Err(format!("headers must be an object, got {other}")),
        };
        if flag(config, "enableProxy", false)? {
            return Err("enableProxy is not supported by shardflow".into());
        }
        let timeout = match config.get("readTimeoutMs").and_then(Value::as_u64) {
            None | Some(0) => DEFAULT_TIMEOUT,
            Some(ms) => Duration::from_millis(ms),
        };
        let limit = match config
            .get("maxParallelRequestsCount")
            .and_then(Value::as_u64)
        {
            None | Some(0) => None,
            Some(n) => Some(Arc::new(
                tokio::sync::Semaphore::new(n.min(10_000) as usize),
            )),
        };
        Ok(Config {
            url,
            method,
            headers,
            timeout,
            ignore_body: flag(config, "ignoreRequestBody", false)?,
            plain_text: flag(config, "parseToPlainText", false)?,
            basic: basic_credentials(config)?,
            limit,
        })
    }
}

fn basic_credentials(config: &Value) -> Result<Option<(String, Secret)>, String> {
    let Some(credentials) = config.get("credentials").filter(|c| !c.is_null()) else {
        return Ok(None);
    };
    match credentials.get("type").and_then(Value::as_str) {
        None | Some("anonymous") => Ok(None),
        Some("basic") => {
            let user = credentials
                .get("username")
                .and_then(Value::as_str)
                .unwrap_or("");
            let password = credentials
                .get("password")
                .and_then(Value::as_str)
                .unwrap_or("");
            Ok(Some((user.to_string(), Secret::new(password))))
        }
        Some(other) => Err(format!(
            "credentials type {other:?} is not supported (anonymous or basic)"
        )),
    }
}

pub fn process(config: &Config, env: Envelope, services: &Services) -> NodeOutput {
    let client = services.http.clone();
    let config = config.clone();
    NodeOutput::Later(Box::pin(async move {
        let _permit = match &config.limit {
            Some(limit) => limit.clone().acquire_owned().await.ok(),
            None => None,
        };
        call(&client, &config, env).await
    }))
}

async fn call(client: &reqwest::Client, config: &Config, env: Envelope) -> Vec<(String, Envelope)> {
    let url = substitute(&config.url, &env.msg);
    let mut request = client
        .request(config.method.clone(), &url)
        .timeout(config.timeout);
    for (name, value) in &config.headers {
        request = request.header(name, substitute(value, &env.msg));
    }
    if let Some((user, password)) = &config.basic {
        let token = base64::engine::general_purpose::STANDARD
            .encode(format!("{user}:{}", password.expose()));
        request = request.header("Authorization", format!("Basic {token}"));
    }
    let sends_body = !config.ignore_body
        && !matches!(config.method, reqwest::Method::GET | reqwest::Method::HEAD);
    if sends_body {
        request = request.body(env.msg.data.clone());
    }
    let response = match request.send().await {
        Ok(response) => response,
        Err(e) => {
            // reqwest's errors name the URL, which may carry a token in
            // its query: keep only the kind of failure.
            let reason = transport_error(&e);
            return vec![failure(
                env,
                format!("request to the REST endpoint failed: {reason}"),
            )];
        }
    };
    answer(config, env, response).await
}

fn transport_error(e: &reqwest::Error) -> String {
    if e.is_timeout() {
        "timed out".into()
    } else if e.is_connect() {
        "cannot connect".into()
    } else if e.is_builder() {
        "bad URL or header".into()
    } else {
        "transport error".into()
    }
}

async fn answer(
    config: &Config,
    mut env: Envelope,
    response: reqwest::Response,
) -> Vec<(String, Envelope)> {
    let status = response.status();
    let metadata = &mut env.msg.metadata;
    metadata.insert(
        "status".into(),
        status
            .canonical_reason()
            .unwrap_or("")
            .to_ascii_uppercase()
            .replace(' ', "_"),
    );
    metadata.insert("statusCode".into(), status.as_u16().to_string());
    metadata.insert(
        "statusReason".into(),
        status.canonical_reason().unwrap_or("").to_string(),
    );
    for (name, value) in response.headers() {
        if let Ok(value) = value.to_str() {
            metadata.insert(name.as_str().to_string(), value.to_string());
        }
    }
    let body = match read_body(response).await {
        Ok(body) => body,
        Err(reason) => return vec![failure(env, reason)],
    };
    if !status.is_success() {
        env.msg.metadata.insert("error_body".into(), body);
        return vec![failure(env, format!("the REST endpoint answered {status}"))];
    }
    env.msg.data = if config.plain_text {
        match serde_json::from_str::<Value>(&body) {
            Ok(Value::String(text)) => text,
            _ => body,
        }
    } else {
        body
    };
    vec![success(env)]
}

async fn read_body(mut response: reqwest::Response) -> Result<String, String> {
    let mut body = Vec::new();
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|e| format!("reading the response failed: {}", e.without_url()))?
    {
        if body.len() + chunk.len() > MAX_BODY {
            return Err(format!(
                "the response is larger than {} MiB",
                MAX_BODY >> 20
            ));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(String::from_utf8_lossy(&body).into_owned())
}
