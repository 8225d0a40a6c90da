"""Query routing over a cluster: planning, scatter-gather and merging (DESIGN.md §7)."""
