//! The statements both backends run, each written once in PostgreSQL's dialect. SQLite's
//! text is derived at compile time by [`sqlite_text`], so a statement cannot drift between
//! the two and nothing is rewritten per call. Statements the engines do differently
//! (full-text search, the task claim's row lock, the one-round-trip message insert,
//! migrations) stay in their backend.

/// One statement in both dialects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sql {
    pg: &'static str,
    sqlite: &'static str,
}

impl Sql {
    #[doc(hidden)]
    pub const fn new(pg: &'static str, sqlite: &'static str) -> Self {
        Self { pg, sqlite }
    }

    /// The text PostgreSQL runs (`$1` placeholders).
    pub const fn pg(&self) -> &'static str {
        self.pg
    }

    /// The text SQLite runs (`?1` placeholders).
    pub const fn sqlite(&self) -> &'static str {
        self.sqlite
    }
}

/// PostgreSQL's byte-order collation, and SQLite's name for the same order.
const COLLATE_PG: &[u8] = b"COLLATE \"C\"";
const COLLATE_SQLITE: &[u8] = b"COLLATE BINARY";

const fn starts_with_at(s: &[u8], at: usize, p: &[u8]) -> bool {
    if at + p.len() > s.len() {
        return false;
    }
    let mut i = 0;
    while i < p.len() {
        if s[at + i] != p[i] {
            return false;
        }
        i += 1;
    }
    true
}

/// The rewrite, in one pass: `$N` becomes `?N` (a bare `$N` would be a *named* parameter
/// to SQLite, numbered by first appearance) and `COLLATE "C"` becomes `COLLATE BINARY`.
/// Writes into `out` when given; returns the rewritten length either way.
const fn rewrite(pg: &[u8], out: &mut [u8], write: bool) -> usize {
    let (mut i, mut o) = (0, 0);
    while i < pg.len() {
        if starts_with_at(pg, i, COLLATE_PG) {
            let mut k = 0;
            while k < COLLATE_SQLITE.len() {
                if write {
                    out[o + k] = COLLATE_SQLITE[k];
                }
                k += 1;
            }
            i += COLLATE_PG.len();
            o += COLLATE_SQLITE.len();
            continue;
        }
        let b = pg[i];
        let placeholder = b == b'$' && i + 1 < pg.len() && pg[i + 1].is_ascii_digit();
        if write {
            out[o] = if placeholder { b'?' } else { b };
        }
        i += 1;
        o += 1;
    }
    o
}

/// The length of `pg` in SQLite's dialect.
pub const fn sqlite_len(pg: &str) -> usize {
    rewrite(pg.as_bytes(), &mut [], false)
}

/// `pg` in SQLite's dialect; `N` is [`sqlite_len`] of it.
pub const fn sqlite_text<const N: usize>(pg: &str) -> [u8; N] {
    let mut out = [0u8; N];
    let n = rewrite(pg.as_bytes(), &mut out, true);
    assert!(n == N, "sqlite_text: wrong length");
    out
}

/// A statement written once (PostgreSQL's dialect); SQLite's text made at compile time.
macro_rules! shared {
    ($pg:expr) => {{
        const PG: &str = $pg;
        const N: usize = $crate::store::sql::sqlite_len(PG);
        const BYTES: [u8; N] = $crate::store::sql::sqlite_text::<N>(PG);
        const SQLITE: &str = match ::core::str::from_utf8(&BYTES) {
            Ok(s) => s,
            Err(_) => panic!("a rewritten statement is not UTF-8"),
        };
        $crate::store::sql::Sql::new(PG, SQLITE)
    }};
}

// Users and keys.

pub const INSERT_USER: Sql = shared!(
    "INSERT INTO users (id, name, created_at) VALUES ($1, $2, $3)
     ON CONFLICT (name) DO NOTHING"
);
pub const USER_BY_NAME: Sql = shared!("SELECT id, name, created_at FROM users WHERE name = $1");
pub const INSERT_API_KEY: Sql = shared!(
    "INSERT INTO api_keys (id, user_id, name, key_hash, prefix, is_admin, created_at)
     VALUES ($1, $2, $3, $4, $5, $6, $7)"
);
pub const LIST_API_KEYS: Sql = shared!(
    "SELECT id, user_id, name, prefix, is_admin, created_at, revoked_at
     FROM api_keys ORDER BY created_at, id"
);
pub const REVOKE_API_KEY: Sql = shared!(
    "UPDATE api_keys SET revoked_at = $2
     WHERE (id = $1 OR name = $1) AND revoked_at IS NULL"
);
pub const API_KEY_BY_HASH: Sql = shared!(
    "SELECT id, user_id, name, prefix, is_admin, created_at, revoked_at
     FROM api_keys WHERE key_hash = $1 AND revoked_at IS NULL"
);
pub const API_KEY_BY_ID: Sql = shared!(
    "SELECT id, user_id, name, prefix, is_admin, created_at, revoked_at
     FROM api_keys WHERE id = $1 AND revoked_at IS NULL"
);

// Sessions and messages.

pub const INSERT_SESSION: Sql = shared!(
    "INSERT INTO sessions (id, user_id, agent, title, created_at, updated_at)
     VALUES ($1, $2, $3, $4, $5, $6)"
);
pub const LIST_SESSIONS: Sql = shared!(
    "SELECT id, user_id, agent, title, created_at, updated_at
     FROM sessions WHERE user_id = $1
     ORDER BY updated_at DESC, id DESC LIMIT $2"
);
/// The row comparison matches the index order, so this is an index range scan.
pub const LIST_SESSIONS_AFTER: Sql = shared!(
    "SELECT id, user_id, agent, title, created_at, updated_at
     FROM sessions WHERE user_id = $1 AND (updated_at, id) < ($2, $3)
     ORDER BY updated_at DESC, id DESC LIMIT $4"
);
pub const GET_SESSION: Sql = shared!(
    "SELECT id, user_id, agent, title, created_at, updated_at
     FROM sessions WHERE id = $1 AND user_id = $2"
);
/// Messages go with the session through `ON DELETE CASCADE`.
pub const DELETE_SESSION: Sql = shared!("DELETE FROM sessions WHERE id = $1 AND user_id = $2");
pub const UPDATE_SESSION_TITLE: Sql = shared!(
    "UPDATE sessions SET title = $3 WHERE id = $1 AND user_id = $2
     RETURNING id, user_id, agent, title, created_at, updated_at"
);
pub const LIST_MESSAGES: Sql = shared!(
    "SELECT id, session_id, role, content, status, generation_id, model,
            prompt_tokens, completion_tokens, error, created_at, updated_at,
            reasoning
     FROM messages WHERE session_id = $1 ORDER BY created_at, id"
);
pub const INSERT_MESSAGE: Sql = shared!(
    "INSERT INTO messages (id, session_id, role, content, status, generation_id,
         model, prompt_tokens, completion_tokens, error, created_at, updated_at,
         reasoning)
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)"
);
pub const TOUCH_SESSION: Sql = shared!("UPDATE sessions SET updated_at = $2 WHERE id = $1");
pub const UPDATE_MESSAGE: Sql = shared!(
    "UPDATE messages SET content = $2, status = $3, prompt_tokens = $4,
         completion_tokens = $5, error = $6, updated_at = $7, reasoning = $8
     WHERE id = $1"
);
pub const INTERRUPT_STREAMING: Sql = shared!(
    "UPDATE messages SET status = 'interrupted', updated_at = $1
     WHERE status = 'streaming'"
);
/// The slot is free when empty, expired, or held by a generation whose reply is settled.
pub const CLAIM_GENERATION: Sql = shared!(
    "UPDATE sessions
     SET running_generation = $2, running_server = $3, running_expires = $5
     WHERE id = $1 AND (
         running_generation IS NULL
         OR running_expires < $4
         OR EXISTS (SELECT 1 FROM messages m
                    WHERE m.session_id = sessions.id
                      AND m.generation_id = sessions.running_generation
                      AND m.status <> 'streaming'))"
);
pub const RUNNING_GENERATION: Sql =
    shared!("SELECT running_generation FROM sessions WHERE id = $1");
pub const RELEASE_GENERATION: Sql = shared!(
    "UPDATE sessions
     SET running_generation = NULL, running_server = NULL, running_expires = NULL
     WHERE id = $1 AND running_generation = $2"
);
pub const INTERRUPT_STREAMING_OF: Sql = shared!(
    "UPDATE messages SET status = 'interrupted', updated_at = $2
     WHERE status = 'streaming' AND NOT EXISTS (
         SELECT 1 FROM sessions s
         WHERE s.id = messages.session_id
           AND s.running_generation = messages.generation_id
           AND s.running_server <> $1
           AND s.running_expires >= $2)"
);

// Usage.

pub const INSERT_USAGE: Sql = shared!(
    "INSERT INTO usage_records (id, user_id, key_id, session_id, provider, model,
         prompt_tokens, completion_tokens, created_at, reasoning_tokens)
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)"
);
/// PostgreSQL's sum of BIGINT is NUMERIC: the casts bring it back to BIGINT.
pub const USAGE_SUMMARY: Sql = shared!(
    "SELECT key_id, model, count(*), CAST(coalesce(sum(prompt_tokens), 0) AS BIGINT),
            CAST(coalesce(sum(completion_tokens), 0) AS BIGINT),
            CAST(coalesce(sum(reasoning_tokens), 0) AS BIGINT)
     FROM usage_records
     WHERE created_at >= $1 AND created_at < $2
     GROUP BY key_id, model ORDER BY key_id, model"
);

// Agents, scenes and knowledge.

pub const INSERT_AGENT: Sql = shared!(
    "INSERT INTO agents (id, name, provider, model, system_prompt, temperature,
         max_tokens, fallback_models, knowledge, is_active, created_at, updated_at)
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)"
);
/// The row keeps its id and created_at: the name is the agent's identity here.
pub const UPDATE_AGENT: Sql = shared!(
    "UPDATE agents SET provider = $2, model = $3, system_prompt = $4,
         temperature = $5, max_tokens = $6, fallback_models = $7,
         knowledge = $8, is_active = $9, updated_at = $10
     WHERE name = $1"
);
pub const GET_AGENT: Sql = shared!(
    "SELECT id, name, provider, model, system_prompt, temperature, max_tokens,
            fallback_models, knowledge, is_active, created_at, updated_at
     FROM agents WHERE name = $1"
);
/// Byte order on both, whatever the PostgreSQL database's locale.
pub const LIST_AGENTS: Sql = shared!(
    "SELECT id, name, provider, model, system_prompt, temperature, max_tokens,
            fallback_models, knowledge, is_active, created_at, updated_at
     FROM agents ORDER BY name COLLATE \"C\""
);
pub const DELETE_AGENT: Sql = shared!("DELETE FROM agents WHERE name = $1");
pub const INSERT_SCENE: Sql = shared!(
    "INSERT INTO scenes (id, name, agent, template, created_at, updated_at)
     VALUES ($1, $2, $3, $4, $5, $6)"
);
/// As agents: id and created_at stay.
pub const UPDATE_SCENE: Sql =
    shared!("UPDATE scenes SET agent = $2, template = $3, updated_at = $4 WHERE name = $1");
pub const GET_SCENE: Sql = shared!(
    "SELECT id, name, agent, template, created_at, updated_at
     FROM scenes WHERE name = $1"
);
pub const LIST_SCENES: Sql = shared!(
    "SELECT id, name, agent, template, created_at, updated_at
     FROM scenes ORDER BY name COLLATE \"C\""
);
pub const DELETE_SCENE: Sql = shared!("DELETE FROM scenes WHERE name = $1");
/// One statement, so the index (SQLite's FTS trigger, PostgreSQL's generated column)
/// commits with the row or not at all.
pub const INSERT_KNOWLEDGE: Sql = shared!(
    "INSERT INTO knowledge_docs (id, title, content, tags, created_at)
     VALUES ($1, $2, $3, $4, $5)"
);

// Tasks.

pub const INSERT_TASK: Sql = shared!(
    "INSERT INTO tasks (id, user_id, key_id, agent, scene, input, status, result,
         error, progress_tokens, created_at, started_at, finished_at, reasoning)
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)"
);
/// `$2` NULL reads any user's task.
pub const GET_TASK: Sql = shared!(
    "SELECT id, user_id, key_id, agent, scene, input, status, result, error,
            progress_tokens, created_at, started_at, finished_at, reasoning
     FROM tasks WHERE id = $1 AND (CAST($2 AS TEXT) IS NULL OR user_id = $2)"
);
/// One statement: the status test and the move cannot be split by another writer.
pub const CLAIM_TASK: Sql = shared!(
    "UPDATE tasks SET status = 'running', started_at = $2
     WHERE id = $1 AND status IN ('queued', 'running')
     RETURNING id, user_id, key_id, agent, scene, input, status, result, error,
               progress_tokens, created_at, started_at, finished_at, reasoning"
);
/// Only while running: a late write of a worker that lost the task must not change a
/// settled record.
pub const SET_TASK_PROGRESS: Sql =
    shared!("UPDATE tasks SET progress_tokens = $2 WHERE id = $1 AND status = 'running'");
pub const FINISH_TASK: Sql = shared!(
    "UPDATE tasks SET status = $2, result = $3, error = $4, finished_at = $5,
         reasoning = $6
     WHERE id = $1 AND status = 'running'"
);
pub const CANCEL_TASK: Sql =
    shared!("UPDATE tasks SET status = 'cancelled', finished_at = $2 WHERE id = $1");
pub const LIST_UNFINISHED_TASKS: Sql = shared!(
    "SELECT id, user_id, key_id, agent, scene, input, status, result, error,
            progress_tokens, created_at, started_at, finished_at, reasoning
     FROM tasks WHERE status IN ('queued', 'running')
     ORDER BY created_at, id"
);
/// `id` breaks ties between tasks created in the same millisecond, so positions are
/// distinct; the count is a range scan of tasks_status_created.
pub const TASK_POSITION: Sql = shared!(
    "SELECT (SELECT count(*) FROM tasks q
             WHERE q.status = 'queued'
               AND (q.created_at, q.id) <= (t.created_at, t.id))
     FROM tasks t WHERE t.id = $1 AND t.status = 'queued'"
);
pub const COUNT_QUEUED_TASKS: Sql = shared!("SELECT count(*) FROM tasks WHERE status = 'queued'");

// Stored responses (`/v1/responses`).

pub const INSERT_RESPONSE: Sql = shared!(
    "INSERT INTO responses (id, user_id, status, body, input_items, server, created_at,
         updated_at)
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8)"
);
/// Only an unfinished response moves: a response settles exactly once.
pub const FINISH_RESPONSE: Sql = shared!(
    "UPDATE responses SET status = $2, body = $3, updated_at = $4, server = NULL
     WHERE id = $1 AND status IN ('queued', 'in_progress')"
);
pub const GET_RESPONSE: Sql = shared!(
    "SELECT id, user_id, status, body, input_items, server, cancel_at, created_at, updated_at
     FROM responses WHERE id = $1 AND user_id = $2"
);
pub const DELETE_RESPONSE: Sql = shared!("DELETE FROM responses WHERE id = $1 AND user_id = $2");
pub const REQUEST_RESPONSE_CANCEL: Sql = shared!(
    "UPDATE responses SET cancel_at = $3
     WHERE id = $1 AND user_id = $2 AND status IN ('queued', 'in_progress')"
);
/// `$1` NULL: every unfinished response (an embedded instance restarting); else those of
/// that instance.
pub const FAIL_UNFINISHED_RESPONSES: Sql = shared!(
    "UPDATE responses SET status = 'failed', server = NULL, updated_at = $2
     WHERE status IN ('queued', 'in_progress')
       AND (CAST($1 AS TEXT) IS NULL OR server = $1)"
);

/// Every shared statement, so a test can have each backend parse each one.
#[cfg(test)]
pub const ALL: &[(&str, Sql)] = &[
    ("INSERT_USER", INSERT_USER),
    ("USER_BY_NAME", USER_BY_NAME),
    ("INSERT_API_KEY", INSERT_API_KEY),
    ("LIST_API_KEYS", LIST_API_KEYS),
    ("REVOKE_API_KEY", REVOKE_API_KEY),
    ("API_KEY_BY_HASH", API_KEY_BY_HASH),
    ("API_KEY_BY_ID", API_KEY_BY_ID),
    ("INSERT_SESSION", INSERT_SESSION),
    ("LIST_SESSIONS", LIST_SESSIONS),
    ("LIST_SESSIONS_AFTER", LIST_SESSIONS_AFTER),
    ("GET_SESSION", GET_SESSION),
    ("DELETE_SESSION", DELETE_SESSION),
    ("UPDATE_SESSION_TITLE", UPDATE_SESSION_TITLE),
    ("LIST_MESSAGES", LIST_MESSAGES),
    ("INSERT_MESSAGE", INSERT_MESSAGE),
    ("TOUCH_SESSION", TOUCH_SESSION),
    ("UPDATE_MESSAGE", UPDATE_MESSAGE),
    ("INTERRUPT_STREAMING", INTERRUPT_STREAMING),
    ("CLAIM_GENERATION", CLAIM_GENERATION),
    ("RUNNING_GENERATION", RUNNING_GENERATION),
    ("RELEASE_GENERATION", RELEASE_GENERATION),
    ("INTERRUPT_STREAMING_OF", INTERRUPT_STREAMING_OF),
    ("INSERT_USAGE", INSERT_USAGE),
    ("USAGE_SUMMARY", USAGE_SUMMARY),
    ("INSERT_AGENT", INSERT_AGENT),
    ("UPDATE_AGENT", UPDATE_AGENT),
    ("GET_AGENT", GET_AGENT),
    ("LIST_AGENTS", LIST_AGENTS),
    ("DELETE_AGENT", DELETE_AGENT),
    ("INSERT_SCENE", INSERT_SCENE),
    ("UPDATE_SCENE", UPDATE_SCENE),
    ("GET_SCENE", GET_SCENE),
    ("LIST_SCENES", LIST_SCENES),
    ("DELETE_SCENE", DELETE_SCENE),
    ("INSERT_KNOWLEDGE", INSERT_KNOWLEDGE),
    ("INSERT_TASK", INSERT_TASK),
    ("GET_TASK", GET_TASK),
    ("CLAIM_TASK", CLAIM_TASK),
    ("SET_TASK_PROGRESS", SET_TASK_PROGRESS),
    ("FINISH_TASK", FINISH_TASK),
    ("CANCEL_TASK", CANCEL_TASK),
    ("LIST_UNFINISHED_TASKS", LIST_UNFINISHED_TASKS),
    ("TASK_POSITION", TASK_POSITION),
    ("COUNT_QUEUED_TASKS", COUNT_QUEUED_TASKS),
    ("INSERT_RESPONSE", INSERT_RESPONSE),
    ("FINISH_RESPONSE", FINISH_RESPONSE),
    ("GET_RESPONSE", GET_RESPONSE),
    ("DELETE_RESPONSE", DELETE_RESPONSE),
    ("REQUEST_RESPONSE_CANCEL", REQUEST_RESPONSE_CANCEL),
    ("FAIL_UNFINISHED_RESPONSES", FAIL_UNFINISHED_RESPONSES),
];

#[cfg(test)]
mod tests {
    use super::*;

    fn lite(pg: &str) -> String {
        let mut out = vec![0u8; sqlite_len(pg)];
        let n = rewrite(pg.as_bytes(), &mut out, true);
        assert_eq!(n, out.len());
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn placeholders_become_numbered_question_marks() {
        assert_eq!(
            lite("UPDATE t SET a = $2 WHERE id = $1 OR name = $1 LIMIT $12"),
            "UPDATE t SET a = ?2 WHERE id = ?1 OR name = ?1 LIMIT ?12"
        );
    }

    #[test]
    fn a_dollar_not_before_a_digit_stays() {
        assert_eq!(lite("SELECT '$x', '$' || a$b$"), "SELECT '$x', '$' || a$b$");
    }

    #[test]
    fn byte_order_collation_is_renamed() {
        assert_eq!(
            lite("SELECT name FROM a ORDER BY name COLLATE \"C\", id"),
            "SELECT name FROM a ORDER BY name COLLATE BINARY, id"
        );
        assert_eq!(lite("COLLATE \"C\""), "COLLATE BINARY");
        // A partial match at the end is copied as it is.
        assert_eq!(lite("x COLLATE \"C"), "x COLLATE \"C");
    }

    #[test]
    fn the_compile_time_text_is_the_rewrite() {
        for (name, s) in ALL {
            assert_eq!(s.sqlite(), lite(s.pg()), "{name}");
            assert!(!s.sqlite().contains('$'), "{name}: {}", s.sqlite());
        }
        assert!(
            LIST_AGENTS
                .sqlite()
                .ends_with("ORDER BY name COLLATE BINARY")
        );
    }

    #[test]
    fn every_statement_is_listed_once() {
        let mut names: Vec<_> = ALL.iter().map(|(n, _)| *n).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), ALL.len());
    }
}
