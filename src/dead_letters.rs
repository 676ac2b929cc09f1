//! `shardflow dlq`: list, show, purge and replay dead letters; and
//! `shardflow events`: the debug events of rule nodes.
//!
//! Listing, showing and purging open the store directly (SQLite in WAL mode
//! lets this run beside the service). Replaying needs the running service,
//! whose current converters and chain do the work: the command asks its
//! API, on the address and with the credentials of the config file.

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context as _};
use base64::Engine as _;
use serde_json::{json, Value};

use crate::cli::DlqAction;
use crate::config::Config;
use crate::store::{DeadLetter, DeadLetterFilter, Store, Write};

pub fn run(config_path: &Path, action: DlqAction) -> anyhow::Result<()> {
    let config = Config::load(config_path)?;
    match action {
        DlqAction::List { limit, unreplayed } => list(&config, limit, unreplayed),
        DlqAction::Show { id } => show(&config, id),
        DlqAction::Purge {
            ids,
            older_than_days,
            all,
        } => purge(&config, ids, older_than_days, all),
        DlqAction::Replay { ids, since } => replay(&config, ids, since),
    }
}

fn open(config: &Config) -> anyhow::Result<Store> {
    if !config.data_dir.join("shardflow.db").exists() {
        bail!(
            "no database in {}: has the service run yet?",
            config.data_dir.display()
        );
    }
    Ok(Store::open(&config.data_dir)?)
}

/// Prints debug events, newest first.
pub fn events(
    config_path: &Path,
    chain: Option<String>,
    node: Option<String>,
    limit: usize,
) -> anyhow::Result<()> {
    let config = Config::load(config_path)?;
    let store = open(&config)?;
    let events = store.debug_events(&crate::store::DebugEventFilter { chain, node, limit })?;
    if events.is_empty() {
        println!("no debug events (turn debug on for a node or chain in its export: debugMode or debugSettings)");
        return Ok(());
    }
    for e in events {
        let relation = e
            .relation
            .as_deref()
            .map(|r| format!(" -> {r}"))
            .unwrap_or_default();
        println!(
            "{}  {}  {}  {}{relation}  {} {}  {}",
            iso_time(e.ts),
            e.chain,
            e.node,
            e.direction,
            e.msg_type,
            e.originator,
            e.data
        );
        println!("    metadata {}", e.metadata);
        if let Some(error) = e.error {
            println!("    error {error}");
        }
    }
    Ok(())
}

fn list(config: &Config, limit: usize, unreplayed_only: bool) -> anyhow::Result<()> {
    let store = open(config)?;
    let letters = store.dead_letters(&DeadLetterFilter {
        limit,
        unreplayed_only,
        ..Default::default()
    })?;
    if letters.is_empty() {
        println!("no dead letters");
        return Ok(());
    }
    // Written as it goes; a reader that stops early (`| head`) ends the
    // listing, not the process with a panic.
    let mut out = std::io::stdout().lock();
    let mut lines = vec![format!(
        "{:>6}  {:<24}  {:<20}  {:<22}  {:<10}  error",
        "id", "stored", "integration", "shard", "replayed"
    )];
    for letter in &letters {
        let mut error = letter.error.replace('\n', " ");
        if error.chars().count() > 100 {
            error = error.chars().take(100).collect::<String>() + "…";
        }
        lines.push(format!(
            "{:>6}  {:<24}  {:<20}  {:<22}  {:<10}  {error}",
            letter.id,
            iso_time(letter.created_ms),
            letter.integration,
            letter.shard,
            if letter.replayed_ms.is_some() {
                "yes"
            } else {
                "no"
            },
        ));
    }
    if letters.len() == limit {
        lines.push(format!(
            "(the first {limit}; there may be more: --limit N shows more)"
        ));
    }
    for line in lines {
        if writeln!(out, "{line}").is_err() {
            return Ok(());
        }
    }
    Ok(())
}

fn show(config: &Config, id: i64) -> anyhow::Result<()> {
    let store = open(config)?;
    let letters = store.dead_letters(&DeadLetterFilter {
        ids: vec![id],
        limit: 1,
        ..Default::default()
    })?;
    let Some(letter) = letters.first() else {
        bail!("dead letter {id} is not found");
    };
    println!("{}", serde_json::to_string_pretty(&describe(letter))?);
    Ok(())
}

fn describe(letter: &DeadLetter) -> Value {
    let mut value = serde_json::to_value(letter).unwrap_or(Value::Null);
    value["stored"] = json!(iso_time(letter.created_ms));
    match std::str::from_utf8(&letter.payload) {
        Ok(text) => value["payloadText"] = json!(text),
        Err(_) => {
            value["payloadBase64"] =
                json!(base64::engine::general_purpose::STANDARD.encode(&letter.payload))
        }
    }
    value
}

fn purge(
    config: &Config,
    ids: Vec<i64>,
    older_than_days: Option<u64>,
    all: bool,
) -> anyhow::Result<()> {
    let before_ms = match (ids.is_empty(), older_than_days, all) {
        (false, None, false) => None,
        (true, Some(days), false) => Some(crate::msg::now_millis() - (days as i64) * 86_400_000),
        (true, None, true) => None,
        _ => bail!("choose one: --id ID (repeatable), --older-than-days N, or --all"),
    };
    let store = open(config)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(store.write(vec![Write::PurgeDeadLetters { ids, before_ms }], None))?;
    println!("purged");
    Ok(())
}

fn replay(config: &Config, ids: Vec<i64>, since: Option<String>) -> anyhow::Result<()> {
    let since_ms = match since {
        None => None,
        Some(text) => Some(
            crate::config::parse_time(&text)
                .with_context(|| format!("--since {text:?} is not epoch ms or RFC 3339 UTC"))?,
        ),
    };
    let service = ServiceClient::new(config)?;
    let token = token(config, &service)?;
    let (status, report) = service.post(
        "/api/shardflow/deadLetters/replay",
        Some(&token),
        &json!({"ids": ids, "since": since_ms}),
    )?;
    if status != 200 {
        bail!("replay failed ({status}): {report}");
    }
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}

/// A token for the replay: signed with the service's own key when this
/// user can read it (no password needed, so a `password_hash` config
/// works), else from a login with the configured password.
fn token(config: &Config, service: &ServiceClient) -> anyhow::Result<String> {
    let username = config.http.username.clone();
    if let Ok(auth) = crate::api::auth::Auth::from_key_file(&config.data_dir, username) {
        return Ok(auth.access_token());
    }
    if config.http.password_hash.is_some() {
        bail!(
            "cannot read the service's signing key {} (run as the service's user)",
            config.data_dir.join("jwt.key").display()
        );
    }
    let login =
        json!({"username": config.http.username, "password": config.http.password.expose()});
    let (status, body) = service.post("/api/auth/login", None, &login)?;
    if status != 200 {
        bail!(
            "login to the service at {} failed ({status}): {body}",
            service.base
        );
    }
    Ok(body["token"]
        .as_str()
        .context("the login answer has no token")?
        .to_string())
}

/// The running service's API, on the config's address, over TLS when the
/// config has a certificate. The service's own certificate is trusted
/// (besides the system's roots), whatever name it was issued for, since
/// the command talks to the address the service listens on.
struct ServiceClient {
    base: String,
    http: reqwest::blocking::Client,
}

impl ServiceClient {
    fn new(config: &Config) -> anyhow::Result<ServiceClient> {
        let mut address: SocketAddr = config.http.bind.parse()?;
        if address.ip().is_unspecified() {
            address.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
        }
        let mut builder = reqwest::blocking::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(300));
        let scheme = match &config.http.tls_cert {
            Some(cert) => {
                let pem = std::fs::read(cert)
                    .with_context(|| format!("cannot read {}", cert.display()))?;
                for cert in reqwest::Certificate::from_pem_bundle(&pem)? {
                    builder = builder.add_root_certificate(cert);
                }
                builder = builder.danger_accept_invalid_hostnames(true);
                "https"
            }
            None => "http",
        };
        Ok(ServiceClient {
            base: format!("{scheme}://{address}"),
            http: builder.build()?,
        })
    }

    /// POSTs JSON; answers (status, JSON).
    fn post(&self, path: &str, token: Option<&str>, body: &Value) -> anyhow::Result<(u16, Value)> {
        let mut request = self.http.post(format!("{}{path}", self.base)).json(body);
        if let Some(token) = token {
            request = request.header("X-Authorization", format!("Bearer {token}"));
        }
        let response = request.send().with_context(|| {
            format!("cannot reach the service at {}: is it running?", self.base)
        })?;
        let status = response.status().as_u16();
        let text = response.text()?;
        let json = serde_json::from_str(text.trim()).unwrap_or(Value::String(text));
        Ok((status, json))
    }
}

/// Epoch milliseconds as `YYYY-MM-DDTHH:MM:SS.mmmZ`.
fn iso_time(ms: i64) -> String {
    let days = ms.div_euclid(86_400_000);
    let rest = ms.rem_euclid(86_400_000);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        rest / 3_600_000,
        rest / 60_000 % 60,
        rest / 1000 % 60,
        rest % 1000
    )
}

/// The proleptic Gregorian date of a day count since 1970-01-01.
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_print_in_utc() {
        assert_eq!(iso_time(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(iso_time(1_569_503_664_270), "2019-09-26T13:14:24.270Z");
    }
}
