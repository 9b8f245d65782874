"""What every stage shares, and nothing else: the error classes that steer the data flow, the
metrics contract, the Kafka wire envelope and Kafka helpers. It imports only ``citytel.config``."""
