"""evomerge.blackbox."""
