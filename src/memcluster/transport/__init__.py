"""Binary protocol: framing, connections (client and server)."""
