//! API security as an operator meets it: the signing key file is private,
//! refresh works like ThingsBoard's and each token is only good for its
//! purpose, a config readable by others gets a WARN, secrets never reach
//! the log, and `--log-format json` logs JSON lines.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use serde_json::{json, Value};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_keys_and_logs_are_handled_with_care() {
    let emulator = Emulator::start();
    let client = emulator.client().await;
    create_stream(&client, "secure", 1).await;
    let dir = tempfile::tempdir().unwrap();
    let setup = Setup::walkthrough("secure");
    let port = free_port();
    let config = write_config(dir.path(), &setup, &emulator.endpoint, port);
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace(
            "secret_access_key = \"test\"",
            "secret_access_key = \"SUPERSECRET-KEY-123\"",
        )
        .replace("password = \"tenant\"", "password = \"hunter2-pass\"");
    std::fs::write(&config, text).unwrap();
    std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o644)).unwrap();
    let log = std::fs::File::create(dir.path().join("json.log")).unwrap();
    let mut child = Command::new(binary())
        .args(["--log-format", "json", "run", "--config"])
        .arg(&config)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();

    let http = reqwest::Client::new();
    let base = format!("http://127.0.0.1:{port}");
    let login = |password: &'static str| {
        let (http, base) = (http.clone(), base.clone());
        async move {
            let response = http
                .post(format!("{base}/api/auth/login"))
                .json(&json!({"username": "tenant@thingsboard.org", "password": password}))
                .send()
                .await
                .ok()?;
            Some((
                response.status().as_u16(),
                response.json::<Value>().await.unwrap_or_default(),
            ))
        }
    };
    let (status, pair) = wait_for("a login", Duration::from_secs(60), || async {
        login("hunter2-pass").await.filter(|(s, _)| *s == 200)
    })
    .await;
    assert_eq!(status, 200);
    assert_eq!(login("tenant").await.unwrap().0, 401);

    // The signing key: created on first start, private to the user.
    let mode = std::fs::metadata(dir.path().join("data/jwt.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "{mode:o}");

    // Refresh: the refresh token makes a new pair; an access token cannot
    // refresh, and a refresh token opens no API.
    let (access, refresh) = (
        pair["token"].as_str().unwrap(),
        pair["refreshToken"].as_str().unwrap(),
    );
    let refreshed: Value = http
        .post(format!("{base}/api/auth/token"))
        .json(&json!({"refreshToken": refresh}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let new_access = refreshed["token"].as_str().expect("a new access token");
    let devices = format!("{base}/api/tenant/devices?pageSize=10&page=0");
    let ok = http
        .get(&devices)
        .header("X-Authorization", format!("Bearer {new_access}"))
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status().as_u16(), 200);
    let wrong = http
        .post(format!("{base}/api/auth/token"))
        .json(&json!({"refreshToken": access}))
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status().as_u16(), 401);
    let wrong = http
        .get(&devices)
        .header("X-Authorization", format!("Bearer {refresh}"))
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status().as_u16(), 401);

    // The log: JSON lines, a WARN about the readable config, no secret.
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.wait();
    let log = std::fs::read_to_string(dir.path().join("json.log")).unwrap();
    assert!(
        !log.contains("SUPERSECRET-KEY-123") && !log.contains("hunter2-pass"),
        "{log}"
    );
    let lines: Vec<Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert!(lines.iter().any(|l| l["level"] == "WARN"
        && l["fields"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("readable by other users")));
    assert!(lines
        .iter()
        .any(|l| l["fields"]["message"] == "shardflow stopped"));
}

/// A login flood, cross-site logins and DNS rebinding: parallel wrong
/// passwords get no more checks than the limit, a page of another site can
/// neither log in nor use up the limit, and a Host header naming another
/// site is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_floods_foreign_origins_and_rebound_hosts_are_refused() {
    let emulator = Emulator::start();
    let client = emulator.client().await;
    create_stream(&client, "guarded", 1).await;
    let mut setup = Setup::walkthrough("guarded");
    setup.http_extra = "allowed_hosts = [\"shardflow.example\"]".into();
    let service = Service::start(&setup, &emulator).await;
    let http = service.http.clone();
    let login_url = format!("{}/api/auth/login", service.base_url);
    let right = json!({"username": "tenant@thingsboard.org", "password": "tenant"});
    let port = service.base_url.rsplit(':').next().unwrap().to_string();

    // DNS rebinding: a name the server does not answer to.
    let rebound = http
        .post(&login_url)
        .header("Host", format!("evil.example:{port}"))
        .header("Origin", format!("http://evil.example:{port}"))
        .json(&right)
        .send()
        .await
        .unwrap();
    assert_eq!(rebound.status().as_u16(), 421);
    let body: Value = rebound.json().await.unwrap();
    assert!(
        body["message"].as_str().unwrap().contains("allowed_hosts"),
        "{body}"
    );
    for host in [
        format!("shardflow.example:{port}"),
        format!("localhost:{port}"),
        format!("[::1]:{port}"),
    ] {
        let response = http
            .get(format!("{}/health", service.base_url))
            .header("Host", &host)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), 200, "{host}");
    }

    // A cross-site login (as a page's no-cors fetch would send it) is
    // refused before any password check.
    for _ in 0..12 {
        let response = http
            .post(&login_url)
            .header("Origin", "http://evil.example")
            .header("Content-Type", "text/plain")
            .body(r#"{"username": "x", "password": "y"}"#)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), 403);
    }
    let response = http.post(&login_url).json(&right).send().await.unwrap();
    assert_eq!(response.status().as_u16(), 200, "the limit is not used up");

    // Forty wrong passwords at once: at most ten are checked.
    let wrong = (0..40).map(|i| {
        let (http, url) = (http.clone(), login_url.clone());
        async move {
            http.post(url)
                .json(&json!({"username": "u", "password": format!("wrong{i}")}))
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    });
    let statuses = futures::future::join_all(wrong).await;
    let checked = statuses.iter().filter(|s| **s == 401).count();
    let refused = statuses.iter().filter(|s| **s == 429).count();
    assert_eq!(checked + refused, 40, "{statuses:?}");
    assert!(checked <= 10, "{checked} password checks: {statuses:?}");
    let response = http.post(&login_url).json(&right).send().await.unwrap();
    assert_eq!(response.status().as_u16(), 429, "locked for the minute");
}

/// Logins whose clients go away before the answer still count: the check
/// keeps its place in the limit until its hash is done, so cancelling
/// requests cannot start more password hashes than the limit allows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_logins_still_count_against_the_limit() {
    let emulator = Emulator::start();
    let client = emulator.client().await;
    create_stream(&client, "cancelled", 1).await;
    let service = Service::start(&Setup::walkthrough("cancelled"), &emulator).await;
    let login_url = format!("{}/api/auth/login", service.base_url);
    let impatient = reqwest::Client::builder()
        .timeout(std::time::Duration::from_millis(30))
        .build()
        .unwrap();
    let attempts = (0..40).map(|i| {
        let (http, url) = (impatient.clone(), login_url.clone());
        async move {
            let _ = http
                .post(url)
                .json(&json!({"username": "u", "password": format!("wrong{i}")}))
                .send()
                .await;
        }
    });
    futures::future::join_all(attempts).await;
    // The checks of the cancelled requests finish and count as failures.
    let right = json!({"username": "tenant@thingsboard.org", "password": "tenant"});
    let status = wait_for("the limit to be reached", Duration::from_secs(30), || {
        let (http, url, right) = (service.http.clone(), login_url.clone(), right.clone());
        async move {
            let status = http
                .post(url)
                .json(&right)
                .send()
                .await
                .ok()?
                .status()
                .as_u16();
            (status == 429).then_some(status)
        }
    })
    .await;
    assert_eq!(status, 429);
}
