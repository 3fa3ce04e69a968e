"""distill (in progress)."""
