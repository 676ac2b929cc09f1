//! The downlink producer against a stand-in for PutRecords on 127.0.0.1
//! that rejects chosen entries (the emulator throttles only by rate, so it
//! cannot reject exactly these) and says the stream takes records of up to
//! 2 MiB: only rejected entries are retried, no record overtakes an earlier
//! one with the same partition key, requests stay within 500 records and
//! 5 MiB, the stream's own record size limit is used, and records that can
//! never be sent fail at once. The real producer actor and AWS SDK run.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use base64::Engine as _;
use serde_json::{json, Value};
use shardflow::convert::DownlinkRecord;
use shardflow::kinesis::producer::{DownlinkProducer, Put};

#[derive(Default)]
struct Seen {
    /// Every attempt at an entry, by its data.
    attempts: HashMap<Vec<u8>, u32>,
    /// Accepted entries in the order they were accepted: (key, data).
    accepted: Vec<(String, Vec<u8>)>,
    /// Per request: entries and bytes (data and keys).
    requests: Vec<(usize, usize)>,
    /// Explicit hash keys passed through.
    hash_keys: Vec<String>,
}

type Shared = Arc<Mutex<Seen>>;

/// Entries whose `n` is a multiple of 3 are throttled once; those ending
/// in 1 fail twice (throttled, then an internal failure).
fn rejection(data: &[u8], attempt: u32) -> Option<&'static str> {
    let n = serde_json::from_slice::<Value>(data)
        .ok()
        .and_then(|v| v["n"].as_u64())?;
    match (n % 10 == 1, n % 3 == 0, attempt) {
        (true, _, 1) => Some("ProvisionedThroughputExceededException"),
        (true, _, 2) => Some("InternalFailure"),
        (false, true, 1) => Some("ProvisionedThroughputExceededException"),
        _ => None,
    }
}

async fn kinesis(
    State(seen): State<Shared>,
    headers: HeaderMap,
    body: String,
) -> impl IntoResponse {
    let target = headers
        .get("x-amz-target")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let request: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
    let answer = match target.as_str() {
        "Kinesis_20131202.DescribeStreamSummary" => json!({"StreamDescriptionSummary": {
            "StreamName": request["StreamName"], "StreamARN": "arn:aws:kinesis:us-east-1:000000000000:stream/down",
            "StreamStatus": "ACTIVE", "RetentionPeriodHours": 24, "StreamCreationTimestamp": 1.7e9,
            "EnhancedMonitoring": [], "OpenShardCount": 1, "MaxRecordSizeInKiB": 2048
        }}),
        "Kinesis_20131202.PutRecords" => {
            let mut seen = seen.lock().unwrap();
            let entries = request["Records"].as_array().cloned().unwrap_or_default();
            let mut bytes = 0;
            let mut results = Vec::new();
            let mut failed = 0;
            for entry in &entries {
                let data = base64::engine::general_purpose::STANDARD
                    .decode(entry["Data"].as_str().unwrap_or_default())
                    .unwrap();
                let key = entry["PartitionKey"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string();
                if let Some(hash) = entry["ExplicitHashKey"].as_str() {
                    seen.hash_keys.push(hash.to_string());
                }
                bytes += data.len() + key.len();
                let attempt = {
                    let n = seen.attempts.entry(data.clone()).or_default();
                    *n += 1;
                    *n
                };
                match rejection(&data, attempt) {
                    Some(code) => {
                        failed += 1;
                        results
                            .push(json!({"ErrorCode": code, "ErrorMessage": "stand-in rejection"}));
                    }
                    None => {
                        let sequence = seen.accepted.len().to_string();
                        seen.accepted.push((key, data));
                        results.push(
                            json!({"SequenceNumber": sequence, "ShardId": "shardId-000000000000"}),
                        );
                    }
                }
            }
            seen.requests.push((entries.len(), bytes));
            json!({"FailedRecordCount": failed, "Records": results})
        }
        _ => {
            return (
                StatusCode::BAD_REQUEST,
                json!({"__type": "UnknownOperationException"}).to_string(),
            )
        }
    };
    (StatusCode::OK, answer.to_string())
}

fn record(key: &str, data: Vec<u8>) -> DownlinkRecord {
    DownlinkRecord {
        stream_name: "down".into(),
        partition_key: key.into(),
        explicit_hash_key: None,
        data,
    }
}

fn numbered(key: &str, n: u64) -> DownlinkRecord {
    record(key, json!({"k": key, "n": n}).to_string().into_bytes())
}

#[test]
fn rejected_entries_are_retried_alone_in_key_order_within_the_limits() {
    let io = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let seen: Shared = Arc::default();
    let app = axum::Router::new()
        .route("/", axum::routing::post(kinesis))
        .layer(axum::extract::DefaultBodyLimit::max(32 << 20))
        .with_state(seen.clone());
    let listener = io
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    // No Nagle delay on the stand-in's answers.
    use axum::serve::ListenerExt;
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    io.spawn(async move { axum::serve(listener, app).await.unwrap() });

    let client = common::kinesis_client(&endpoint);
    let handle = io.handle().clone();

    let outcomes = actix::System::new().block_on(async move {
        use actix::Actor;
        // Room for every send at once, so they arrive in the order made.
        let producer = DownlinkProducer::create(move |ctx| {
            ctx.set_mailbox_capacity(4096);
            DownlinkProducer::new("test".into(), client, handle)
        });
        let mut sends = Vec::new();
        // 1,200 records over 7 keys, one send each, and one send of three.
        for n in 0..1200u64 {
            sends.push(producer.send(Put(vec![numbered(&format!("key-{}", n % 7), n)])));
        }
        sends.push(producer.send(Put(vec![
            numbered("multi", 5000),
            numbered("multi", 5001),
            numbered("multi", 5003),
        ])));
        // Above 1 MiB but within the stream's 2 MiB: sent, three a request.
        for n in 0..6 {
            let mut big = record(&format!("big-{n}"), vec![b'x'; 1536 * 1024]);
            big.data[0] = b'0' + n;
            sends.push(producer.send(Put(vec![big])));
        }
        let mut hashed = numbered("hashed", 7000);
        hashed.explicit_hash_key = Some("340282366920938463463374607431768211455".into());
        sends.push(producer.send(Put(vec![hashed])));
        // Never sendable.
        let mut bad_hash = numbered("k", 9000);
        bad_hash.explicit_hash_key = Some("340282366920938463463374607431768211456".into());
        let never = vec![
            record("", b"{}".to_vec()),
            record(&"k".repeat(257), b"{}".to_vec()),
            bad_hash,
            record("too-big", vec![b'x'; 2048 * 1024]),
        ];
        for bad in never {
            sends.push(producer.send(Put(vec![bad])));
        }
        let mut outcomes = Vec::new();
        for send in sends {
            outcomes.push(send.await.unwrap());
        }
        outcomes
    });

    let (sent, never) = outcomes.split_at(outcomes.len() - 4);
    assert!(
        sent.iter().all(Result::is_ok),
        "{:?}",
        sent.iter().find(|o| o.is_err())
    );
    let reasons: Vec<String> = never.iter().map(|o| o.clone().unwrap_err()).collect();
    assert!(reasons[0].contains("0 characters"), "{reasons:?}");
    assert!(reasons[1].contains("257 characters"), "{reasons:?}");
    assert!(reasons[2].contains("explicit hash key"), "{reasons:?}");
    assert!(reasons[3].contains("at most 2097152"), "{reasons:?}");

    let seen = seen.lock().unwrap();
    // Each record accepted once; only rejected ones were sent again.
    assert_eq!(seen.accepted.len(), 1200 + 3 + 6 + 1);
    for (data, attempts) in &seen.attempts {
        let expected = match serde_json::from_slice::<Value>(data)
            .ok()
            .and_then(|v| v["n"].as_u64())
        {
            Some(n) if n % 10 == 1 => 3,
            Some(n) if n % 3 == 0 => 2,
            _ => 1,
        };
        assert_eq!(
            *attempts,
            expected,
            "{}",
            String::from_utf8_lossy(&data[..data.len().min(40)])
        );
    }
    // Per key, records were accepted in the order they were sent.
    let mut by_key: HashMap<&str, Vec<u64>> = HashMap::new();
    for (key, data) in &seen.accepted {
        if let Some(n) = serde_json::from_slice::<Value>(data)
            .ok()
            .and_then(|v| v["n"].as_u64())
        {
            by_key.entry(key).or_default().push(n);
        }
    }
    for (key, order) in &by_key {
        let mut sorted = order.clone();
        sorted.sort();
        assert_eq!(order, &sorted, "key {key} out of order");
    }
    assert_eq!(by_key["multi"], vec![5000, 5001, 5003]);
    // Within the request limits.
    for (entries, bytes) in &seen.requests {
        assert!(*entries <= 500, "{entries} entries in one request");
        assert!(*bytes <= 5 * 1024 * 1024, "{bytes} bytes in one request");
    }
    assert!(
        seen.requests.iter().any(|(entries, _)| *entries > 1),
        "records were batched"
    );
    assert_eq!(
        seen.hash_keys,
        vec!["340282366920938463463374607431768211455"]
    );
}
