"""evomerge.io."""
