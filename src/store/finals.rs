//! The last write of a reply, kept until the store has it.
//!
//! A reply's final state and text are written once, when it ends. If the store cannot take
//! that write, it goes first to a spill file (`<data dir>/spill/<message id>.json`), then
//! is retried in the background with backoff; the file is removed once the store has it.
//! A process that stops before then (shutdown, retries used up, a crash) leaves the file,
//! and the next start applies it before anything else reads the store, so the message gets
//! its final state and full text instead of staying `streaming` or `interrupted`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{MessageStatus, MessageUpdate, Store, StoreError};

/// Retries of one final write before it is left to the next start: about two minutes.
const ATTEMPTS: u32 = 30;
const FIRST_DELAY: Duration = Duration::from_millis(200);
const MAX_DELAY: Duration = Duration::from_secs(5);

/// A spill file's content.
#[derive(Debug, Serialize, Deserialize)]
struct Spilled {
    message_id: String,
    content: String,
    reasoning: Option<String>,
    status: MessageStatus,
    prompt_tokens: Option<i64>,
    completion_tokens: Option<i64>,
    error: Option<String>,
}

impl Spilled {
    fn update(&self) -> MessageUpdate {
        MessageUpdate {
            content: self.content.clone(),
            reasoning: self.reasoning.clone(),
            status: self.status,
            prompt_tokens: self.prompt_tokens,
            completion_tokens: self.completion_tokens,
            error: self.error.clone(),
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
        let e = match self.store.update_message(id, &update).await {
            Ok(()) => return true,
            Err(e) => e,
        };
        if !matches!(e, StoreError::Unavailable(_)) {
            tracing::error!(message_id = %id, error = %e, "cannot store the reply");
            return false;
        }
        let spilled = Spilled {
            message_id: id.to_owned(),
            content: update.content,
            reasoning: update.reasoning,
            status: update.status,
            prompt_tokens: update.prompt_tokens,
            completion_tokens: update.completion_tokens,
            error: update.error,
        };
        let path = match self.spill(&spilled).await {
            Ok(p) => Some(p),
            Err(err) => {
                tracing::error!(message_id = %id, error = %err, "cannot spill the reply; retrying in memory only");
                None
            }
        };
        tracing::warn!(message_id = %id, error = %e, "store unavailable; the reply is kept and its save retried");
        let this = self.clone();
        let stop = stop.clone();
        tasks.spawn(async move { this.retry(spilled, path, stop).await });
        false
    }

    async fn retry(&self, s: Spilled, path: Option<PathBuf>, stop: CancellationToken) {
        let update = s.update();
        let mut delay = FIRST_DELAY;
        for _ in 0..ATTEMPTS {
            let stopping = tokio::select! {
                _ = stop.cancelled() => true,
                _ = tokio::time::sleep(delay) => false,
            };
            match self.store.update_message(&s.message_id, &update).await {
                Ok(()) => {
                    tracing::info!(message_id = %s.message_id, "the reply kept while the store was down is stored");
                    return remove(path).await;
                }
                // Gone with its session: nothing left to write.
                Err(StoreError::NotFound(_)) => return remove(path).await,
                Err(e) if stopping => {
                    tracing::warn!(message_id = %s.message_id, error = %e, "stopping before the reply was stored; the next start stores it");
                    return;
                }
                Err(_) => {}
            }
            delay = (delay * 2).min(MAX_DELAY);
        }
        tracing::error!(message_id = %s.message_id, "the store stayed down; the next start stores the reply");
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
            let Ok(s) = serde_json::from_slice::<Spilled>(&text) else {
                tracing::warn!(path = %path.display(), "unreadable spill file left as it is");
                continue;
            };
            match self.store.update_message(&s.message_id, &s.update()).await {
                Ok(()) => stored += 1,
                Err(StoreError::NotFound(_)) => {}
                Err(e) => return Err(e),
            }
            remove(Some(path)).await;
        }
        Ok(stored)
    }

    /// Written to a temporary name and renamed, so a crash mid-write leaves no torn file.
    async fn spill(&self, s: &Spilled) -> std::io::Result<PathBuf> {
        tokio::fs::create_dir_all(&self.dir).await?;
        // Message ids are ours (hex); anything else would not be a safe file name.
        if !s.message_id.chars().all(|c| c.is_ascii_alphanumeric()) {
            return Err(std::io::Error::other("message id is not a file name"));
        }
        let path = self.dir.join(format!("{}.json", s.message_id));
        let tmp = self.dir.join(format!("{}.tmp", s.message_id));
        tokio::fs::write(&tmp, serde_json::to_vec(s)?).await?;
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
    StoreError::Backend(format!("reading spill files in {}: {e}", path.display()))
}
