-- A message delivered on its first attempt (most messages) gets no notify_attempts row: its
-- outcome row holds that attempt too (attempt_at: when it started; attempt_ms: how long the post
-- took; its number is 1, its outcome 'delivered', its status, cause and correlation id the
-- outcome's), so PostgreSQL writes one row and five index entries for it, not two and ten.
-- notify_attempt_log shows every attempt, those rows and the attempts held in outcomes alike:
-- read attempts there. Rows written before this migration (attempt_at NULL) read as before.

ALTER TABLE notify_outcomes ADD COLUMN attempt_at timestamptz, ADD COLUMN attempt_ms integer;

CREATE VIEW notify_attempt_log AS
    SELECT at, message_id, seq, number, outcome, http_status, cause, duration_ms,
           correlation_id, partner, template_id
    FROM notify_attempts
    UNION ALL
    SELECT attempt_at, message_id, seq, 1, 'delivered', http_status, 'http_' || http_status,
           attempt_ms, correlation_id, partner, template_id
    FROM notify_outcomes
    WHERE attempt_at IS NOT NULL;
