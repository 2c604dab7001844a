-- The failure path: listing dead letters and suppressions newest first, replaying by email.

CREATE INDEX dead_letters_email ON dead_letters (email_id);
CREATE INDEX dead_letters_newest ON dead_letters (created_at DESC, id DESC);  -- across accounts (CLI)
CREATE INDEX suppressions_account_newest ON suppressions (account_id, created_at DESC, email DESC);

-- Why the broker dead-lettered a message that names no email of ours (x-death's reason).
ALTER TABLE dead_messages ADD COLUMN reason text;
