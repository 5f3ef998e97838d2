-- sluice schema, PostgreSQL flavour. Times are milliseconds since the Unix epoch (BIGINT),
-- ids are TEXT (UUID v7, simple form). Objects are created unqualified, in the first
-- schema of the connection's search_path.

CREATE TABLE users (
    id          TEXT   PRIMARY KEY,
    name        TEXT   NOT NULL UNIQUE,
    created_at  BIGINT NOT NULL
);

CREATE TABLE api_keys (
    id          TEXT    PRIMARY KEY,
    user_id     TEXT    NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    name        TEXT    NOT NULL,
    -- SHA-256 of the key (32 bytes); the key itself is never stored.
    key_hash    BYTEA   NOT NULL UNIQUE CHECK (octet_length(key_hash) = 32),
    prefix      TEXT    NOT NULL,
    is_admin    BOOLEAN NOT NULL DEFAULT FALSE,
    created_at  BIGINT  NOT NULL,
    revoked_at  BIGINT
);
-- `sluice keys revoke <name>` and listing a user's keys.
CREATE INDEX api_keys_name ON api_keys (name);
CREATE INDEX api_keys_user ON api_keys (user_id);

CREATE TABLE sessions (
    id          TEXT   PRIMARY KEY,
    user_id     TEXT   NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    agent       TEXT,
    title       TEXT,
    created_at  BIGINT NOT NULL,
    updated_at  BIGINT NOT NULL
);
-- `id` is the tie-breaker of the keyset pagination, so the index serves it in order.
CREATE INDEX sessions_user_updated ON sessions (user_id, updated_at DESC, id DESC);

CREATE TABLE messages (
    id                 TEXT   PRIMARY KEY,
    session_id         TEXT   NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
    role               TEXT   NOT NULL,
    content            TEXT   NOT NULL,
    status             TEXT   NOT NULL
        CHECK (status IN ('complete', 'streaming', 'cancelled', 'failed', 'interrupted')),
    generation_id      TEXT,
    model              TEXT,
    prompt_tokens      BIGINT,
    completion_tokens  BIGINT,
    error              TEXT,
    created_at         BIGINT NOT NULL,
    updated_at         BIGINT NOT NULL
);
CREATE INDEX messages_session_created ON messages (session_id, created_at, id);
-- Only the few rows still streaming; scanned by interrupt_streaming.
CREATE INDEX messages_streaming ON messages (status) WHERE status = 'streaming';

-- A ledger: no foreign keys, so records outlive the sessions and keys they mention.
CREATE TABLE usage_records (
    id                 TEXT   PRIMARY KEY,
    user_id            TEXT   NOT NULL,
    key_id             TEXT,
    session_id         TEXT,
    provider           TEXT   NOT NULL,
    model              TEXT   NOT NULL,
    prompt_tokens      BIGINT NOT NULL,
    completion_tokens  BIGINT NOT NULL,
    created_at         BIGINT NOT NULL
);
CREATE INDEX usage_records_user_created ON usage_records (user_id, created_at);
CREATE INDEX usage_records_key_created ON usage_records (key_id, created_at);

CREATE TABLE agents (
    id               TEXT             PRIMARY KEY,
    name             TEXT             NOT NULL UNIQUE,
    -- NULL routes by model name.
    provider         TEXT,
    model            TEXT             NOT NULL,
    system_prompt    TEXT,
    temperature      DOUBLE PRECISION,
    max_tokens       BIGINT,
    -- JSON array of model names tried in order when `model` fails.
    fallback_models  TEXT             NOT NULL DEFAULT '[]',
    knowledge        BOOLEAN          NOT NULL DEFAULT FALSE,
    is_active        BOOLEAN          NOT NULL DEFAULT TRUE,
    created_at       BIGINT           NOT NULL,
    updated_at       BIGINT           NOT NULL
);
CREATE INDEX agents_provider_active ON agents (provider, is_active);

CREATE TABLE scenes (
    id          TEXT   PRIMARY KEY,
    name        TEXT   NOT NULL UNIQUE,
    -- Agent name, not id: scenes are written by hand and read by name.
    agent       TEXT   NOT NULL,
    template    TEXT   NOT NULL,
    created_at  BIGINT NOT NULL,
    updated_at  BIGINT NOT NULL
);

CREATE TABLE tasks (
    id               TEXT   PRIMARY KEY,
    user_id          TEXT   NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    key_id           TEXT,
    agent            TEXT   NOT NULL,
    scene            TEXT,
    -- JSON as TEXT, like SQLite, so both backends read and write it the same way.
    input            TEXT   NOT NULL,
    status           TEXT   NOT NULL,
    result           TEXT,
    error            TEXT,
    progress_tokens  BIGINT NOT NULL DEFAULT 0,
    created_at       BIGINT NOT NULL,
    started_at       BIGINT,
    finished_at      BIGINT
);
CREATE INDEX tasks_user_created ON tasks (user_id, created_at DESC);
CREATE INDEX tasks_status_created ON tasks (status, created_at);

CREATE TABLE knowledge_docs (
    id          TEXT   PRIMARY KEY,
    title       TEXT   NOT NULL,
    content     TEXT   NOT NULL,
    -- JSON array of strings.
    tags        TEXT   NOT NULL DEFAULT '[]',
    created_at  BIGINT NOT NULL,
    -- Kept by PostgreSQL itself, so no write path can forget it. Title outranks tags,
    -- tags outrank body text (ts_rank weights).
    search      TSVECTOR GENERATED ALWAYS AS (
        setweight(to_tsvector('english', title), 'A')
        || setweight(to_tsvector('english', tags), 'B')
        || setweight(to_tsvector('english', content), 'C')
    ) STORED
);
CREATE INDEX knowledge_docs_search ON knowledge_docs USING GIN (search);
