-- sluice schema, SQLite flavour. Times are milliseconds since the Unix epoch (INTEGER),
-- ids are TEXT (UUID v7, simple form). Tables are STRICT so a wrong type is an error,
-- as it would be on PostgreSQL.

CREATE TABLE users (
    id          TEXT    PRIMARY KEY,
    name        TEXT    NOT NULL UNIQUE,
    created_at  INTEGER NOT NULL
) STRICT;

CREATE TABLE api_keys (
    id          TEXT    PRIMARY KEY,
    user_id     TEXT    NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    name        TEXT    NOT NULL,
    -- SHA-256 of the key (32 bytes); the key itself is never stored.
    key_hash    BLOB    NOT NULL UNIQUE,
    prefix      TEXT    NOT NULL,
    is_admin    INTEGER NOT NULL DEFAULT 0 CHECK (is_admin IN (0, 1)),
    created_at  INTEGER NOT NULL,
    revoked_at  INTEGER
) STRICT;
-- `sluice keys revoke <name>` and listing a user's keys.
CREATE INDEX api_keys_name ON api_keys (name);
CREATE INDEX api_keys_user ON api_keys (user_id);

CREATE TABLE sessions (
    id          TEXT    PRIMARY KEY,
    user_id     TEXT    NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    agent       TEXT,
    title       TEXT,
    created_at  INTEGER NOT NULL,
    updated_at  INTEGER NOT NULL
) STRICT;
-- `id` is the tie-breaker of the keyset pagination, so the index serves it in order.
CREATE INDEX sessions_user_updated ON sessions (user_id, updated_at DESC, id DESC);

CREATE TABLE messages (
    id                 TEXT    PRIMARY KEY,
    session_id         TEXT    NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
    role               TEXT    NOT NULL,
    content            TEXT    NOT NULL,
    status             TEXT    NOT NULL
        CHECK (status IN ('complete', 'streaming', 'cancelled', 'failed', 'interrupted')),
    generation_id      TEXT,
    model              TEXT,
    prompt_tokens      INTEGER,
    completion_tokens  INTEGER,
    error              TEXT,
    created_at         INTEGER NOT NULL,
    updated_at         INTEGER NOT NULL
) STRICT;
CREATE INDEX messages_session_created ON messages (session_id, created_at, id);
-- Only the few rows still streaming; scanned at every start by interrupt_streaming.
CREATE INDEX messages_streaming ON messages (status) WHERE status = 'streaming';

-- A ledger: no foreign keys, so records outlive the sessions and keys they mention.
CREATE TABLE usage_records (
    id                 TEXT    PRIMARY KEY,
    user_id            TEXT    NOT NULL,
    key_id             TEXT,
    session_id         TEXT,
    provider           TEXT    NOT NULL,
    model              TEXT    NOT NULL,
    prompt_tokens      INTEGER NOT NULL,
    completion_tokens  INTEGER NOT NULL,
    created_at         INTEGER NOT NULL
) STRICT;
CREATE INDEX usage_records_user_created ON usage_records (user_id, created_at);
CREATE INDEX usage_records_key_created ON usage_records (key_id, created_at);

CREATE TABLE agents (
    id               TEXT    PRIMARY KEY,
    name             TEXT    NOT NULL UNIQUE,
    -- NULL routes by model name.
    provider         TEXT,
    model            TEXT    NOT NULL,
    system_prompt    TEXT,
    temperature      REAL,
    max_tokens       INTEGER,
    -- JSON array of model names tried in order when `model` fails.
    fallback_models  TEXT    NOT NULL DEFAULT '[]',
    knowledge        INTEGER NOT NULL DEFAULT 0 CHECK (knowledge IN (0, 1)),
    is_active        INTEGER NOT NULL DEFAULT 1 CHECK (is_active IN (0, 1)),
    created_at       INTEGER NOT NULL,
    updated_at       INTEGER NOT NULL
) STRICT;
CREATE INDEX agents_provider_active ON agents (provider, is_active);

CREATE TABLE scenes (
    id          TEXT    PRIMARY KEY,
    name        TEXT    NOT NULL UNIQUE,
    -- Agent name, not id: scenes are written by hand and read by name.
    agent       TEXT    NOT NULL,
    template    TEXT    NOT NULL,
    created_at  INTEGER NOT NULL,
    updated_at  INTEGER NOT NULL
) STRICT;

CREATE TABLE tasks (
    id               TEXT    PRIMARY KEY,
    user_id          TEXT    NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    key_id           TEXT,
    agent            TEXT    NOT NULL,
    scene            TEXT,
    -- JSON: the scene variables or the messages.
    input            TEXT    NOT NULL,
    status           TEXT    NOT NULL,
    result           TEXT,
    error            TEXT,
    progress_tokens  INTEGER NOT NULL DEFAULT 0,
    created_at       INTEGER NOT NULL,
    started_at       INTEGER,
    finished_at      INTEGER
) STRICT;
CREATE INDEX tasks_user_created ON tasks (user_id, created_at DESC);
CREATE INDEX tasks_status_created ON tasks (status, created_at);

-- `doc_no` is an explicit INTEGER PRIMARY KEY because the FTS index refers to rows by
-- rowid, and VACUUM may renumber implicit rowids.
CREATE TABLE knowledge_docs (
    doc_no      INTEGER PRIMARY KEY,
    id          TEXT    NOT NULL UNIQUE,
    title       TEXT    NOT NULL,
    content     TEXT    NOT NULL,
    -- JSON array of strings.
    tags        TEXT    NOT NULL DEFAULT '[]',
    created_at  INTEGER NOT NULL
) STRICT;

-- External-content FTS5 index (the text lives once, in knowledge_docs). Porter stemming
-- so that matching is close to PostgreSQL's 'english' configuration.
CREATE VIRTUAL TABLE knowledge_fts USING fts5 (
    title, tags, content,
    content = 'knowledge_docs',
    content_rowid = 'doc_no',
    tokenize = 'porter unicode61'
);

CREATE TRIGGER knowledge_docs_ai AFTER INSERT ON knowledge_docs BEGIN
    INSERT INTO knowledge_fts (rowid, title, tags, content)
    VALUES (new.doc_no, new.title, new.tags, new.content);
END;

CREATE TRIGGER knowledge_docs_ad AFTER DELETE ON knowledge_docs BEGIN
    INSERT INTO knowledge_fts (knowledge_fts, rowid, title, tags, content)
    VALUES ('delete', old.doc_no, old.title, old.tags, old.content);
END;

CREATE TRIGGER knowledge_docs_au AFTER UPDATE ON knowledge_docs BEGIN
    INSERT INTO knowledge_fts (knowledge_fts, rowid, title, tags, content)
    VALUES ('delete', old.doc_no, old.title, old.tags, old.content);
    INSERT INTO knowledge_fts (rowid, title, tags, content)
    VALUES (new.doc_no, new.title, new.tags, new.content);
END;
