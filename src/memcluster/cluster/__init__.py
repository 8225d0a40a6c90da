"""Cluster coordination: etcd membership and shard map, placement, the controller."""
