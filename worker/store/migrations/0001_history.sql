-- The durable history (worker/store/history.py): every attempt and every outcome, partitioned by day
-- (UTC). The writer makes each day's partitions and drops those older than NOTIFY_HISTORY_DAYS.
-- A row's primary key is its outbox entry's unique key, so a batch written twice (a writer
-- died between its commit and its acknowledgement) adds nothing the second time.

CREATE TABLE notify_attempts (
    at timestamptz NOT NULL,          -- when the attempt started
    message_id text NOT NULL,
    seq integer NOT NULL,             -- its place among the message's attempts (1, 2, ...)
    number integer,                   -- the attempt number of its run (replays start again)
    outcome text NOT NULL,            -- delivered | retry | dead | deferred
    http_status smallint,
    cause text NOT NULL DEFAULT '',
    duration_ms integer,
    correlation_id text,
    partner text NOT NULL,
    template_id text,
    PRIMARY KEY (at, message_id, seq)
) PARTITION BY RANGE (at);

CREATE INDEX notify_attempts_message ON notify_attempts (message_id);
CREATE INDEX notify_attempts_partner ON notify_attempts (partner, at);
CREATE INDEX notify_attempts_template ON notify_attempts (template_id, at);
CREATE INDEX notify_attempts_outcome ON notify_attempts (outcome, at);

CREATE TABLE notify_outcomes (
    finished_at timestamptz NOT NULL,  -- when it was delivered or dead-lettered
    message_id text NOT NULL,
    seq integer NOT NULL,              -- attempts recorded when it finished
    state text NOT NULL,               -- delivered | failed
    reason text,                       -- the dead-letter reason
    partner text NOT NULL,
    template_id text,
    user_id text,
    session_id text,
    url text,
    request jsonb,                     -- only a request of another shape than the usual one
    attempts integer,
    replays integer NOT NULL DEFAULT 0,
    http_status smallint,
    correlation_id text,
    created_at timestamptz,
    PRIMARY KEY (finished_at, message_id, seq)
) PARTITION BY RANGE (finished_at);

CREATE INDEX notify_outcomes_message ON notify_outcomes (message_id);
CREATE INDEX notify_outcomes_partner ON notify_outcomes (partner, finished_at);
CREATE INDEX notify_outcomes_template ON notify_outcomes (template_id, finished_at);
CREATE INDEX notify_outcomes_state ON notify_outcomes (state, finished_at);
