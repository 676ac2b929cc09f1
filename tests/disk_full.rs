//! A full disk: the data directory is a small tmpfs that fills up while
//! records flow. Consumption must stop (nothing acknowledged, no
//! checkpoint moved, `/ready` says why), and once the disk has room again
//! every record must be stored, none lost.
//!
//! Mounting a tmpfs needs root (CI runs as root); elsewhere the test says
//! it was skipped.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;
use serde_json::json;

const RECORDS: usize = 6_000;
const BASE_TS: i64 = 1_700_000_000_000;

const PADDED_CONVERTER: &str = r#"
var data = decodeToJson(payload);
return { deviceName: data.dev, deviceType: "counter",
         telemetry: { ts: data.ts, values: { seq: data.seq, pad: data.pad } } };
"#;

/// A tmpfs mounted for the test's life.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Option<Tmpfs> {
        std::fs::create_dir_all(dir).unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .status()
            .is_ok_and(|s| s.success());
        ok.then(|| Tmpfs(dir.to_path_buf()))
    }

    fn resize(&self, size: &str) {
        let status = Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(&self.0)
            .status()
            .unwrap();
        assert!(status.success());
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_stops_consumption_and_loses_nothing() {
    let temp = tempfile::tempdir().unwrap();
    let Some(disk) = Tmpfs::mount(&temp.path().join("data"), "3m") else {
        eprintln!("skipped: mounting a tmpfs needs root");
        return;
    };
    let emulator = Emulator::start();
    let client = emulator.client().await;
    create_stream(&client, "full", 1).await;
    let mut setup = Setup::walkthrough("full");
    setup.uplink_converter = PADDED_CONVERTER.into();
    let mut service = Service::start_in(temp.path(), &setup, &emulator).await;

    let pad = "x".repeat(600);
    let records: Vec<(String, Vec<u8>)> = (0..RECORDS)
        .map(|i| {
            let dev = format!("dev-{}", i % 10);
            let body = json!({"dev": dev, "ts": BASE_TS + i as i64, "seq": i, "pad": pad});
            (dev, body.to_string().into_bytes())
        })
        .collect();
    put_many(&client, "full", &records).await;

    // The disk fills: commits fail, /ready says so, reading stops.
    let url = format!("{}/ready", service.base_url);
    let reasons = wait_for(
        "the store to report the full disk",
        Duration::from_secs(120),
        || async {
            let response = service.http.get(&url).send().await.ok()?;
            let status = response.status().as_u16();
            let body: serde_json::Value = response.json().await.ok()?;
            (status == 503).then(|| body["reasons"].to_string())
        },
    )
    .await;
    assert!(reasons.contains("store"), "{reasons}");
    assert!(
        service.log().contains("store commit failed"),
        "{}",
        service.log()
    );
    let metrics_url = format!("{}/metrics", service.base_url);
    let metrics = service
        .http
        .get(&metrics_url)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let in_flight = metric(&metrics, "shardflow_in_flight_records");
    assert!(in_flight <= 5_000.0, "{in_flight} records in flight");
    let stored_while_full: i64 = service
        .db()
        .query_row("SELECT count(*) FROM ts_kv WHERE key = 'seq'", [], |r| {
            r.get(0)
        })
        .unwrap();
    assert!((stored_while_full as usize) < RECORDS);

    // An attribute save while the store is known to fail is refused and
    // says that nothing was saved.
    let device = service.wait_device("dev-0").await;
    let id = device["id"]["id"].as_str().unwrap().to_string();
    let (status, body) = service
        .post(
            &format!("/api/plugins/telemetry/{id}/SHARED_SCOPE"),
            r#"{"during_full": 1}"#,
        )
        .await;
    assert_eq!(status, 503, "{body}");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("nothing was saved"),
        "{body}"
    );

    // Room again: everything is stored, once.
    disk.resize("256m");
    wait_for(
        "every record to be stored",
        Duration::from_secs(120),
        || async {
            let count: i64 = service
                .db()
                .query_row("SELECT count(*) FROM ts_kv WHERE key = 'seq'", [], |r| {
                    r.get(0)
                })
                .ok()?;
            (count as usize == RECORDS).then_some(())
        },
    )
    .await;
    service.wait_ready().await;
    let distinct: i64 = service
        .db()
        .query_row(
            "SELECT count(DISTINCT long_v) FROM ts_kv WHERE key = 'seq'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(distinct as usize, RECORDS);
    assert!(service.log().contains("store writable again"));
    assert_eq!(service.count("dead_letters"), 0);
    service.stop();
    drop(disk);
}
