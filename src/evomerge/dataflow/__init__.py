"""evomerge.dataflow."""
