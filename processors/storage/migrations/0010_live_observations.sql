-- citytel 0010: the SensorThings API's MQTT extension. Two more kinds of broker login:
-- 'live', the processors' login that publishes new Observations under v1.1/, and 'sharing', an
-- API client's login that reads them (its name is the client's, its secret the client's key,
-- its ACL the client's scope; processors/storage/logins.py).
ALTER TABLE mqtt_logins DROP CONSTRAINT mqtt_logins_role_check;
ALTER TABLE mqtt_logins ADD CONSTRAINT mqtt_logins_role_check
    CHECK (role IN ('device', 'gateway', 'bridge', 'alerter', 'department', 'probe', 'live', 'sharing'));
