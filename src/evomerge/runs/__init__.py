"""evomerge.runs."""
