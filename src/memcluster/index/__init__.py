"""Vector index and metadata filters: how a shard finds memories fast."""
