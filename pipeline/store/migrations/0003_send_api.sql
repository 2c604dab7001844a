-- The complete send API: idempotency keys, recipient and tag search, scheduled release.

CREATE TABLE idempotency_keys (
    account_id     text NOT NULL REFERENCES accounts (id),
    key            text NOT NULL,
    request_hash   bytea NOT NULL,                -- method, path and body of the first request
    response_code  integer NOT NULL,
    response_body  jsonb NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (account_id, key)
);
CREATE INDEX idempotency_keys_age ON idempotency_keys (created_at);

-- Bare, lower-cased addresses of to, cc and bcc: what `?to=` searches.
ALTER TABLE emails ADD COLUMN recipients text[] NOT NULL DEFAULT '{}';
CREATE INDEX emails_recipients ON emails USING gin (recipients);
CREATE INDEX emails_tags ON emails USING gin (tags jsonb_path_ops);
