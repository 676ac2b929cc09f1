//! Passwords as argon2 hashes: `shardflow hash-password` makes one, a
//! config holding only the hash logs in with the password, the default
//! password is refused beyond loopback also as a hash, and the dead-letter
//! command still reaches the service without the plain password.

mod common;

use std::io::Write as _;
use std::process::{Command, Stdio};

use common::*;
use serde_json::json;

fn hash(password: &str) -> String {
    let mut child = Command::new(binary())
        .arg("hash-password")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    writeln!(child.stdin.take().unwrap(), "{password}").unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(output.status.success());
    String::from_utf8(output.stdout).unwrap().trim().to_string()
}

fn with_hash(config: &std::path::Path, hash: &str, bind: Option<&str>) {
    let mut text = std::fs::read_to_string(config).unwrap().replace(
        "password = \"tenant\"",
        &format!("password_hash = \"{hash}\""),
    );
    if let Some(bind) = bind {
        text = regex::Regex::new(r#"bind = "[^"]*""#)
            .unwrap()
            .replace(&text, format!("bind = \"{bind}\""))
            .into_owned();
    }
    std::fs::write(config, text).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hashed_password_logs_in_and_the_plain_one_is_never_needed() {
    let hashed = hash("correct horse");
    assert!(hashed.starts_with("$argon2id$"), "{hashed}");

    let emulator = Emulator::start();
    let client = emulator.client().await;
    create_stream(&client, "hashed", 1).await;
    let dir = tempfile::tempdir().unwrap();
    let setup = Setup::walkthrough("hashed");
    // A first run writes the config; then the password becomes a hash.
    let service = Service::start_in(dir.path(), &setup, &emulator).await;
    let base = service.base_url.clone();
    drop(service);
    let config = dir.path().join("shardflow.toml");
    with_hash(&config, &hashed, None);
    let port = base.rsplit(':').next().unwrap();
    let mut child = Command::new(binary())
        .args(["run", "--config"])
        .arg(&config)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let http = reqwest::Client::new();
    let login = |password: &'static str| {
        let http = http.clone();
        let url = format!("http://127.0.0.1:{port}/api/auth/login");
        async move {
            http.post(url)
                .json(&json!({"username": "tenant@thingsboard.org", "password": password}))
                .send()
                .await
                .map(|r| r.status().as_u16())
                .ok()
        }
    };
    let ok = wait_for(
        "a login with the password",
        std::time::Duration::from_secs(60),
        || async { login("correct horse").await.filter(|s| *s == 200) },
    )
    .await;
    assert_eq!(ok, 200);
    assert_eq!(login("tenant").await, Some(401));

    let (code, text) = run_binary(&["dlq", "replay"], &config);
    assert_eq!(code, Some(0), "{text}");
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn a_hashed_default_password_is_refused_beyond_loopback_and_both_forms_are_one_too_many() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        &Setup::walkthrough("s"),
        "http://127.0.0.1:1",
        free_port(),
    );
    with_hash(&config, &hash("tenant"), Some("0.0.0.0:8080"));
    let (code, text) = run_binary(&["check"], &config);
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains("other than the default"), "{text}");

    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("password_hash", "password = \"x\"\npassword_hash");
    std::fs::write(&config, text).unwrap();
    let (_, text) = run_binary(&["check"], &config);
    assert!(text.contains("not both"), "{text}");

    let config = write_config(
        dir.path(),
        &Setup::walkthrough("s"),
        "http://127.0.0.1:1",
        free_port(),
    );
    with_hash(&config, "not-a-hash", None);
    let (_, text) = run_binary(&["check"], &config);
    assert!(
        text.contains("password_hash") && text.contains("hash-password"),
        "{text}"
    );
    assert!(!text.contains("not-a-hash"), "the hash is echoed: {text}");
}
