-- A deferred email is unpublished until its retry message is confirmed; if that publish fails,
-- the sweeper finds it (once due) through the same index as the queued emails never confirmed.
DROP INDEX emails_unpublished;
CREATE INDEX emails_unpublished ON emails (created_at)
    WHERE NOT published AND status IN ('queued', 'deferred');
