//! The downlink producer actor: puts downlink records on Kinesis with
//! PutRecords, retrying the entries Kinesis rejects (throttling, internal
//! errors) with backoff. The rule chain sees it as a [`DownlinkSender`].

use std::collections::BTreeMap;
use std::time::Duration;

use actix::prelude::*;
use aws_sdk_kinesis::error::ProvideErrorMetadata;
use aws_sdk_kinesis::primitives::Blob;
use aws_sdk_kinesis::types::PutRecordsRequestEntry;
use aws_sdk_kinesis::Client;
use futures::future::BoxFuture;

use crate::chain::DownlinkSender;
use crate::convert::DownlinkRecord;

/// Largest batch PutRecords takes.
const MAX_BATCH: usize = 500;
/// Attempts per record before the message goes to Failure.
const ATTEMPTS: u32 = 6;

/// Puts records; answers once all were accepted, or with the reason.
pub struct Put(pub Vec<DownlinkRecord>);

impl Message for Put {
    type Result = Result<(), String>;
}

pub struct DownlinkProducer {
    integration: String,
    client: Client,
    io: tokio::runtime::Handle,
}

impl Actor for DownlinkProducer {
    type Context = Context<Self>;
}

impl DownlinkProducer {
    pub fn new(integration: String, client: Client, io: tokio::runtime::Handle) -> Self {
        DownlinkProducer {
            integration,
            client,
            io,
        }
    }
}

impl Handler<Put> for DownlinkProducer {
    type Result = ResponseFuture<Result<(), String>>;

    fn handle(&mut self, Put(records): Put, _: &mut Context<Self>) -> Self::Result {
        let client = self.client.clone();
        let integration = self.integration.clone();
        let task = self
            .io
            .spawn(async move { put_all(&client, &integration, records).await });
        Box::pin(async move {
            task.await
                .map_err(|e| format!("producer task failed: {e}"))?
        })
    }
}

async fn put_all(
    client: &Client,
    integration: &str,
    records: Vec<DownlinkRecord>,
) -> Result<(), String> {
    let mut by_stream: BTreeMap<String, Vec<DownlinkRecord>> = BTreeMap::new();
    for record in records {
        by_stream
            .entry(record.stream_name.clone())
            .or_default()
            .push(record);
    }
    for (stream, records) in by_stream {
        for chunk in records.chunks(MAX_BATCH) {
            put_batch(client, integration, &stream, chunk.to_vec()).await?;
        }
    }
    Ok(())
}

async fn put_batch(
    client: &Client,
    integration: &str,
    stream: &str,
    mut pending: Vec<DownlinkRecord>,
) -> Result<(), String> {
    let mut pause = Duration::from_millis(100);
    let mut last_error = String::new();
    for attempt in 1..=ATTEMPTS {
        let entries = pending
            .iter()
            .map(|r| {
                PutRecordsRequestEntry::builder()
                    .data(Blob::new(r.data.clone()))
                    .partition_key(&r.partition_key)
                    .set_explicit_hash_key(r.explicit_hash_key.clone())
                    .build()
                    .map_err(|e| e.to_string())
            })
            .collect::<Result<Vec<_>, _>>()?;
        match client
            .put_records()
            .stream_name(stream)
            .set_records(Some(entries))
            .send()
            .await
        {
            Ok(output) => {
                if output.failed_record_count().unwrap_or(0) == 0 {
                    tracing::debug!(
                        integration,
                        stream,
                        records = pending.len(),
                        "downlink records put"
                    );
                    return Ok(());
                }
                // Keep only the rejected entries; results are in request order.
                let results = output.records();
                let mut retry = Vec::new();
                for (record, result) in pending.into_iter().zip(results) {
                    if let Some(code) = result.error_code() {
                        last_error = format!("{code}: {}", result.error_message().unwrap_or(""));
                        retry.push(record);
                    }
                }
                pending = retry;
            }
            Err(e) => {
                let code = e.code().unwrap_or("request failed").to_string();
                last_error = format!(
                    "{code}: {}",
                    e.message()
                        .map(str::to_string)
                        .unwrap_or_else(|| e.to_string())
                );
                if matches!(
                    code.as_str(),
                    "ResourceNotFoundException" | "AccessDeniedException" | "ValidationException"
                ) {
                    return Err(format!(
                        "PutRecords to stream {stream:?} failed: {last_error}"
                    ));
                }
            }
        }
        if attempt < ATTEMPTS {
            tracing::warn!(integration, stream, attempt, error = %last_error, "PutRecords retry");
            tokio::time::sleep(pause).await;
            pause *= 2;
        }
    }
    Err(format!(
        "PutRecords to stream {stream:?} failed after {ATTEMPTS} attempts: {last_error}"
    ))
}

/// The producer as the rule chain's downlink sender.
pub struct ProducerSender(pub Addr<DownlinkProducer>);

impl DownlinkSender for ProducerSender {
    fn send(&self, records: Vec<DownlinkRecord>) -> BoxFuture<'static, Result<(), String>> {
        let addr = self.0.clone();
        Box::pin(async move {
            addr.send(Put(records))
                .await
                .map_err(|e| format!("downlink producer unavailable: {e}"))?
        })
    }
}
