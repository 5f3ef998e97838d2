//! The response cache: replies to deterministic requests (temperature 0, or
//! `"cache": true`), keyed by a SHA-256 of model, messages and parameters. One trait, two
//! backends: in-process (moka, L1) and Redis (L2, shared by every instance); `Tiered`
//! reads L1 then L2 and writes both.

pub mod memory;
pub mod redis;

use std::sync::Arc;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::domain::{ChatRequest, Chunk};

/// A whole reply, replayed chunk by chunk on a hit: exactly what the live reply streamed.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CachedReply {
    pub chunks: Vec<Chunk>,
}

#[async_trait]
pub trait ResponseCache: Send + Sync + 'static {
    async fn get(&self, key: &str) -> Option<CachedReply>;
    async fn put(&self, key: &str, reply: &CachedReply);
    /// Removes entries whose key starts with `prefix` (all without one); returns how many.
    async fn clear(&self, prefix: Option<&str>) -> u64;
    /// Entries held (this layer's own count; approximate for shared backends).
    async fn size(&self) -> u64;
}

/// Whether a request may be answered from the cache: sampling at temperature 0, or the
/// client asked for it with `"cache": true` (which is not forwarded upstream).
pub fn is_cacheable(req: &ChatRequest) -> bool {
    req.params.temperature == Some(0.0)
        || req.extra.get("cache").and_then(|v| v.as_bool()) == Some(true)
}

/// `<model>:<sha256 hex>` of everything that shapes the reply, so a prefix clears a model.
pub fn key(req: &ChatRequest) -> String {
    let mut h = Sha256::new();
    h.update(req.model.as_bytes());
    h.update([0]);
    h.update(serde_json::to_vec(&req.messages).unwrap_or_default());
    h.update([0]);
    h.update(serde_json::to_vec(&req.params).unwrap_or_default());
    h.update([0]);
    // Anthropic's `thinking` is not serialized with the parameters; only requests that
    // carry one hash it, so every other key stays as it was.
    if let Some(thinking) = &req.params.thinking {
        h.update(serde_json::to_vec(thinking).unwrap_or_default());
        h.update([0]);
    }
    // Everything else in the body (tools, tool_choice, response_format, seed, n, logprobs…)
    // can change the answer; how it is delivered cannot.
    let mut extra = req.extra.clone();
    for delivery in ["cache", "stream", "stream_options"] {
        extra.remove(delivery);
    }
    h.update(serde_json::to_vec(&extra).unwrap_or_default());
    format!("{}:{}", req.model, hex::encode(h.finalize()))
}

/// L1 in front of an optional L2.
pub struct Tiered {
    l1: memory::MemoryCache,
    l2: Option<Arc<dyn ResponseCache>>,
}

impl Tiered {
    pub fn new(l1: memory::MemoryCache, l2: Option<Arc<dyn ResponseCache>>) -> Self {
        Self { l1, l2 }
    }
}

#[async_trait]
impl ResponseCache for Tiered {
    async fn get(&self, key: &str) -> Option<CachedReply> {
        if let Some(r) = self.l1.get(key).await {
            return Some(r);
        }
        let r = self.l2.as_ref()?.get(key).await?;
        self.l1.put(key, &r).await;
        Some(r)
    }

    async fn put(&self, key: &str, reply: &CachedReply) {
        self.l1.put(key, reply).await;
        if let Some(l2) = &self.l2 {
            l2.put(key, reply).await;
        }
    }

    async fn clear(&self, prefix: Option<&str>) -> u64 {
        let n = self.l1.clear(prefix).await;
        match &self.l2 {
            Some(l2) => n.max(l2.clear(prefix).await),
            None => n,
        }
    }

    async fn size(&self) -> u64 {
        self.l1.size().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{Message, Role};

    fn req(t: Option<f64>) -> ChatRequest {
        ChatRequest {
            model: "m".into(),
            messages: vec![Message::new(Role::User, "hi")],
            params: crate::domain::GenParams {
                temperature: t,
                ..Default::default()
            },
            extra: Default::default(),
        }
    }

    #[test]
    fn keys_follow_everything_that_shapes_the_reply() {
        assert!(is_cacheable(&req(Some(0.0))));
        assert!(!is_cacheable(&req(Some(0.7))));
        assert!(!is_cacheable(&req(None)));
        let mut forced = req(None);
        forced.extra.insert("cache".into(), serde_json::json!(true));
        assert!(is_cacheable(&forced));
        assert_eq!(key(&req(Some(0.0))), key(&req(Some(0.0))));
        assert_ne!(key(&req(Some(0.0))), key(&req(Some(0.1))));
        assert!(key(&req(None)).starts_with("m:"));
        // The opt-in flag itself does not change the key.
        assert_eq!(key(&forced), key(&req(None)));
        // Every option that can change the answer does; how it is delivered does not.
        let base = key(&req(Some(0.0)));
        for (field, value) in [
            (
                "tools",
                serde_json::json!([{"type": "function", "function": {"name": "f"}}]),
            ),
            ("tool_choice", serde_json::json!("required")),
            (
                "response_format",
                serde_json::json!({"type": "json_object"}),
            ),
            ("seed", serde_json::json!(7)),
            ("n", serde_json::json!(2)),
            ("logprobs", serde_json::json!(true)),
            ("top_logprobs", serde_json::json!(2)),
            ("reasoning_effort", serde_json::json!("high")),
        ] {
            let mut r = req(Some(0.0));
            r.extra.insert(field.into(), value);
            assert_ne!(key(&r), base, "{field}");
        }
        let mut r = req(Some(0.0));
        r.params.thinking = Some(serde_json::json!({"type": "enabled", "budget_tokens": 2048}));
        assert_ne!(key(&r), base, "thinking");
        let mut r = req(Some(0.0));
        r.extra.insert("stream".into(), serde_json::json!(true));
        r.extra.insert(
            "stream_options".into(),
            serde_json::json!({"include_usage": true}),
        );
        assert_eq!(key(&r), base);
    }
}
