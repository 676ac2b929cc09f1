//! The service configuration (`shardflow.toml`): types, defaults and
//! validation.
//!
//! Validation collects every problem it finds, each with where it is, so a
//! user fixes a config in one pass instead of one error per start.

use std::collections::HashSet;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::Deserialize;

/// A secret value: never printed by `Debug` or `Display`.
#[derive(Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"***\"")
    }
}

/// The whole configuration, with paths resolved against the config file's
/// directory.
#[derive(Debug, Clone)]
pub struct Config {
    /// Directory of the SQLite database and the instance lock file.
    pub data_dir: PathBuf,
    /// The root rule chain file; every message enters the chain here.
    pub root_chain: PathBuf,
    pub http: HttpConfig,
    pub pipeline: PipelineConfig,
    pub js: JsConfig,
    pub dead_letters: DeadLetterConfig,
    pub rules: RulesConfig,
    pub integrations: Vec<IntegrationConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Address the HTTP API listens on.
    pub bind: String,
    /// User name for `POST /api/auth/login`.
    pub username: String,
    /// Password for `POST /api/auth/login`.
    pub password: Secret,
    /// The password as an argon2 hash (PHC string, from `shardflow
    /// hash-password`), instead of `password`.
    pub password_hash: Option<Secret>,
    /// Lifetime of an access token, in seconds.
    pub token_ttl_secs: u64,
    /// PEM certificate chain to serve the API over TLS (with `tls_key`).
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of `tls_cert`.
    pub tls_key: Option<PathBuf>,
    /// Host names (besides IP addresses and `localhost`) the API answers
    /// to in the Host header, e.g. the name of a reverse proxy.
    pub allowed_hosts: Vec<String>,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            bind: "127.0.0.1:8080".into(),
            username: "tenant@thingsboard.org".into(),
            password: Secret::new("tenant"),
            password_hash: None,
            token_ttl_secs: 9000,
            tls_cert: None,
            tls_key: None,
            allowed_hosts: Vec::new(),
        }
    }
}

/// Bounds on work in flight. They bound memory: a shard consumer stops
/// fetching while its window is full.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PipelineConfig {
    /// Records a shard may have fetched but not yet done.
    pub max_in_flight_records: usize,
    /// Payload bytes a shard may have fetched but not yet done.
    pub max_in_flight_bytes: usize,
    /// Records all shards together may have fetched but not yet done.
    pub max_in_flight_records_total: usize,
    /// Payload bytes all shards together may have in flight.
    pub max_in_flight_bytes_total: usize,
    /// How often a shard's checkpoint is written, in milliseconds.
    pub checkpoint_interval_ms: u64,
    /// How often the stream's shards are listed again to find shards made
    /// by a split or merge, in milliseconds.
    pub shard_sync_interval_ms: u64,
    /// Rule-engine arbiters (threads) the node actors are spread over;
    /// 0 means one per core.
    pub chain_threads: usize,
}

impl Default for PipelineConfig {
    fn default() -> Self {
        PipelineConfig {
            max_in_flight_records: 5_000,
            max_in_flight_bytes: 8 * 1024 * 1024,
            max_in_flight_records_total: 10_000,
            max_in_flight_bytes_total: 64 * 1024 * 1024,
            checkpoint_interval_ms: 1000,
            shard_sync_interval_ms: 10_000,
            chain_threads: 0,
        }
    }
}

/// How long dead letters are kept. Dropping them is the one place where
/// shardflow discards records on purpose, so it is logged at WARN.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeadLetterConfig {
    /// Most dead letters kept; the oldest go first. 0 keeps all.
    pub max_count: u64,
    /// Dead letters older than this many days are dropped. 0 keeps all.
    pub max_age_days: u64,
}

impl Default for DeadLetterConfig {
    fn default() -> Self {
        DeadLetterConfig {
            max_count: 1_000_000,
            max_age_days: 30,
        }
    }
}

/// The rule engine: hot reload, unknown node types, debug events.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RulesConfig {
    /// Reload chains and converters when their files change.
    pub watch: bool,
    /// Quiet time after the last change before a reload, in milliseconds.
    pub reload_debounce_ms: u64,
    /// How often the files are also compared without a change event, in
    /// milliseconds (file events do not reach every file system).
    pub reload_poll_ms: u64,
    /// `reject` (the default): a chain with a node type shardflow does not
    /// run is rejected. `failure`: such a node is loaded and sends every
    /// message to Failure.
    #[serde(deserialize_with = "unknown_nodes")]
    pub unknown_nodes: crate::chain::loader::UnknownNodes,
    /// Most debug events kept (oldest dropped first).
    pub debug_events_max: u64,
    /// Most debug events recorded per node and second.
    pub debug_events_per_second: u32,
    /// How often expired telemetry (TTL) is purged, in seconds.
    pub ttl_purge_interval_secs: u64,
}

impl Default for RulesConfig {
    fn default() -> Self {
        RulesConfig {
            watch: true,
            reload_debounce_ms: 300,
            reload_poll_ms: 5_000,
            unknown_nodes: crate::chain::loader::UnknownNodes::Reject,
            debug_events_max: 100_000,
            debug_events_per_second: 100,
            ttl_purge_interval_secs: 60,
        }
    }
}

fn unknown_nodes<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<crate::chain::loader::UnknownNodes, D::Error> {
    use crate::chain::loader::UnknownNodes;
    match String::deserialize(deserializer)?.as_str() {
        "reject" => Ok(UnknownNodes::Reject),
        "failure" => Ok(UnknownNodes::Failure),
        other => Err(serde::de::Error::custom(format!(
            "unknown_nodes = {other:?}: expected \"reject\" or \"failure\""
        ))),
    }
}

/// Limits for JavaScript converters.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JsConfig {
    /// Converter worker threads, each with its own QuickJS runtime; 0 means
    /// one per core.
    pub workers: usize,
    /// Longest time one converter call may run, in milliseconds.
    pub call_timeout_ms: u64,
    /// Memory limit of one runtime, in MiB.
    pub memory_limit_mb: usize,
    /// Largest converter or script result, as JSON text, in KiB.
    pub max_result_kb: usize,
}

impl Default for JsConfig {
    fn default() -> Self {
        JsConfig {
            workers: 0,
            call_timeout_ms: 1000,
            memory_limit_mb: 128,
            max_result_kb: 16 * 1024,
        }
    }
}

/// Where a shard starts reading when it has no checkpoint yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InitialPosition {
    Latest,
    TrimHorizon,
    /// Milliseconds since the epoch.
    AtTimestamp(i64),
}

/// One AWS Kinesis integration, with the fields of ThingsBoard's form.
#[derive(Debug, Clone)]
pub struct IntegrationConfig {
    pub name: String,
    pub uplink_converter: PathBuf,
    pub downlink_converter: Option<PathBuf>,
    pub stream_name: String,
    pub region: String,
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<Secret>,
    pub use_instance_metadata: bool,
    /// A role to assume through STS with the credentials above (or the
    /// chain's); its credentials sign the Kinesis calls.
    pub role_arn: Option<String>,
    pub external_id: Option<String>,
    pub role_session_name: Option<String>,
    /// STS endpoint for `role_arn` (default: the region's).
    pub sts_endpoint_url: Option<String>,
    pub use_enhanced_fan_out: bool,
    pub application_name: String,
    pub initial_position: InitialPosition,
    pub max_records: i32,
    pub request_timeout_ms: u64,
    pub endpoint_url: Option<String>,
}

/// The integration table as written in the file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawIntegration {
    name: String,
    uplink_converter: String,
    #[serde(default)]
    downlink_converter: Option<String>,
    stream_name: String,
    #[serde(default)]
    region: Option<String>,
    #[serde(default)]
    access_key_id: Option<String>,
    #[serde(default)]
    secret_access_key: Option<Secret>,
    #[serde(default)]
    use_instance_metadata: bool,
    #[serde(default)]
    role_arn: Option<String>,
    #[serde(default)]
    external_id: Option<String>,
    #[serde(default)]
    role_session_name: Option<String>,
    #[serde(default)]
    sts_endpoint_url: Option<String>,
    #[serde(default)]
    use_enhanced_fan_out: bool,
    #[serde(default)]
    application_name: Option<String>,
    #[serde(default)]
    initial_position: Option<String>,
    #[serde(default)]
    initial_timestamp: Option<toml::Value>,
    #[serde(default)]
    max_records: Option<i64>,
    #[serde(default)]
    request_timeout_ms: Option<u64>,
    #[serde(default)]
    endpoint_url: Option<String>,
}

/// Every problem found in a config file.
#[derive(Debug, thiserror::Error)]
#[error("{}", format_problems(.file, .problems))]
pub struct ConfigError {
    pub file: PathBuf,
    pub problems: Vec<String>,
}

fn format_problems(file: &Path, problems: &[String]) -> String {
    let mut text = format!(
        "{} problem(s) in config file {}:",
        problems.len(),
        file.display()
    );
    for problem in problems {
        text.push_str("\n  - ");
        text.push_str(problem);
    }
    text
}

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: path.to_path_buf(),
            problems: vec![format!("cannot read the file: {e}")],
        })?;
        let base = path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        let base = if base.as_os_str().is_empty() {
            PathBuf::from(".")
        } else {
            base
        };
        Config::parse(&text, &base).map_err(|problems| ConfigError {
            file: path.to_path_buf(),
            problems,
        })
    }

    /// Parses config text; relative paths are resolved against `base`.
    pub fn parse(text: &str, base: &Path) -> Result<Config, Vec<String>> {
        let mut problems = Vec::new();
        let mut table: toml::Table = match text.parse() {
            Ok(table) => table,
            // The message only: the error's source excerpt may show a secret.
            Err(e) => return Err(vec![toml_syntax_error(text, &e)]),
        };
        substitute_env(&mut table, "", &mut problems, &|name| {
            std::env::var(name).ok()
        });

        let known = [
            "data_dir",
            "root_chain",
            "http",
            "pipeline",
            "js",
            "dead_letters",
            "rules",
            "integration",
        ];
        for key in table.keys() {
            if !known.contains(&key.as_str()) {
                problems.push(format!("unknown key `{key}` (known: {})", known.join(", ")));
            }
        }

        let data_dir = string_field(&table, "data_dir", "data", &mut problems);
        let root_chain = string_field(&table, "root_chain", "rulechains/root.json", &mut problems);
        let mut http: HttpConfig = section(&table, "http", &mut problems);
        http.tls_cert = http.tls_cert.map(|p| base.join(p));
        http.tls_key = http.tls_key.map(|p| base.join(p));
        match (&http.tls_cert, &http.tls_key) {
            (Some(cert), Some(key)) => {
                if let Err(e) = crate::api::tls::server_config(cert, key) {
                    problems.push(format!("[http] tls_cert/tls_key: {e}"));
                }
            }
            (None, None) => {}
            _ => {
                problems.push("[http] tls_cert and tls_key go together: set both or neither".into())
            }
        }
        let pipeline: PipelineConfig = section(&table, "pipeline", &mut problems);
        let js: JsConfig = section(&table, "js", &mut problems);
        let dead_letters: DeadLetterConfig = section(&table, "dead_letters", &mut problems);
        let rules: RulesConfig = section(&table, "rules", &mut problems);
        if rules.reload_debounce_ms == 0 || rules.reload_poll_ms < 100 {
            problems.push(
                "[rules] reload_debounce_ms must be > 0 and reload_poll_ms at least 100".into(),
            );
        }
        if rules.ttl_purge_interval_secs == 0 {
            problems.push("[rules] ttl_purge_interval_secs must be > 0".into());
        }

        if http.bind.parse::<SocketAddr>().is_err() {
            problems.push(format!(
                "[http] bind = {:?} is not an address like 127.0.0.1:8080",
                http.bind
            ));
        }
        let exposed = http
            .bind
            .parse::<SocketAddr>()
            .is_ok_and(|a| !a.ip().is_loopback());
        let password_given = table.get("http").and_then(|h| h.get("password")).is_some();
        let default_password = match &http.password_hash {
            Some(hash) => {
                if password_given {
                    problems.push(
                        "[http] password and password_hash: set one of them, not both".into(),
                    );
                }
                match crate::api::auth::parse_hash(hash.expose()) {
                    Ok(()) => crate::api::auth::hash_matches(
                        hash.expose(),
                        HttpConfig::default().password.expose(),
                    ),
                    Err(e) => {
                        problems.push(format!("[http] password_hash: {e}"));
                        false
                    }
                }
            }
            None => http.password == HttpConfig::default().password,
        };
        if exposed && default_password {
            problems.push(format!(
                "[http] bind = {:?} is reachable from other hosts: set a password other than the default",
                http.bind
            ));
        }
        if http.username.is_empty() || http.password.is_empty() {
            problems.push("[http] username and password must not be empty".into());
        }
        if http.token_ttl_secs < 60 {
            problems.push(format!(
                "[http] token_ttl_secs = {} is too short: tokens would expire before use (at least 60)",
                http.token_ttl_secs
            ));
        }
        if pipeline.checkpoint_interval_ms == 0 || pipeline.shard_sync_interval_ms < 100 {
            problems.push(
                "[pipeline] checkpoint_interval_ms must be > 0 and shard_sync_interval_ms at least 100"
                    .into(),
            );
        }
        if pipeline.max_in_flight_records_total == 0 || pipeline.max_in_flight_bytes_total == 0 {
            problems.push(
                "[pipeline] max_in_flight_records_total and max_in_flight_bytes_total must be > 0"
                    .into(),
            );
        }
        if pipeline.max_in_flight_records == 0 || pipeline.max_in_flight_bytes == 0 {
            problems.push(
                "[pipeline] max_in_flight_records and max_in_flight_bytes must be > 0".into(),
            );
        }
        if js.call_timeout_ms == 0 || js.memory_limit_mb == 0 || js.max_result_kb == 0 {
            problems
                .push("[js] call_timeout_ms, memory_limit_mb and max_result_kb must be > 0".into());
        }
        if js.memory_limit_mb > 1 << 20 || js.max_result_kb > 1 << 30 {
            problems.push(
                "[js] memory_limit_mb (at most 1048576) or max_result_kb is too large".into(),
            );
        }

        let integrations = integrations(&table, base, &mut problems);
        if integrations.is_empty() && problems.is_empty() {
            problems.push("no [[integration]] is configured".into());
        }

        if !problems.is_empty() {
            return Err(problems);
        }
        Ok(Config {
            data_dir: base.join(data_dir),
            root_chain: base.join(root_chain),
            http,
            pipeline,
            js,
            dead_letters,
            rules,
            integrations,
        })
    }

    /// Number of worker threads for `configured`, where 0 means per core.
    pub fn threads(configured: usize) -> usize {
        if configured > 0 {
            configured
        } else {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(2)
        }
    }
}

/// Replaces `${NAME}` in every string value with the environment variable
/// NAME, so secrets need not sit in the file. An unset variable is a
/// problem that names it and the key (never the value).
fn substitute_env(
    table: &mut toml::Table,
    path: &str,
    problems: &mut Vec<String>,
    lookup: &dyn Fn(&str) -> Option<String>,
) {
    for (key, value) in table.iter_mut() {
        let here = if path.is_empty() {
            key.clone()
        } else {
            format!("{path}.{key}")
        };
        substitute_value(value, &here, problems, lookup);
    }
}

fn substitute_value(
    value: &mut toml::Value,
    path: &str,
    problems: &mut Vec<String>,
    lookup: &dyn Fn(&str) -> Option<String>,
) {
    match value {
        toml::Value::String(text) if text.contains("${") => {
            let mut out = String::new();
            let mut rest = text.as_str();
            while let Some(start) = rest.find("${") {
                out.push_str(&rest[..start]);
                let Some(end) = rest[start..].find('}') else {
                    problems.push(format!("`{path}`: `${{` without a closing `}}`"));
                    return;
                };
                let name = &rest[start + 2..start + end];
                match lookup(name) {
                    Some(found) => out.push_str(&found),
                    None => {
                        problems.push(format!(
                            "`{path}` uses the environment variable {name}, which is not set"
                        ));
                        // Kept as written, so that checks of the value
                        // (not empty...) do not add a second, wrong problem.
                        out.push_str(&rest[start..start + end + 1]);
                    }
                }
                rest = &rest[start + end + 1..];
            }
            out.push_str(rest);
            *text = out;
        }
        toml::Value::Table(table) => substitute_env(table, path, problems, lookup),
        toml::Value::Array(items) => {
            for (i, item) in items.iter_mut().enumerate() {
                substitute_value(item, &format!("{path}[{i}]"), problems, lookup);
            }
        }
        _ => {}
    }
}

/// A URL with any `user:password@` replaced by `***@`, to show it in logs
/// and errors.
pub fn without_userinfo(url: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => {
            let separator = if scheme.is_empty() { "" } else { "://" };
            format!("{scheme}{separator}***{}", &rest[at..])
        }
        None => url.to_string(),
    }
}

/// Whether others than the owner may read the file (Unix permissions).
pub fn readable_by_others(path: &Path) -> bool {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(path).is_ok_and(|m| m.permissions().mode() & 0o044 != 0)
    }
    #[cfg(not(unix))]
    {
        let _ = path;
        false
    }
}

fn toml_syntax_error(text: &str, error: &toml::de::Error) -> String {
    match error.span() {
        Some(span) => {
            let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
            format!("not valid TOML at line {line}: {}", error.message())
        }
        None => format!("not valid TOML: {}", error.message()),
    }
}

fn string_field(
    table: &toml::Table,
    key: &str,
    default: &str,
    problems: &mut Vec<String>,
) -> String {
    match table.get(key) {
        None => default.to_string(),
        Some(toml::Value::String(s)) => s.clone(),
        Some(other) => {
            problems.push(format!(
                "`{key}` must be a string, found {}",
                other.type_str()
            ));
            default.to_string()
        }
    }
}

/// Keys whose values are never shown in errors.
const SECRET_KEYS: &[&str] = &["password", "password_hash", "secret_access_key"];

/// Checks each field of a table on its own, so that every bad field is
/// reported, by name, instead of the first one only. `base` holds values
/// for the required fields, so a lone field can be checked.
fn field_problems<T: DeserializeOwned>(
    table: &toml::Table,
    base: &toml::Table,
    label: &str,
) -> Vec<String> {
    let mut problems = Vec::new();
    for (key, value) in table {
        let mut single = base.clone();
        single.insert(key.clone(), value.clone());
        if let Err(e) = toml::Value::Table(single).try_into::<T>() {
            let message = if SECRET_KEYS.contains(&key.as_str()) {
                "must be a string (value not shown: it is a secret)".to_string()
            } else {
                e.message().to_string()
            };
            problems.push(format!("{label} `{key}`: {message}"));
        }
    }
    problems
}

fn section<T: DeserializeOwned + Default>(
    table: &toml::Table,
    key: &str,
    problems: &mut Vec<String>,
) -> T {
    let label = format!("[{key}]");
    match table.get(key) {
        None => T::default(),
        Some(toml::Value::Table(section)) => {
            let found = field_problems::<T>(section, &toml::Table::new(), &label);
            if !found.is_empty() {
                problems.extend(found);
                return T::default();
            }
            toml::Value::Table(section.clone())
                .try_into()
                .unwrap_or_else(|e: toml::de::Error| {
                    problems.push(format!("{label}: {}", e.message()));
                    T::default()
                })
        }
        Some(_) => {
            problems.push(format!("{label} must be a table"));
            T::default()
        }
    }
}

fn integrations(
    table: &toml::Table,
    base: &Path,
    problems: &mut Vec<String>,
) -> Vec<IntegrationConfig> {
    let items = match table.get("integration") {
        None => return Vec::new(),
        Some(toml::Value::Array(items)) => items.clone(),
        Some(_) => {
            problems.push("`integration` must be written as [[integration]] tables".into());
            return Vec::new();
        }
    };

    let mut names = HashSet::new();
    let mut result = Vec::new();
    for (index, item) in items.into_iter().enumerate() {
        let label = item
            .get("name")
            .and_then(|v| v.as_str())
            .map(|n| format!("[[integration]] #{} ({n})", index + 1))
            .unwrap_or_else(|| format!("[[integration]] #{}", index + 1));
        let Some(table) = item.as_table() else {
            problems.push(format!("{label} must be a table"));
            continue;
        };
        let mut missing = false;
        for required in ["name", "uplink_converter", "stream_name"] {
            if !table.contains_key(required) {
                problems.push(format!("{label}: `{required}` is missing"));
                missing = true;
            }
        }
        let required: toml::Table = ["name", "uplink_converter", "stream_name"]
            .into_iter()
            .map(|k| (k.to_string(), toml::Value::String("x".into())))
            .collect();
        let found = field_problems::<RawIntegration>(table, &required, &label);
        if missing || !found.is_empty() {
            problems.extend(found);
            continue;
        }
        let raw: RawIntegration = match item.try_into() {
            Ok(raw) => raw,
            Err(e) => {
                problems.push(format!("{label}: {}", e.message()));
                continue;
            }
        };
        if !names.insert(raw.name.clone()) {
            problems.push(format!("{label}: the name `{}` is used twice", raw.name));
        }
        if let Some(integration) = integration(raw, base, &label, problems) {
            result.push(integration);
        }
    }
    result
}

fn integration(
    raw: RawIntegration,
    base: &Path,
    label: &str,
    problems: &mut Vec<String>,
) -> Option<IntegrationConfig> {
    let before = problems.len();
    if raw.name.trim().is_empty() {
        problems.push(format!("{label}: `name` must not be empty"));
    }
    if raw.stream_name.trim().is_empty() {
        problems.push(format!("{label}: `stream_name` must not be empty"));
    }
    if raw.region.as_deref().is_some_and(|r| r.trim().is_empty()) {
        problems.push(format!(
            "{label}: `region` must not be empty (leave it out for us-east-1)"
        ));
    }
    if raw.initial_timestamp.is_some() && raw.initial_position.as_deref() != Some("AT_TIMESTAMP") {
        problems.push(format!(
            "{label}: `initial_timestamp` is only used with initial_position = \"AT_TIMESTAMP\""
        ));
    }

    let initial_position = match (raw.initial_position.as_deref(), &raw.initial_timestamp) {
        (None | Some("LATEST"), _) => InitialPosition::Latest,
        (Some("TRIM_HORIZON"), _) => InitialPosition::TrimHorizon,
        (Some("AT_TIMESTAMP"), Some(ts)) => match parse_timestamp(ts) {
            Some(ms) => InitialPosition::AtTimestamp(ms),
            None => {
                problems.push(format!(
                    "{label}: `initial_timestamp` must be epoch milliseconds or an RFC 3339 time like 2026-01-31T12:00:00Z"
                ));
                InitialPosition::Latest
            }
        },
        (Some("AT_TIMESTAMP"), None) => {
            problems.push(format!(
                "{label}: initial_position = \"AT_TIMESTAMP\" needs `initial_timestamp`"
            ));
            InitialPosition::Latest
        }
        (Some(other), _) => {
            problems.push(format!(
                "{label}: initial_position = {other:?} is not one of LATEST, TRIM_HORIZON, AT_TIMESTAMP"
            ));
            InitialPosition::Latest
        }
    };

    let max_records = raw.max_records.unwrap_or(1000);
    if !(1..=10_000).contains(&max_records) {
        problems.push(format!(
            "{label}: max_records = {max_records} is outside 1..=10000 (the GetRecords limit)"
        ));
    }
    let request_timeout_ms = raw.request_timeout_ms.unwrap_or(10_000);
    if request_timeout_ms == 0 {
        problems.push(format!("{label}: request_timeout_ms must be > 0"));
    }
    if raw.access_key_id.is_some() != raw.secret_access_key.is_some() {
        problems.push(format!(
            "{label}: set both access_key_id and secret_access_key, or neither (then the AWS credential chain is used)"
        ));
    }
    if raw.use_instance_metadata && raw.access_key_id.is_some() {
        problems.push(format!(
            "{label}: use_instance_metadata = true conflicts with static access keys"
        ));
    }
    let application_name = raw
        .application_name
        .clone()
        .unwrap_or_else(|| format!("shardflow-{}", raw.name));
    // With enhanced fan-out the application name is the stream consumer's
    // name, which Kinesis restricts.
    let consumer_name_ok = (1..=128).contains(&application_name.len())
        && application_name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
    if raw.use_enhanced_fan_out && !consumer_name_ok {
        problems.push(format!(
            "{label}: with use_enhanced_fan_out = true the application name {application_name:?} is the stream consumer's name: 1 to 128 of a-z, A-Z, 0-9, _ . - (set application_name)"
        ));
    }
    for (key, url) in [
        ("endpoint_url", &raw.endpoint_url),
        ("sts_endpoint_url", &raw.sts_endpoint_url),
    ] {
        if let Some(url) = url {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                problems.push(format!(
                    "{label}: {key} = {:?} must start with http:// or https://",
                    without_userinfo(url)
                ));
            }
        }
    }
    if let Some(role) = &raw.role_arn {
        if !role.starts_with("arn:") || !role.contains(":role/") {
            problems.push(format!(
                "{label}: role_arn = {role:?} is not a role ARN like arn:aws:iam::123456789012:role/name"
            ));
        }
    } else {
        for (key, set) in [
            ("external_id", raw.external_id.is_some()),
            ("role_session_name", raw.role_session_name.is_some()),
            ("sts_endpoint_url", raw.sts_endpoint_url.is_some()),
        ] {
            if set {
                problems.push(format!("{label}: `{key}` is only used with `role_arn`"));
            }
        }
    }
    if let Some(name) = &raw.role_session_name {
        if !valid_session_name(name) {
            problems.push(format!(
                "{label}: role_session_name = {name:?} must have 2 to 64 of a-z, A-Z, 0-9 and + = , . @ _ -"
            ));
        }
    }
    if raw
        .external_id
        .as_ref()
        .is_some_and(|id| !(2..=1224).contains(&id.len()))
    {
        problems.push(format!(
            "{label}: external_id must have 2 to 1224 characters"
        ));
    }
    let uplink_converter = base.join(&raw.uplink_converter);
    if !uplink_converter.is_file() {
        problems.push(format!(
            "{label}: uplink_converter file {} does not exist",
            uplink_converter.display()
        ));
    }
    let downlink_converter = raw.downlink_converter.as_ref().map(|p| base.join(p));
    if let Some(path) = &downlink_converter {
        if !path.is_file() {
            problems.push(format!(
                "{label}: downlink_converter file {} does not exist",
                path.display()
            ));
        }
    }

    if problems.len() > before {
        return None;
    }
    Some(IntegrationConfig {
        application_name,
        name: raw.name,
        uplink_converter,
        downlink_converter,
        stream_name: raw.stream_name,
        region: raw.region.unwrap_or_else(|| "us-east-1".into()),
        access_key_id: raw.access_key_id,
        secret_access_key: raw.secret_access_key,
        use_instance_metadata: raw.use_instance_metadata,
        role_arn: raw.role_arn,
        external_id: raw.external_id,
        role_session_name: raw.role_session_name,
        sts_endpoint_url: raw.sts_endpoint_url,
        use_enhanced_fan_out: raw.use_enhanced_fan_out,
        initial_position,
        max_records: max_records.clamp(1, 10_000) as i32,
        request_timeout_ms,
        endpoint_url: raw.endpoint_url,
    })
}

/// An STS role session name: 2 to 64 of `[\w+=,.@-]`.
pub fn valid_session_name(name: &str) -> bool {
    (2..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"+=,.@_-".contains(&b))
}

/// Epoch milliseconds from an integer or an RFC 3339 UTC text.
fn parse_timestamp(value: &toml::Value) -> Option<i64> {
    match value {
        toml::Value::Integer(ms) => Some(*ms),
        toml::Value::Datetime(dt) => parse_rfc3339(&dt.to_string()),
        toml::Value::String(s) => s.parse().ok().or_else(|| parse_rfc3339(s)),
        _ => None,
    }
}

/// Epoch milliseconds from a number or an RFC 3339 UTC time.
pub fn parse_time(text: &str) -> Option<i64> {
    text.trim()
        .parse()
        .ok()
        .or_else(|| parse_rfc3339(text.trim()))
}

/// Parses `YYYY-MM-DDTHH:MM:SS[.fff]Z` (UTC only) into epoch milliseconds.
fn parse_rfc3339(text: &str) -> Option<i64> {
    let text = text
        .strip_suffix('Z')
        .or_else(|| text.strip_suffix("+00:00"))?;
    let (date, time) = text.split_once(['T', ' '])?;
    let mut d = date.split('-').map(|p| p.parse::<i64>().ok());
    let (y, m, day) = (d.next()??, d.next()??, d.next()??);
    let (hms, frac) = time.split_once('.').unwrap_or((time, "0"));
    let mut t = hms.split(':').map(|p| p.parse::<i64>().ok());
    let (h, min, s) = (t.next()??, t.next()??, t.next()??);
    let millis: i64 = format!("{:0<3}", frac).get(..3)?.parse().ok()?;
    if !(1..=12).contains(&m) || !(1..=31).contains(&day) || h > 23 || min > 59 || s > 60 {
        return None;
    }
    Some((days_from_civil(y, m, day) * 86_400 + h * 3600 + min * 60 + s) * 1000 + millis)
}

/// Days since 1970-01-01 of a proleptic Gregorian date.
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_timestamps_parse_to_epoch_millis() {
        assert_eq!(parse_rfc3339("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(
            parse_rfc3339("2019-09-26T13:14:24.270Z"),
            Some(1_569_503_664_270)
        );
        assert_eq!(parse_rfc3339("2019-13-26T13:14:24Z"), None);
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let text = r#"
            [http]
            bind = "not an address"
            [[integration]]
            name = "a"
            uplink_converter = "missing.js"
            stream_name = "s"
            initial_position = "EARLIEST"
            max_records = 0
        "#;
        let problems = Config::parse(text, dir.path()).unwrap_err();
        assert_eq!(problems.len(), 4, "{problems:#?}");
        assert!(problems.iter().any(|p| p.contains("bind")));
        assert!(problems.iter().any(|p| p.contains("EARLIEST")));
        assert!(problems.iter().any(|p| p.contains("max_records")));
        assert!(problems.iter().any(|p| p.contains("missing.js")));
    }

    #[test]
    fn bad_fields_are_named_and_all_reported_and_secrets_hidden() {
        let dir = tempfile::tempdir().unwrap();
        let text = r#"
            [http]
            password = 123456789
            [pipeline]
            chain_threads = -1
            checkpoint_intervl_ms = 5
            [[integration]]
            name = "a"
            uplink_converter = "u.js"
            stream_nam = "s"
            max_records = "500"
            secret_access_key = 42
        "#;
        let problems = Config::parse(text, dir.path()).unwrap_err();
        let all = problems.join("\n");
        assert!(!all.contains("123456789") && !all.contains("42"), "{all}");
        assert!(all.contains("`password`"), "{all}");
        assert!(all.contains("`chain_threads`"), "{all}");
        assert!(all.contains("`checkpoint_intervl_ms`"), "{all}");
        assert!(all.contains("`stream_name` is missing"), "{all}");
        assert!(all.contains("`stream_nam`"), "{all}");
        assert!(all.contains("`max_records`"), "{all}");
        assert!(all.contains("`secret_access_key`"), "{all}");
    }

    #[test]
    fn environment_variables_fill_values_and_unset_ones_are_named() {
        let mut table: toml::Table = r#"
            [http]
            password = "${SF_TEST_PASSWORD}"
            [[integration]]
            secret_access_key = "${SF_TEST_MISSING}"
        "#
        .parse()
        .unwrap();
        let mut problems = Vec::new();
        let lookup = |name: &str| (name == "SF_TEST_PASSWORD").then(|| "s3cret".to_string());
        substitute_env(&mut table, "", &mut problems, &lookup);
        assert_eq!(table["http"]["password"].as_str(), Some("s3cret"));
        assert_eq!(problems.len(), 1);
        assert!(
            problems[0].contains("SF_TEST_MISSING") && problems[0].contains("secret_access_key")
        );
    }

    #[test]
    fn urls_are_shown_without_their_credentials() {
        assert_eq!(
            without_userinfo("ftp://user:SECRET@host:1/p?q=a@b"),
            "ftp://***@host:1/p?q=a@b"
        );
        assert_eq!(
            without_userinfo("http://127.0.0.1:4567"),
            "http://127.0.0.1:4567"
        );
        assert_eq!(without_userinfo("u:SECRET@host"), "***@host");
    }

    #[test]
    fn an_unset_variable_is_the_only_problem_of_its_value() {
        let problems = Config::parse(
            "[http]\npassword = \"${SF_TEST_SURELY_UNSET_1}\"\n[[integration]]\nname = \"i\"\n\
             stream_name = \"${SF_TEST_SURELY_UNSET_2}\"\nuplink_converter = \"u.js\"\n\
             access_key_id = \"a\"\nsecret_access_key = \"s\"",
            Path::new("."),
        )
        .unwrap_err();
        assert!(
            problems.iter().all(|p| !p.contains("must not be empty")),
            "{problems:?}"
        );
        assert_eq!(
            problems.iter().filter(|p| p.contains("is not set")).count(),
            2,
            "{problems:?}"
        );
    }

    #[test]
    fn the_default_password_is_refused_beyond_loopback() {
        let problems =
            Config::parse("[http]\nbind = \"0.0.0.0:8080\"", Path::new(".")).unwrap_err();
        assert!(
            problems.iter().any(|p| p.contains("default")),
            "{problems:?}"
        );
    }

    #[test]
    fn syntax_errors_do_not_echo_the_line() {
        let problems = Config::parse("[http]\npassword = \"hunter2", Path::new(".")).unwrap_err();
        assert!(!problems[0].contains("hunter2"), "{problems:?}");
        assert!(problems[0].contains("line 2"), "{problems:?}");
    }

    #[test]
    fn assume_role_and_fan_out_settings_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("u.js"), "return {};").unwrap();
        let good = r#"
            [[integration]]
            name = "a"
            uplink_converter = "u.js"
            stream_name = "s"
            role_arn = "arn:aws-cn:iam::123456789012:role/reader"
            external_id = "ext-1"
            role_session_name = "sf.session@1"
            sts_endpoint_url = "http://127.0.0.1:1"
            use_enhanced_fan_out = true
        "#;
        let config = Config::parse(good, dir.path()).unwrap();
        let integration = &config.integrations[0];
        assert_eq!(
            integration.role_arn.as_deref(),
            Some("arn:aws-cn:iam::123456789012:role/reader")
        );
        assert!(integration.use_enhanced_fan_out);
        assert_eq!(integration.application_name, "shardflow-a");

        let bad = r#"
            [[integration]]
            name = "a b"
            uplink_converter = "u.js"
            stream_name = "s"
            role_arn = "reader"
            role_session_name = "x"
            sts_endpoint_url = "127.0.0.1:1"
            use_enhanced_fan_out = true
            [[integration]]
            name = "c"
            uplink_converter = "u.js"
            stream_name = "s"
            external_id = "ext-1"
        "#;
        let problems = Config::parse(bad, dir.path()).unwrap_err();
        let all = problems.join("\n");
        assert_eq!(problems.len(), 5, "{all}");
        assert!(all.contains("role_arn = \"reader\""), "{all}");
        assert!(all.contains("role_session_name = \"x\""), "{all}");
        assert!(all.contains("sts_endpoint_url"), "{all}");
        assert!(all.contains("stream consumer's name"), "{all}");
        assert!(
            all.contains("`external_id` is only used with `role_arn`"),
            "{all}"
        );
    }

    #[test]
    fn secrets_are_not_printed() {
        let secret = Secret::new("hunter2");
        assert_eq!(format!("{secret:?}"), "\"***\"");
    }
}
