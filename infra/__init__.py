"""How the real services start: the local Apache Kafka broker (KRaft), the Prefect server, the default model."""
