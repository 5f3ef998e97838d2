//! The built-in `demo` provider: a deterministic reply streamed at a realistic pace, so
//! sluice works out of the box with no API key and no network.

use std::time::Duration;

use async_trait::async_trait;

use super::{EventStream, Provider, UpstreamError};
use crate::domain::{ChatRequest, ChunkEncoder, FinishReason, Role, Usage};

pub struct Demo {
    /// Pause before the first token, like a real model's time to first token.
    first_token: Duration,
    /// Pause between tokens.
    between: Duration,
}

impl Demo {
    pub const NAME: &'static str = "demo";

    pub fn new(first_token: Duration, between: Duration) -> Self {
        Self {
            first_token,
            between,
        }
    }
}

/// The reply to a conversation: the same input always gives the same words.
pub fn reply(req: &ChatRequest) -> String {
    let last = req
        .messages
        .iter()
        .rev()
        .find(|m| m.role == Role::User)
        .map(|m| m.text())
        .unwrap_or_default();
    let quoted: String = last
        .split_whitespace()
        .take(24)
        .collect::<Vec<_>>()
        .join(" ");
    format!(
        "Hello from sluice's built-in demo model. You said: \"{quoted}\". \
         This reply is streamed token by token so you can see the relay at work. \
         Set OPENAI_API_KEY or ANTHROPIC_API_KEY, or list providers in sluice.toml, \
         to talk to a real model."
    )
}

/// Splits text into word-sized tokens that keep their leading space, as real tokenizers do.
fn tokens(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut start = 0;
    for (i, c) in text.char_indices() {
        if c == ' ' && i > start {
            out.push(text[start..i].to_owned());
            start = i;
        }
    }
    if start < text.len() {
        out.push(text[start..].to_owned());
    }
    out
}

fn count_words(req: &ChatRequest) -> u32 {
    req.messages
        .iter()
        .map(|m| m.text().split_whitespace().count() as u32)
        .sum()
}

#[async_trait]
impl Provider for Demo {
    fn name(&self) -> &str {
        Self::NAME
    }

    async fn open(&self, req: &ChatRequest, _model: &str) -> Result<EventStream, UpstreamError> {
        let words = tokens(&reply(req));
        let usage = Usage {
            prompt_tokens: count_words(req),
            completion_tokens: words.len() as u32,
            ..Usage::default()
        };
        let enc = ChunkEncoder::new(
            &format!("chatcmpl-{}", uuid::Uuid::now_v7().simple()),
            crate::domain::chunk::unix_now(),
            Self::NAME,
        );
        let (first, between) = (self.first_token, self.between);
        Ok(Box::pin(async_stream::stream! {
            tokio::time::sleep(first).await;
            yield Ok(enc.role());
            let mut tick = tokio::time::interval(between.max(Duration::from_millis(1)));
            for word in words {
                tick.tick().await;
                yield Ok(enc.content(&word));
            }
            yield Ok(enc.finish(&FinishReason::Stop));
            yield Ok(enc.usage(usage));
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::Message;
    use futures::StreamExt;

    #[tokio::test(start_paused = true)]
    async fn deterministic_reply_streams_word_by_word() {
        let req = ChatRequest {
            model: "demo".into(),
            messages: vec![Message::new(Role::User, "hi there")],
            ..Default::default()
        };
        let p = Demo::new(Duration::from_millis(100), Duration::from_millis(20));
        let s = p.open(&req, "demo").await;
        let Ok(s) = s else { panic!("demo failed") };
        let got: Vec<_> = s.collect().await;
        let text: String = got
            .iter()
            .filter_map(|e| e.as_ref().ok().and_then(|c| c.content()))
            .collect();
        assert_eq!(text, reply(&req));
        assert!(got.len() > 10);
        assert!(matches!(got.last(), Some(Ok(c)) if c.is_usage_only()));
    }
}
