-- Accounts, API keys, emails (also the outbox) and their event history.

CREATE TABLE accounts (
    id          text PRIMARY KEY,
    name        text NOT NULL UNIQUE,
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE api_keys (
    id          text PRIMARY KEY,                 -- key_…: public, shown in listings
    account_id  text NOT NULL REFERENCES accounts (id),
    lookup      text NOT NULL UNIQUE,             -- the non-secret part of the key, to find the row
    hash        bytea NOT NULL,                   -- SHA-256 of the whole key; the key itself is never stored
    scopes      text[] NOT NULL,
    rate        double precision,                 -- emails/s; NULL = rate_limit.rate from config
    burst       integer,                          -- NULL = rate_limit.burst from config
    created_at  timestamptz NOT NULL DEFAULT now(),
    revoked_at  timestamptz
);
CREATE INDEX api_keys_account ON api_keys (account_id);

CREATE TABLE emails (
    id              text PRIMARY KEY,
    account_id      text NOT NULL REFERENCES accounts (id),
    status          text NOT NULL CHECK (status IN ('scheduled', 'queued', 'sending', 'deferred',
                        'sent', 'bounced', 'failed', 'suppressed', 'canceled')),
    from_email      text NOT NULL,
    to_addrs        text[] NOT NULL,
    cc_addrs        text[] NOT NULL DEFAULT '{}',
    bcc_addrs       text[] NOT NULL DEFAULT '{}',
    reply_to        text[] NOT NULL DEFAULT '{}',
    envelope_to     text[] NOT NULL,              -- bare recipients to deliver to
    subject         text NOT NULL,
    content         jsonb NOT NULL,               -- bodies, headers, attachments: the input to render
    raw             bytea,                        -- the rendered message, kept for every attempt
    message_id      text NOT NULL,                -- the Message-ID header, fixed at acceptance
    tags            jsonb NOT NULL DEFAULT '{}',
    metadata        jsonb,
    scheduled_at    timestamptz,
    attempts        integer NOT NULL DEFAULT 0,
    last_response   jsonb,
    published       boolean NOT NULL DEFAULT false, -- outbox flag: the broker confirmed the publish
    lease_until     timestamptz,                  -- a sender owns a `sending` email until then
    next_attempt_at timestamptz,
    created_at      timestamptz NOT NULL DEFAULT clock_timestamp(),
    updated_at      timestamptz NOT NULL DEFAULT clock_timestamp(),
    sent_at         timestamptz
);
CREATE INDEX emails_account_newest ON emails (account_id, created_at DESC, id DESC);
CREATE INDEX emails_unpublished ON emails (created_at) WHERE NOT published AND status = 'queued';
CREATE INDEX emails_leased ON emails (lease_until) WHERE status = 'sending';
CREATE INDEX emails_scheduled ON emails (scheduled_at) WHERE status = 'scheduled';

CREATE TABLE events (
    seq         bigserial PRIMARY KEY,            -- the order events happened in
    id          text NOT NULL UNIQUE DEFAULT ('evt_' || replace(gen_random_uuid()::text, '-', '')),
    email_id    text NOT NULL REFERENCES emails (id),
    account_id  text NOT NULL REFERENCES accounts (id),
    type        text NOT NULL,
    data        jsonb NOT NULL DEFAULT '{}',
    created_at  timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX events_email ON events (email_id, seq);

CREATE TABLE dead_letters (
    id             text PRIMARY KEY,              -- dlq_…
    email_id       text NOT NULL REFERENCES emails (id),
    account_id     text NOT NULL REFERENCES accounts (id),
    reason         text NOT NULL,
    attempts       integer NOT NULL,
    last_response  jsonb,
    created_at     timestamptz NOT NULL DEFAULT clock_timestamp(),
    replayed_at    timestamptz
);
CREATE INDEX dead_letters_account_newest ON dead_letters (account_id, created_at DESC, id DESC);

-- Messages the broker dead-lettered that name no email of ours: kept for the operator.
CREATE TABLE dead_messages (
    id          bigserial PRIMARY KEY,
    queue       text,
    headers     jsonb NOT NULL DEFAULT '{}',
    body        bytea NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT clock_timestamp()
);

CREATE TABLE suppressions (
    account_id       text NOT NULL REFERENCES accounts (id),
    email            text NOT NULL,               -- lower-cased bare address
    reason           text NOT NULL CHECK (reason IN ('hard_bounce', 'manual')),
    source_email_id  text,
    created_at       timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (account_id, email)
);
