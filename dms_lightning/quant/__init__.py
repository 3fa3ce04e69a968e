"""quant (in progress)."""
