"""WAL and snapshots: the bytes on disk, their formats and crash behaviour."""
