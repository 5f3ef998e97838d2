//! The last write of a reply or a task, kept until the store has it.
//!
//! A reply's (or task's) final state and text are written once, when it ends. If the store
//! cannot take that write, it goes first to a spill file (`<data dir>/spill/<id>.json`),
//! then is retried in the background with backoff; the file is removed once the store has
//! it. A process that stops before then (shutdown, retries used up, a crash) leaves the
//! file, and the next start applies it before anything else reads the store, so the message
//! gets its final state and full text instead of staying `streaming` or `interrupted`, and
//! the task its result instead of running again.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{MessageUpdate, Millis, Store, StoreError, TaskStatus};

/// Retries of one final write before it is left to the next start: about two minutes.
const ATTEMPTS: u32 = 30;
const FIRST_DELAY: Duration = Duration::from_millis(200);
const MAX_DELAY: Duration = Duration::from_secs(5);

/// A final write, as a spill file holds it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
enum Final {
    Message {
        message_id: String,
        #[serde(flatten)]
        update: MessageUpdate,
    },
    Task {
        task_id: String,
        status: TaskStatus,
        result: Option<String>,
        reasoning: Option<String>,
        error: Option<String>,
        finished_at: Millis,
    },
}

impl Final {
    fn id(&self) -> &str {
        match self {
            Self::Message { message_id, .. } => message_id,
            Self::Task { task_id, .. } => task_id,
        }
    }

    /// Applies it; `Ok(false)` when there was nothing left to write (a deleted message, a
    /// task already final).
    async fn apply(&self, store: &dyn Store) -> Result<bool, StoreError> {
        match self {
            Self::Message { message_id, update } => {
                match store
                    .update_message(message_id, update, super::now_millis())
                    .await
                {
                    Ok(()) => Ok(true),
                    Err(StoreError::NotFound(_)) => Ok(false),
                    Err(e) => Err(e),
                }
            }
            Self::Task {
                task_id,
                status,
                result,
                reasoning,
                error,
                finished_at,
            } => {
                store
                    .finish_task(
                        task_id,
                        *status,
                        result.as_deref(),
                        reasoning.as_deref(),
                        error.as_deref(),
                        *finished_at,
                    )
                    .await
            }
        }
    }
}

pub struct FinalWrites {
    store: Arc<dyn Store>,
    dir: PathBuf,
}

impl FinalWrites {
    /// Spill files live in `data_dir/spill`.
    pub fn new(store: Arc<dyn Store>, data_dir: &Path) -> Self {
        Self {
            store,
            dir: data_dir.join("spill"),
        }
    }

    /// Stores the final state of message `id`. When the store is unreachable, the write is
    /// spilled and retried by a task on `tasks` until it lands, the retries run out, or
    /// `stop` fires (after one last try); `false` then, as it is not stored yet.
    pub async fn save_message(
        self: &Arc<Self>,
        id: &str,
        update: MessageUpdate,
        tasks: &TaskTracker,
        stop: &CancellationToken,
    ) -> bool {
        let f = Final::Message {
            message_id: id.to_owned(),
            update,
        };
        match self.save(f, tasks, stop).await {
            Ok(Some(_)) => true,
            Ok(None) => false,
            Err(e) => {
                tracing::error!(message_id = %id, error = %e, "cannot store the reply");
                false
            }
        }
    }

    /// `finish_task`, kept and retried like [`Self::save_message`] while the store is
    /// unreachable: `Ok(Some(finished))` when stored now, `Ok(None)` when kept for later.
    #[allow(clippy::too_many_arguments)] // the fields of `finish_task`, and where to retry
    pub async fn finish_task(
        self: &Arc<Self>,
        id: &str,
        status: TaskStatus,
        result: Option<&str>,
        reasoning: Option<&str>,
        error: Option<&str>,
        now: Millis,
        tasks: &TaskTracker,
        stop: &CancellationToken,
    ) -> Result<Option<bool>, StoreError> {
        let f = Final::Task {
            task_id: id.to_owned(),
            status,
            result: result.map(str::to_owned),
            reasoning: reasoning.map(str::to_owned),
            error: error.map(str::to_owned),
            finished_at: now,
        };
        self.save(f, tasks, stop).await
    }

    async fn save(
        self: &Arc<Self>,
        f: Final,
        tasks: &TaskTracker,
        stop: &CancellationToken,
    ) -> Result<Option<bool>, StoreError> {
        let e = match f.apply(self.store.as_ref()).await {
            Ok(done) => return Ok(Some(done)),
            Err(e @ StoreError::Unavailable(_)) => e,
            Err(e) => return Err(e),
        };
        let path = match self.spill(&f).await {
            Ok(p) => Some(p),
            Err(err) => {
                tracing::error!(id = %f.id(), error = %err, "cannot spill a final write; retrying in memory only");
                None
            }
        };
        tracing::warn!(id = %f.id(), error = %e, "store unavailable; the final write is kept and retried");
        let this = self.clone();
        let stop = stop.clone();
        tasks.spawn(async move { this.retry(f, path, stop).await });
        Ok(None)
    }

    async fn retry(&self, f: Final, path: Option<PathBuf>, stop: CancellationToken) {
        let mut delay = FIRST_DELAY;
        for _ in 0..ATTEMPTS {
            let stopping = tokio::select! {
                _ = stop.cancelled() => true,
                _ = tokio::time::sleep(delay) => false,
            };
            match f.apply(self.store.as_ref()).await {
                Ok(_) => {
                    tracing::info!(id = %f.id(), "a final write kept while the store was away is stored");
                    return remove(path).await;
                }
                Err(e) if stopping || !matches!(e, StoreError::Unavailable(_)) => {
                    tracing::warn!(id = %f.id(), error = %e, "final write not stored; the next start stores it");
                    return;
                }
                Err(_) => {}
            }
            delay = (delay * 2).min(MAX_DELAY);
        }
        tracing::error!(id = %f.id(), "the store stayed away; the next start stores the final write");
    }

    /// Applies the spill files a stopped process left; how many were stored. Run at start,
    /// before anything marks unfinished replies interrupted.
    pub async fn repair(&self) -> Result<usize, StoreError> {
        let mut dir = match tokio::fs::read_dir(&self.dir).await {
            Ok(d) => d,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(spill_error(&self.dir, e)),
        };
        let mut stored = 0;
        while let Some(entry) = dir
            .next_entry()
            .await
            .map_err(|e| spill_error(&self.dir, e))?
        {
            let path = entry.path();
            if path.extension().is_none_or(|x| x != "json") {
                continue;
            }
            let text = tokio::fs::read(&path)
                .await
                .map_err(|e| spill_error(&path, e))?;
            let Ok(f) = serde_json::from_slice::<Final>(&text) else {
                tracing::warn!(path = %path.display(), "unreadable spill file left as it is");
                continue;
            };
            if f.apply(self.store.as_ref()).await? {
                stored += 1;
            }
            remove(Some(path)).await;
        }
        Ok(stored)
    }

    /// Written to a temporary name and renamed, so a crash mid-write leaves no torn file.
    async fn spill(&self, f: &Final) -> std::io::Result<PathBuf> {
        tokio::fs::create_dir_all(&self.dir).await?;
        // Ids are ours (hex); anything else would not be a safe file name.
        let id = f.id();
        if id.is_empty() || !id.chars().all(|c| c.is_ascii_alphanumeric()) {
            return Err(std::io::Error::other("id is not a file name"));
        }
        let path = self.dir.join(format!("{id}.json"));
        let tmp = self.dir.join(format!("{id}.tmp"));
        tokio::fs::write(&tmp, serde_json::to_vec(f)?).await?;
        tokio::fs::rename(&tmp, &path).await?;
        Ok(path)
    }
}

async fn remove(path: Option<PathBuf>) {
    if let Some(p) = path
        && let Err(e) = tokio::fs::remove_file(&p).await
        && e.kind() != std::io::ErrorKind::NotFound
    {
        tracing::warn!(path = %p.display(), error = %e, "cannot remove a spill file");
    }
}

fn spill_error(path: &Path, e: std::io::Error) -> StoreError {
    StoreError::Backend(format!("reading spill files in {}: {e}", path.display()).into())
        .with_source(e)
}
