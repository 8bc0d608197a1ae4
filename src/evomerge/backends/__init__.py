"""evomerge.backends."""
