-- Stored responses of the Responses API (`/v1/responses`): the response object and the
-- input items it was given, as JSON text. `server` is the instance running an unfinished
-- one; `cancel_at` (unix ms) is a cancel asked on another instance, which the runner reads.
CREATE TABLE responses (
    id TEXT PRIMARY KEY,
    user_id TEXT NOT NULL,
    status TEXT NOT NULL,
    body TEXT NOT NULL,
    input_items TEXT NOT NULL,
    server TEXT,
    cancel_at BIGINT,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);
CREATE INDEX responses_unfinished ON responses (server) WHERE status IN ('queued', 'in_progress');
