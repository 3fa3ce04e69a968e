"""pruning (in progress)."""
