//! Text forms of the enums both backends store, so the two cannot drift apart.

use super::{StoreError, TaskStatus};
use crate::domain::Role;

/// The same spelling as the API's JSON.
pub(super) fn role_str(role: Role) -> &'static str {
    role.as_str()
}

pub(super) fn parse_role(s: &str) -> Option<Role> {
    Role::parse(s)
}

/// A value the database holds but this build cannot read: a newer schema, or a hand edit.
#[derive(Debug, thiserror::Error)]
#[error("unexpected {column} value {value:?}")]
pub(super) struct BadValue {
    pub column: &'static str,
    pub value: String,
}

/// Migration errors can quote the whole failing script; the start is the useful part.
pub(super) fn brief(e: &dyn std::fmt::Display) -> String {
    let s = e.to_string();
    match s.char_indices().nth(400) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s,
    }
}

/// `fallback_models` and `tags`: a JSON array of strings in a TEXT column.
pub(super) fn json_list(items: &[String]) -> Result<String, StoreError> {
    serde_json::to_string(items)
        .map_err(|e| StoreError::Backend(format!("encoding a list: {e}").into()).with_source(e))
}

pub(super) fn parse_json_list(column: &'static str, text: &str) -> Result<Vec<String>, BadValue> {
    serde_json::from_str(text).map_err(|_| BadValue {
        column,
        value: text.to_owned(),
    })
}

/// `finish_task` with `queued` or `running` would make a task final without being one.
pub(super) fn check_final(status: TaskStatus) -> Result<(), StoreError> {
    if status.is_final() {
        Ok(())
    } else {
        Err(StoreError::Backend(
            format!("finish_task: {} is not a final status", status.as_str()).into(),
        ))
    }
}

/// More words than this buy no better hits, only a slower search: the query is often a
/// whole chat message.
const MAX_SEARCH_TERMS: usize = 32;

/// PostgreSQL's `english` stop words (the Snowball list). PostgreSQL drops them from a
/// query by itself; FTS5 has no such list, and there a question's "how", "with" and "the"
/// would match (and rank) documents on their own. Dropping them here makes both backends
/// match on the same words.
const STOP_WORDS: &str = "\
    i me my myself we our ours ourselves you your yours yourself yourselves he \
    him his himself she her hers herself it its itself they them their theirs \
    themselves what which who whom this that these those am is are was were be \
    been being have has had having do does did doing a an the and but if or \
    because as until while of at by for with about against between into through \
    during before after above below to from up down in out on off over under \
    again further then once here there when where why how all any both each few \
    more most other some such no nor not only own same so than too very s t can \
    will just don should now";

/// The words of a knowledge search, the same for both backends: user text split at white
/// space and ASCII punctuation (which is all FTS5 and tsquery syntax is made of), so no
/// input is ever read as search syntax. Stop words dropped, case-insensitively distinct,
/// in order, at most [`MAX_SEARCH_TERMS`]. Other characters stay: each engine's tokenizer
/// handles them.
///
/// The backends match documents with ANY of the words, ranked by how well they match:
/// the query is often a question in plain language, whose every word no document holds.
pub(super) fn search_terms(query: &str) -> Vec<String> {
    let mut seen = std::collections::HashSet::new();
    query
        .split(|c: char| c.is_whitespace() || (c.is_ascii() && !c.is_ascii_alphanumeric()))
        .filter(|w| {
            let lower = w.to_lowercase();
            !w.is_empty()
                && !STOP_WORDS.split_ascii_whitespace().any(|s| s == lower)
                && seen.insert(lower)
        })
        .take(MAX_SEARCH_TERMS)
        .map(str::to_owned)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn search_terms_drop_all_syntax() {
        assert_eq!(
            search_terms(r#"  "rate" AND limits* -ops title:x (a OR b) NEAR/2 ^c 'd' "#),
            [
                "rate", "limits", "ops", "title", "x", "b", "NEAR", "2", "c", "d"
            ]
        );
        assert_eq!(search_terms("Rate rate RATE «flux»"), ["Rate", "«flux»"]);
        assert!(search_terms(r#" "*-:"() "#).is_empty());
        assert_eq!(
            search_terms("How do I deal with THE limits?"),
            ["deal", "limits"]
        );
        assert!(search_terms("it is what it is").is_empty());
        assert_eq!(search_terms(&"w ".repeat(100)).len(), 1);
        let many = (0..100)
            .map(|i| format!("w{i}"))
            .collect::<Vec<_>>()
            .join(" ");
        assert_eq!(search_terms(&many).len(), MAX_SEARCH_TERMS);
    }

    #[test]
    fn lists_round_trip_as_json() {
        let list = vec!["a".to_owned(), "b \"q\"".to_owned()];
        let text = json_list(&list).unwrap();
        assert_eq!(parse_json_list("t.c", &text).unwrap(), list);
        assert_eq!(json_list(&[]).unwrap(), "[]");
        assert!(parse_json_list("t.c", "not json").is_err());
    }

    #[test]
    fn only_final_statuses_finish_a_task() {
        assert!(check_final(TaskStatus::Succeeded).is_ok());
        assert!(check_final(TaskStatus::Cancelled).is_ok());
        assert!(check_final(TaskStatus::Running).is_err());
    }

    #[test]
    fn roles_round_trip_with_the_api_spelling() {
        for role in [
            Role::System,
            Role::Developer,
            Role::User,
            Role::Assistant,
            Role::Tool,
            Role::Function,
        ] {
            let json = serde_json::to_value(role).unwrap();
            assert_eq!(json.as_str(), Some(role_str(role)));
            assert_eq!(parse_role(role_str(role)), Some(role));
        }
        assert_eq!(parse_role("robot"), None);
    }
}
