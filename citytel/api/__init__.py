"""``citytel api``: the city's data-sharing interface, a read-only OGC SensorThings API v1.1
over TimescaleDB, with a key and a usage scope per client and an access log."""
