//! The deterministic reply text the mock streams.

use std::sync::LazyLock;

/// Each word is chosen to break a careless relay somewhere: multibyte UTF-8
/// that can be split mid-character by a byte-oriented chunker, characters
/// that must be JSON-escaped, a newline that would end an SSE line if it were
/// forwarded unescaped, and an SSE field prefix inside the content.
const WORDS: &[&str] = &[
    "Hello",
    "héllo",
    "世界",
    "🦀",
    "naïve",
    "say \"hi\"",
    "line\nbreak",
    "data: x",
    "back\\slash",
    "tab\tstop",
    "<b>&amp;</b>",
    "über",
    "quick",
    "brown",
    "fox.",
];

/// JSON string literals (quotes included) of every token, built once so the
/// hot path of a zero-delay stream is a few `memcpy`s per token.
static ESCAPED: LazyLock<Vec<String>> = LazyLock::new(|| {
    (0..WORDS.len())
        .map(|i| json_string(&token_text(i)))
        .collect()
});

/// Deterministic text of token `i`: a word from a fixed cycle followed by a
/// single space.
pub fn token_text(i: usize) -> String {
    let word = WORDS[i % WORDS.len()];
    let mut s = String::with_capacity(word.len() + 1);
    s.push_str(word);
    s.push(' ');
    s
}

/// The text a client must reassemble from a reply of `tokens` tokens.
pub fn full_reply(tokens: usize) -> String {
    (0..tokens).map(token_text).collect()
}

/// `token_text(i)` as a JSON string literal, including the quotes.
pub(crate) fn token_json(i: usize) -> &'static str {
    &ESCAPED[i % ESCAPED.len()]
}

/// A JSON string literal for arbitrary text (model names echoed back).
pub(crate) fn json_string(s: &str) -> String {
    // Serialising a `&str` cannot fail; the fallback only keeps clippy's
    // no-unwrap rule satisfied.
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".to_owned())
}
