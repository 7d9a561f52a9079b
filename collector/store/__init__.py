"""Storage: the store owns its connection, schema and transaction."""
