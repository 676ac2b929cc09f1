//! In-process pipelines fed by a stand-in shard reader, for the faults a
//! real Kinesis cannot be made to produce: the real consumer, converter
//! pool, chain and store run; only the reader is replaced.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use shardflow::config::{Config, IntegrationConfig};
use shardflow::kinesis::reader::ShardReader;
use shardflow::service::Pipeline;
use shardflow::store::Store;

/// A service directory in `dir`: `converter` as the uplink converter, the
/// shipped downlink converter and root chain, and a config with `top`
/// (top-level keys and tables) and `integration` (more keys of the one
/// integration, whose stream is `stream`).
pub fn workspace(
    dir: &Path,
    stream: &str,
    converter: &str,
    top: &str,
    integration: &str,
) -> Config {
    let repo = super::repo();
    std::fs::create_dir_all(dir.join("converters")).unwrap();
    std::fs::create_dir_all(dir.join("rulechains")).unwrap();
    std::fs::write(dir.join("converters/up.js"), converter).unwrap();
    std::fs::copy(
        repo.join("converters/kinesis_downlink_version.js"),
        dir.join("converters/down.js"),
    )
    .unwrap();
    std::fs::copy(
        repo.join("rulechains/root.json"),
        dir.join("rulechains/root.json"),
    )
    .unwrap();
    let text = format!(
        r#"
root_chain = "rulechains/root.json"
{top}
[[integration]]
name = "kinesis_integration"
uplink_converter = "converters/up.js"
downlink_converter = "converters/down.js"
stream_name = "{stream}"
access_key_id = "test"
secret_access_key = "test"
endpoint_url = "http://127.0.0.1:9"
{integration}
"#
    );
    std::fs::write(dir.join("shardflow.toml"), text).unwrap();
    Config::load(&dir.join("shardflow.toml")).unwrap()
}

/// Runs the pipeline, with the readers `reader` makes, until
/// `until(store, records done)` holds (90 s at most), then stops it;
/// returns the store.
pub fn run_until(
    config: &Config,
    reader: impl Fn(&IntegrationConfig, &tokio::runtime::Handle) -> Arc<dyn ShardReader> + 'static,
    mut until: impl FnMut(&Store, u64) -> bool,
) -> Store {
    let source = shardflow::service::preflight(config).unwrap();
    let store = Store::open(&config.data_dir).unwrap();
    let io = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let handle = io.handle().clone();
    let kept = store.clone();
    actix::System::new().block_on(async move {
        let reader_io = handle.clone();
        let factory =
            move |c: &IntegrationConfig, _: &aws_sdk_kinesis::Client| reader(c, &reader_io);
        let pipeline = Pipeline::start(config, source, store.clone(), handle, &factory)
            .await
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            let done = pipeline.status.records_done.load(Ordering::SeqCst);
            if until(&store, done) {
                break;
            }
            assert!(Instant::now() < deadline, "records done: {done}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        pipeline.stop().await.unwrap();
    });
    kept
}
