-- citytel 0006: who may connect to the MQTT broker, as what, and for which devices. The broker's
-- password and ACL files are rendered from these rows (processors/storage/logins.py): the
-- registry is the one source of truth, and it keeps only hashes.
CREATE TABLE mqtt_logins (
    username    text PRIMARY KEY,
    role        text NOT NULL
                CHECK (role IN ('device', 'gateway', 'bridge', 'alerter', 'department', 'probe')),
    -- role 'department': the department whose alerts this login may read
    department  text CHECK ((role = 'department') = (department IS NOT NULL)),
    -- PBKDF2-SHA512 in Mosquitto's "$7$iterations$salt$hash" form; NULL once revoked
    secret_hash text,
    created_at  timestamptz NOT NULL DEFAULT now(),
    rotated_at  timestamptz NOT NULL DEFAULT now(),
    revoked_at  timestamptz,
    CHECK ((revoked_at IS NULL) = (secret_hash IS NOT NULL))
);

-- A device that publishes through a gateway (a LoRaWAN network server, a vendor's platform)
-- rather than with a login of its own: the gateway's login may publish on its topic.
ALTER TABLE devices ADD COLUMN gateway text;
