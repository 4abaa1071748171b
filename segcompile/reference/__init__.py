"""Slow, obviously correct references: the oracle (dense masks per head, TBPTT by recomputation)
and the per-layer SDPA hook it shares with head selection."""
