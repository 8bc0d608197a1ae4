"""evomerge.search."""
