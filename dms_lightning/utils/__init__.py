"""Small helpers shared by the callbacks: atomic writes, TensorBoard access, plots."""
