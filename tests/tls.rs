//! The API over TLS: served with the configured certificate and key,
//! plain HTTP refused on the same port, bad files reported by `check`.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

struct Running(std::process::Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_is_served_over_tls_with_the_configured_certificate() {
    let emulator = Emulator::start();
    let client = emulator.client().await;
    create_stream(&client, "tls", 1).await;
    let dir = tempfile::tempdir().unwrap();
    let cert =
        rcgen::generate_simple_self_signed(vec!["127.0.0.1".into(), "localhost".into()]).unwrap();
    std::fs::write(dir.path().join("cert.pem"), cert.cert.pem()).unwrap();
    std::fs::write(dir.path().join("key.pem"), cert.key_pair.serialize_pem()).unwrap();
    let mut setup = Setup::walkthrough("tls");
    setup.http_extra = "tls_cert = \"cert.pem\"\ntls_key = \"key.pem\"\n".into();
    let port = free_port();
    let config = write_config(dir.path(), &setup, &emulator.endpoint, port);
    let _service = Running(
        Command::new(binary())
            .args(["run", "--config"])
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );

    let trusted = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(cert.cert.pem().as_bytes()).unwrap())
        .build()
        .unwrap();
    let url = format!("https://localhost:{port}/health");
    let health = wait_for("the API over TLS", Duration::from_secs(60), || async {
        let response = trusted.get(&url).send().await.ok()?;
        response.json::<serde_json::Value>().await.ok()
    })
    .await;
    assert_eq!(health["status"], "UP");

    // A client that does not trust the certificate is refused, and so is
    // plain HTTP on the same port.
    assert!(reqwest::Client::new().get(&url).send().await.is_err());
    let plain = reqwest::Client::new()
        .get(format!("http://127.0.0.1:{port}/health"))
        .send()
        .await;
    assert!(plain.is_err() || !plain.unwrap().status().is_success());

    // A page session's cookie is Secure when shardflow serves TLS itself
    // (here the login names the page by Referer, not by an https Origin).
    let login = trusted
        .post(format!("https://localhost:{port}/api/shardflow/login"))
        .header("referer", format!("https://localhost:{port}/"))
        .json(&serde_json::json!({"username": "tenant@thingsboard.org", "password": "tenant"}))
        .send()
        .await
        .unwrap();
    assert_eq!(login.status(), 200);
    let cookie = login.headers()["set-cookie"].to_str().unwrap();
    assert!(cookie.contains("; Secure"), "{cookie}");

    // The dead-letter command reaches the service over TLS too.
    let (code, text) = run_binary(&["dlq", "replay"], &config);
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("\"replayed\""), "{text}");
}

#[test]
fn check_reports_unusable_certificate_files() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("cert.pem"), "not a certificate").unwrap();
    let mut setup = Setup::walkthrough("s");
    setup.http_extra = "tls_cert = \"cert.pem\"\ntls_key = \"missing.pem\"\n".into();
    let config = write_config(dir.path(), &setup, "http://127.0.0.1:1", free_port());
    let (code, text) = run_binary(&["check"], &config);
    assert_eq!(code, Some(1), "{text}");
    assert!(
        text.contains("tls_cert") && text.contains("cert.pem"),
        "{text}"
    );

    setup.http_extra = "tls_cert = \"cert.pem\"\n".into();
    let config = write_config(dir.path(), &setup, "http://127.0.0.1:1", free_port());
    let (_, text) = run_binary(&["check"], &config);
    assert!(text.contains("go together"), "{text}");
}
