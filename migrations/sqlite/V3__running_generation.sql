-- A session's one running generation, held in the store (see the PostgreSQL flavour): the
-- generation, the instance running it, and when the hold lapses (unix ms).
ALTER TABLE sessions ADD COLUMN running_generation TEXT;
ALTER TABLE sessions ADD COLUMN running_server TEXT;
ALTER TABLE sessions ADD COLUMN running_expires INTEGER;
