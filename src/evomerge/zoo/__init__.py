"""The zoo: tiny models evomerge builds itself, for demos, tests and benchmarks (no hub needed)."""
