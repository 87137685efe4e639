"""Small helpers every layer shares: atomic file writes, seed derivation, image tensors and files."""
