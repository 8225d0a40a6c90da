"""One shard replica: WAL + in-memory state + indexes, single writer, recovery."""
