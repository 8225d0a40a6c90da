"""Types, errors, codec, clock and config: what every layer shares. Imports nothing else."""
