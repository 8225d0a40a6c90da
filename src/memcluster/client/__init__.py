"""Clients: the embedded database today; the network clients share its interface."""
