//! Wires the service together and runs it until SIGINT/SIGTERM.
//!
//! Start-up order: lock the data directory, open the store, load and check
//! the root chain and the converters, start the converter pool, the rule
//! node actors, the downlink producers, the shard consumers and the HTTP
//! API. On shutdown the consumers stop reading and wait for the records in
//! flight to be done, so the last checkpoints cover everything processed.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use anyhow::{bail, Context as _};

use crate::api::{self, auth::Auth, ApiState};
use crate::chain::debug::DebugRecorder;
use crate::chain::set::{SetConfig, SetSource};
use crate::chain::{self, DownlinkSender, Rules, Services};
use crate::config::{Config, IntegrationConfig};
use crate::convert::js::JsLimits;
use crate::convert::ConverterWorker;
use crate::kinesis::reader::ShardReader;
use crate::kinesis::{
    self, producer::DownlinkProducer, producer::ProducerSender, Consumers, Integration,
};
use crate::status::StatusBoard;
use crate::store::{DataDirLock, Store, Write};

/// How long shutdown waits for records in flight.
const DRAIN_LIMIT: Duration = Duration::from_secs(30);

pub fn js_limits(config: &Config) -> JsLimits {
    limits_of(&config.js)
}

/// The script limits of a default configuration.
pub fn js_limits_default() -> JsLimits {
    limits_of(&crate::config::JsConfig::default())
}

fn limits_of(js: &crate::config::JsConfig) -> JsLimits {
    JsLimits {
        call_timeout: Duration::from_millis(js.call_timeout_ms),
        memory_limit_bytes: js.memory_limit_mb << 20,
        max_result_bytes: js.max_result_kb << 10,
    }
}

/// Everything `check` and `run` verify before starting: every chain of the
/// rule chain directory, the converters, and the references between them
/// and the integrations. Returns the loaded set, or every problem.
pub fn preflight(config: &Config) -> Result<SetSource, Vec<String>> {
    let source = chain::set::load(&SetConfig::from_config(config), None)?;
    let mut problems = Vec::new();
    for def in &source.chains {
        for index in def.graph.node_indices() {
            let node = &def.graph[index];
            let chain::nodes::NodeKind::IntegrationDownlink(downlink) = &node.kind else {
                continue;
            };
            let key = downlink.integration.as_str();
            let with_downlink: Vec<&str> = config
                .integrations
                .iter()
                .filter(|i| i.downlink_converter.is_some())
                .map(|i| i.name.as_str())
                .collect();
            let problem = match (key, with_downlink.as_slice()) {
                (_, []) => Some("sends downlinks but no integration has a downlink_converter".to_string()),
                ("", [_]) => None,
                ("", _) => Some("has an empty integrationId but several integrations have downlink converters; name one".to_string()),
                (key, names) if !names.contains(&key) => Some(format!(
                    "integrationId {key:?} names no integration with a downlink_converter (configured: {})",
                    names.join(", ")
                )),
                _ => None,
            };
            if let Some(problem) = problem {
                problems.push(format!(
                    "rule chain {}: node {} {problem}",
                    def.file.display(),
                    node.label()
                ));
            }
        }
    }
    if problems.is_empty() {
        Ok(source)
    } else {
        Err(problems)
    }
}

/// Runs the service until a stop signal.
pub fn run(config: Config) -> anyhow::Result<()> {
    let _lock = DataDirLock::acquire(&config.data_dir)?;
    let source = match preflight(&config) {
        Ok(source) => source,
        Err(problems) => bail!("cannot start:\n  - {}", problems.join("\n  - ")),
    };
    let store = Store::open(&config.data_dir).context("cannot open the store")?;
    let bind: SocketAddr = config.http.bind.parse().context("http.bind")?;

    let io = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("io")
        .enable_all()
        .build()
        .context("cannot start the I/O runtime")?;
    let listener = io
        .block_on(tokio::net::TcpListener::bind(bind))
        .with_context(|| format!("cannot listen on {bind}"))?;
    let auth = Arc::new(Auth::load(
        &config.data_dir,
        config.http.username.clone(),
        config.http.password.clone(),
        config.http.password_hash.as_ref(),
        config.http.token_ttl_secs,
    )?);

    let system = actix::System::new();
    let result = system.block_on(serve(
        config,
        source,
        store,
        io.handle().clone(),
        listener,
        auth,
    ));
    io.shutdown_timeout(Duration::from_secs(5));
    result
}

/// The running pipeline: converter pool, rule node actors, downlink
/// producers and shard consumers.
pub struct Pipeline {
    pub rules: Arc<Rules>,
    /// The converter pool.
    pub js: Addr<ConverterWorker>,
    /// Each integration's name and stream, in config order.
    pub integrations: Arc<Vec<api::IntegrationInfo>>,
    pub replayer: Arc<crate::replay::Replayer>,
    pub consumers: Consumers,
    pub status: StatusBoard,
    pub store: Store,
    arbiters: Vec<ArbiterHandle>,
}

/// Makes the shard reader of an integration from its AWS client.
pub type ReaderFactory =
    dyn Fn(&IntegrationConfig, &aws_sdk_kinesis::Client) -> Arc<dyn ShardReader>;

impl Pipeline {
    /// Starts everything but the HTTP API. Must run inside an actix system.
    pub async fn start(
        config: &Config,
        source: SetSource,
        store: Store,
        io: tokio::runtime::Handle,
        reader: &ReaderFactory,
    ) -> anyhow::Result<Pipeline> {
        let arbiters: Vec<ArbiterHandle> = (0..Config::threads(config.pipeline.chain_threads))
            .map(|_| Arbiter::new().handle())
            .collect();
        let js = ConverterWorker::start_pool(Config::threads(config.js.workers), js_limits(config));
        let status = StatusBoard::default();

        // AWS clients and downlink producers, one per integration.
        let mut clients = HashMap::new();
        let mut downlinks: HashMap<String, Arc<dyn DownlinkSender>> = HashMap::new();
        for (n, integration) in config.integrations.iter().enumerate() {
            let owned = integration.clone();
            let client = io
                .spawn(async move { kinesis::client::build(&owned).await })
                .await?;
            if integration.downlink_converter.is_some() {
                let producer =
                    DownlinkProducer::new(integration.name.clone(), client.clone(), io.clone());
                let arbiter = &arbiters[n % arbiters.len()];
                let addr = DownlinkProducer::start_in_arbiter(arbiter, move |_| producer);
                downlinks.insert(integration.name.clone(), Arc::new(ProducerSender(addr)));
            }
            clients.insert(integration.name.clone(), client);
        }

        let http = reqwest::Client::builder()
            .build()
            .context("cannot build the HTTP client of REST API call nodes")?;
        let services = Services {
            store: store.clone(),
            js: js.clone(),
            downlinks,
            http,
            debug: DebugRecorder::new(store.clone(), config.rules.debug_events_per_second),
            current: Arc::default(),
        };
        let rules = Rules::start(
            SetConfig::from_config(config),
            source,
            services,
            arbiters.clone(),
        );
        for chain in &rules.current().chains {
            tracing::info!(
                chain = %chain.name(), file = %chain.def.file.display(),
                nodes = chain.def.graph.node_count(), "rule chain loaded"
            );
        }

        let mut integrations = Vec::new();
        let consumers = Consumers::default();
        let budget = Arc::new(kinesis::window::Budget::new(
            config.pipeline.max_in_flight_records_total,
            config.pipeline.max_in_flight_bytes_total,
        ));
        for integration in &config.integrations {
            integrations.push(api::IntegrationInfo {
                name: integration.name.clone(),
                stream: integration.stream_name.clone(),
            });
            let runtime = Arc::new(Integration {
                config: integration.clone(),
                pipeline: config.pipeline.clone(),
                reader: reader(integration, &clients[&integration.name]),
                js: js.clone(),
                store: store.clone(),
                rules: rules.clone(),
                status: status.clone(),
                budget: budget.clone(),
                shard_finished: Arc::default(),
            });
            status.integration_pending(&integration.name, Some("listing shards".into()));
            log_integration(integration);
            kinesis::start(runtime, arbiters.clone(), consumers.clone());
        }
        let replayer = Arc::new(crate::replay::Replayer::new(
            store.clone(),
            js.clone(),
            rules.clone(),
        ));
        Ok(Pipeline {
            rules,
            js,
            integrations: Arc::new(integrations),
            replayer,
            consumers,
            status,
            store,
            arbiters,
        })
    }

    /// Stops reading, waits for the records in flight, writes the last
    /// checkpoints and stops the actors.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.consumers.drain(DRAIN_LIMIT).await;
        self.store.flush().await?;
        for arbiter in self.arbiters {
            arbiter.stop();
        }
        Ok(())
    }
}

async fn serve(
    config: Config,
    source: SetSource,
    store: Store,
    io: tokio::runtime::Handle,
    listener: tokio::net::TcpListener,
    auth: Arc<Auth>,
) -> anyhow::Result<()> {
    let reader_io = io.clone();
    let kinesis_reader = move |config: &IntegrationConfig, client: &aws_sdk_kinesis::Client| {
        kinesis::reader_for(config, client, &reader_io)
    };
    let pipeline =
        Pipeline::start(&config, source, store.clone(), io.clone(), &kinesis_reader).await?;

    if let Err(e) = crate::outbox::redrive(&pipeline.rules, &store) {
        tracing::error!(error = %e, "cannot read the outbox; its messages stay there until the next start");
    }
    let store_for_retention = store.clone();
    let (stop_api, api_stopped) = tokio::sync::oneshot::channel::<()>();
    let (stopping, stopping_rx) = tokio::sync::watch::channel(false);
    let router = api::router(ApiState {
        store,
        rules: pipeline.rules.clone(),
        auth,
        status: pipeline.status.clone(),
        replayer: pipeline.replayer.clone(),
        js: pipeline.js.clone(),
        integrations: pipeline.integrations.clone(),
        stopping: stopping_rx,
        serves_tls: config.http.tls_cert.is_some(),
        password_checks: Arc::new(tokio::sync::Semaphore::new(2)),
        allowed_hosts: Arc::new(config.http.allowed_hosts.clone()),
    });
    let address = listener.local_addr()?;
    let tls = match (&config.http.tls_cert, &config.http.tls_key) {
        (Some(cert), Some(key)) => Some(api::tls::server_config(cert, key)?),
        _ => None,
    };
    let scheme = if tls.is_some() { "https" } else { "http" };
    io.spawn(async move {
        let stopped = async {
            let _ = api_stopped.await;
        };
        let served = match tls {
            Some(tls) => match api::tls::TlsListener::new(listener, tls) {
                Ok(listener) => {
                    axum::serve(listener, router)
                        .with_graceful_shutdown(stopped)
                        .await
                }
                Err(e) => Err(e),
            },
            None => {
                axum::serve(listener, router)
                    .with_graceful_shutdown(stopped)
                    .await
            }
        };
        if let Err(e) = served {
            tracing::error!(error = %e, "HTTP API stopped");
        }
    });
    tracing::info!(address = %address, scheme, "shardflow started; HTTP API listening");
    spawn_dead_letter_retention(&config, store_for_retention.clone(), &io);
    spawn_rule_housekeeping(&config, store_for_retention, &io);
    let _watch = config.rules.watch.then(|| {
        pipeline.rules.watch(
            Duration::from_millis(config.rules.reload_debounce_ms),
            Duration::from_millis(config.rules.reload_poll_ms),
        )
    });

    io.spawn(stop_signal()).await?;
    // Event streams end first: the pages stop listening, and the HTTP
    // server has no open stream to wait for.
    let _ = stopping.send(true);
    tracing::info!("stopping: waiting for records in flight");
    pipeline.stop().await?;
    let _ = stop_api.send(());
    tracing::info!("shardflow stopped");
    System::current().stop();
    Ok(())
}

/// Applies the dead-letter retention every minute, with a WARN when it
/// drops any.
fn spawn_dead_letter_retention(config: &Config, store: Store, io: &tokio::runtime::Handle) {
    let limits = config.dead_letters.clone();
    if limits.max_count == 0 && limits.max_age_days == 0 {
        return;
    }
    io.spawn(async move {
        let mut every = tokio::time::interval(Duration::from_secs(60));
        loop {
            every.tick().await;
            let max_age_ms = (limits.max_age_days as i64).saturating_mul(86_400_000);
            match store.trim_dead_letters(limits.max_count, max_age_ms).await {
                Ok(0) => {}
                Ok(dropped) => {
                    tracing::warn!(
                    dropped, max_count = limits.max_count, max_age_days = limits.max_age_days,
                    "dead letters dropped by the retention limits ([dead_letters] in the config)"
                )
                }
                Err(e) => tracing::warn!(error = %e, "dead-letter retention failed; retrying"),
            }
        }
    });
}

/// Purges telemetry past its TTL and trims the debug events to their cap,
/// periodically.
fn spawn_rule_housekeeping(config: &Config, store: Store, io: &tokio::runtime::Handle) {
    let rules = config.rules.clone();
    io.spawn(async move {
        let mut every = tokio::time::interval(Duration::from_secs(rules.ttl_purge_interval_secs));
        loop {
            every.tick().await;
            match store
                .purge_expired_telemetry(crate::msg::now_millis())
                .await
            {
                Ok(0) => {}
                Ok(purged) => tracing::info!(purged, "telemetry past its TTL purged"),
                Err(e) => tracing::warn!(error = %e, "telemetry TTL purge failed; retrying"),
            }
            let trim = Write::TrimDebugEvents {
                max_count: rules.debug_events_max,
            };
            if let Err(e) = store.write(vec![trim], None).await {
                tracing::warn!(error = %e, "debug event retention failed; retrying");
            }
        }
    });
}

fn log_integration(integration: &IntegrationConfig) {
    tracing::info!(
        integration = %integration.name,
        stream = %integration.stream_name,
        region = %integration.region,
        application = %integration.application_name,
        endpoint = %integration
            .endpoint_url
            .as_deref()
            .map_or_else(|| "AWS".to_string(), crate::config::without_userinfo),
        initial_position = ?integration.initial_position,
        "integration configured"
    );
}

async fn stop_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
