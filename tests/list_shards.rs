//! ListShards pagination, which the emulator never needs (its pages hold
//! every shard of a test stream): a stand-in Kinesis endpoint on 127.0.0.1
//! answers in three pages, and the reader must follow NextToken (sent
//! without the stream name, as Kinesis requires) and return every shard
//! with its parents.

mod common;

use std::sync::{Arc, Mutex};

use axum::http::HeaderMap;
use axum::routing::post;
use axum::Router;
use serde_json::{json, Value};
use shardflow::kinesis::reader::{KinesisReader, ShardReader};

fn shard(id: u32, parent: Option<u32>) -> Value {
    let mut shard = json!({
        "ShardId": format!("shardId-{id:012}"),
        "HashKeyRange": {"StartingHashKey": "0", "EndingHashKey": "100"},
        "SequenceNumberRange": {"StartingSequenceNumber": "1"}
    });
    if let Some(parent) = parent {
        shard["ParentShardId"] = json!(format!("shardId-{parent:012}"));
    }
    shard
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_page_of_shards_is_listed() {
    let requests: Arc<Mutex<Vec<Value>>> = Arc::default();
    let seen = requests.clone();
    let app = Router::new().route(
        "/",
        post(move |headers: HeaderMap, body: String| {
            let seen = seen.clone();
            async move {
                let target = headers
                    .get("x-amz-target")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_string();
                assert_eq!(target, "Kinesis_20131202.ListShards");
                let request: Value = serde_json::from_str(&body).unwrap();
                seen.lock().unwrap().push(request.clone());
                let page = match request["NextToken"].as_str() {
                    None => json!({"Shards": [shard(0, None), shard(1, None)], "NextToken": "page-2"}),
                    Some("page-2") => {
                        json!({"Shards": [shard(2, Some(0)), shard(3, Some(0))], "NextToken": "page-3"})
                    }
                    Some(_) => json!({"Shards": [shard(4, Some(1))]}),
                };
                (
                    [("content-type", "application/x-amz-json-1.1")],
                    page.to_string(),
                )
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    let reader = KinesisReader {
        client: common::kinesis_client(&endpoint),
        io: tokio::runtime::Handle::current(),
    };
    let shards = reader.shards("paged").await.unwrap();

    let ids: Vec<&str> = shards.iter().map(|s| s.id.as_str()).collect();
    assert_eq!(
        ids,
        [
            "shardId-000000000000",
            "shardId-000000000001",
            "shardId-000000000002",
            "shardId-000000000003",
            "shardId-000000000004"
        ]
    );
    assert_eq!(shards[4].parents, ["shardId-000000000001"]);
    let requests = requests.lock().unwrap();
    assert_eq!(requests.len(), 3);
    assert_eq!(requests[0]["StreamName"], "paged");
    for later in &requests[1..] {
        assert!(later.get("StreamName").is_none(), "{later}");
        assert!(later["NextToken"].is_string(), "{later}");
    }
}
