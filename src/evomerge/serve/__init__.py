"""evomerge.serve."""
