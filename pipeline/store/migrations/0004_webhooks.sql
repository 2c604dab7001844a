-- Event webhooks: the endpoints, every delivery attempt, and the fan-out's position in `events`.

CREATE TABLE webhooks (
    id               text PRIMARY KEY,            -- wh_…
    account_id       text NOT NULL REFERENCES accounts (id),
    url              text NOT NULL,
    events           text[] NOT NULL,             -- the event types delivered to it
    enabled          boolean NOT NULL DEFAULT true,
    secret           text NOT NULL,               -- whsec_…: kept in clear, it signs every request
    failing_since    timestamptz,                 -- first failed attempt since the last success
    disabled_at      timestamptz,
    disabled_reason  text,                        -- why it was disabled (410 Gone, failing 24 h)
    created_at       timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX webhooks_account_newest ON webhooks (account_id, created_at DESC, id DESC);

CREATE TABLE webhook_deliveries (
    id           text PRIMARY KEY,                -- whd_…
    webhook_id   text NOT NULL REFERENCES webhooks (id) ON DELETE CASCADE,
    event_id     text NOT NULL,
    event_type   text NOT NULL,
    attempt      integer NOT NULL,                -- 1 for the first try of an event, then 2, ...
    status_code  integer,                         -- NULL: no HTTP answer (timeout, refused, ...)
    error        text,                            -- NULL on a 2xx
    created_at   timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX webhook_deliveries_newest ON webhook_deliveries (webhook_id, created_at DESC, id DESC);

-- The fan-out reads events in commit-safe order. `seq` alone is not: it is taken at insert time,
-- so a transaction holding seq 41 can commit after one holding seq 42 has been read, and a cursor
-- past 42 would skip 41 for good. Ordering by the inserting transaction's id and reading only
-- transactions older than every one still running (the snapshot's xmin) never skips a row: any
-- event committed later belongs to a transaction newer than everything already read.
-- Events from before this migration have no xid; no endpoint existed for them.
ALTER TABLE events ADD COLUMN xid xid8;
ALTER TABLE events ALTER COLUMN xid SET DEFAULT pg_current_xact_id();
CREATE INDEX events_fanout_order ON events (xid, seq);

-- One row: the last event fanned out. A fan-out pass locks it, publishes, and moves it in the
-- same transaction, so several webhooks processes never fan out the same events.
CREATE TABLE webhook_cursor (
    singleton  boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    xid        xid8 NOT NULL,
    seq        bigint NOT NULL
);
INSERT INTO webhook_cursor (xid, seq) VALUES ('0', 0);
