-- citytel 0008: devices that prove who they are with a client certificate (its CN is the login)
-- on the broker's certificate listener, instead of a secret: such a login has no hash.
ALTER TABLE mqtt_logins ADD COLUMN credential text NOT NULL DEFAULT 'secret'
    CHECK (credential IN ('secret', 'certificate'));
ALTER TABLE mqtt_logins DROP CONSTRAINT mqtt_logins_check1;
ALTER TABLE mqtt_logins ADD CONSTRAINT mqtt_logins_hash_iff_active_secret
    CHECK ((secret_hash IS NOT NULL) = (revoked_at IS NULL AND credential = 'secret'));
