-- Reasoning models think before they answer: their thinking is kept with the reply (and a
-- task's result), and the tokens it took with the usage records.

ALTER TABLE messages ADD COLUMN reasoning TEXT;

ALTER TABLE tasks ADD COLUMN reasoning TEXT;

-- Of completion_tokens; 0 for records made before it was counted.
ALTER TABLE usage_records ADD COLUMN reasoning_tokens INTEGER NOT NULL DEFAULT 0;
