"""The server process: HTTP API, binary protocol endpoint, lifecycle."""
