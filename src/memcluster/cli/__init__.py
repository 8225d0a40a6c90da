"""The memcluster command."""
