-- A session's one running generation, held across instances in the store itself, so the
-- rule does not depend on Redis being reachable: the generation, the instance running it,
-- and when the hold lapses if nobody releases it (unix ms). All NULL when none runs.
ALTER TABLE sessions ADD COLUMN running_generation TEXT;
ALTER TABLE sessions ADD COLUMN running_server TEXT;
ALTER TABLE sessions ADD COLUMN running_expires BIGINT;
