"""Replication of a shard over its replicas (DESIGN.md §6): sans-IO protocol cores."""
