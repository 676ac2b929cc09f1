//! `GET /api/shardflow/live`: server-sent events of what the store
//! committed, for live pages.
//!
//! Events carry ids and keys, never values: a page reads values through
//! the usual endpoints when told they changed. `ready` comes first (the
//! page then reads everything it shows), then one `changes` event per
//! commit with a JSON array of changes: `entityCreated` for every new
//! device or asset, `telemetry` and `attributes` for the entity chosen with
//! `?entityId=` (every entity without it; none with `?only=created`), and
//! `lagged` when the stream fell behind and dropped announcements: the page
//! should read again. The stream ends when the service stops.

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::{RawQuery, State};
use axum::response::sse::{Event, KeepAlive, Sse};
use futures::stream::{self, Stream};
use tokio::sync::broadcast::error::RecvError;
use uuid::Uuid;

use super::{first, query, ApiError, ApiResult, ApiState};
use crate::store::{Change, Changes};

pub async fn stream(
    State(state): State<ApiState>,
    RawQuery(raw): RawQuery,
) -> ApiResult<Sse<impl Stream<Item = Result<Event, Infallible>>>> {
    let q = query(raw);
    let only = match first(&q, "entityId").filter(|v| !v.is_empty()) {
        None => None,
        Some(id) => Some(
            Uuid::parse_str(id)
                .map_err(|_| ApiError::bad_request(format!("{id:?} is not a valid UUID")))?,
        ),
    };
    let created_only = first(&q, "only") == Some("created");
    let changes = state.store.subscribe();
    let stopping = state.stopping.clone();
    let start = Event::default().event("ready").data("{}");
    let events = stream::unfold(
        (changes, stopping, Some(start)),
        move |(mut changes, mut stopping, pending)| async move {
            if let Some(event) = pending {
                return Some((Ok(event), (changes, stopping, None)));
            }
            loop {
                if *stopping.borrow() {
                    return None;
                }
                let received = tokio::select! {
                    received = changes.recv() => received,
                    _ = stopping.changed() => return None,
                };
                let event = match received {
                    Ok(batch) => match batch_events(&batch, only, created_only) {
                        Some(event) => event,
                        None => continue,
                    },
                    Err(RecvError::Lagged(missed)) => Event::default()
                        .event("lagged")
                        .data(format!("{{\"missedCommits\":{missed}}}")),
                    Err(RecvError::Closed) => return None,
                };
                return Some((Ok(event), (changes, stopping, None)));
            }
        },
    );
    Ok(Sse::new(events).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}

/// One SSE event per commit, `changes`, with the changes that concern the
/// listener as a JSON array; none when nothing does.
fn batch_events(batch: &Changes, only: Option<Uuid>, created_only: bool) -> Option<Event> {
    let wanted: Vec<&Change> = batch
        .iter()
        .filter(|change| match (change, only) {
            (Change::EntityCreated { .. }, _) => true,
            _ if created_only => false,
            (_, None) => true,
            (change, Some(id)) => change.entity_id() == id,
        })
        .collect();
    if wanted.is_empty() {
        return None;
    }
    let data = serde_json::to_string(&wanted).ok()?;
    Some(Event::default().event("changes").data(data))
}
