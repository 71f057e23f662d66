//! The live event stream of a batch (server-sent events): `summary` with the batch's
//! totals and `user` with one user's line (the same JSON as the users list), each sent
//! when it changes. The first events describe every user; after that only changes, at
//! most every [`EVERY`]. Each stream polls Redis, so a coordinator serves at most
//! `MAX_STREAMS` of them at once; comments keep idle connections open through proxies.

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::time::Duration;

use axum::extract::State;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::Extension;
use futures_lite::Stream;

use super::batches::{owned, summary_view, user_view};
use super::{ApiError, Path, Shared, Tenant};

/// How often a stream looks for changes.
pub const EVERY: Duration = Duration::from_secs(1);

struct Watch {
    api: Shared,
    batch: String,
    /// The JSON last sent per user, and of the summary.
    sent: HashMap<String, String>,
    summary: String,
    pending: VecDeque<Event>,
    first: bool,
    /// Held while the stream lives: one of the coordinator's stream slots.
    _slot: super::StreamSlot,
}

impl Watch {
    async fn look(&mut self) {
        let lines = match self.api.cluster.status(&self.batch).await {
            Ok((lines, _)) => lines,
            Err(e) => {
                tracing::warn!(batch = %self.batch, error = %e, "event stream: reading the batch failed");
                let problem = serde_json::json!({"code": "store_unavailable", "message": "the state store did not answer; retrying"});
                self.pending
                    .push_back(Event::default().event("problem").data(problem.to_string()));
                return;
            }
        };
        for line in &lines {
            let json = serde_json::to_string(&user_view(line)).unwrap_or_default();
            if self.sent.get(&line.user) != Some(&json) {
                self.pending
                    .push_back(Event::default().event("user").data(json.clone()));
                self.sent.insert(line.user.clone(), json);
            }
        }
        let summary = serde_json::to_string(&summary_view(&lines)).unwrap_or_default();
        if summary != self.summary {
            self.pending
                .push_back(Event::default().event("summary").data(summary.clone()));
            self.summary = summary;
        }
    }
}

pub async fn stream(
    State(api): State<Shared>,
    Extension(Tenant(tenant)): Extension<Tenant>,
    Path(id): Path<String>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    owned(&api, &tenant, &id).await?;
    let slot = api.stream_slot(&tenant)?;
    let watch = Watch {
        api,
        batch: id,
        sent: HashMap::new(),
        summary: String::new(),
        pending: VecDeque::new(),
        first: true,
        _slot: slot,
    };
    let events = futures_lite::stream::unfold(watch, |mut w| async move {
        loop {
            if let Some(event) = w.pending.pop_front() {
                return Some((Ok(event), w));
            }
            if !w.first {
                tokio::time::sleep(EVERY).await;
            }
            w.first = false;
            w.look().await;
        }
    });
    Ok(Sse::new(events).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}
