-- Rotating an endpoint's signing secret keeps the old one signing too (a second v1 signature)
-- for a while, so the receiver can switch to the new secret without losing a delivery.
ALTER TABLE webhooks ADD COLUMN previous_secret text;
ALTER TABLE webhooks ADD COLUMN previous_secret_until timestamptz;
