"""export (in progress)."""
