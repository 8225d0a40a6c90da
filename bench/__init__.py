"""Benchmarks of memcluster against baselines measured in the same run (``make bench``)."""
