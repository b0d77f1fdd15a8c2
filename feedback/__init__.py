"""The data plane: event contracts, the Kafka producer and consumer, the DuckDB warehouse.

Imports nothing else of the project, so every other part can depend on it.
"""
