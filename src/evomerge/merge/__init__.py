"""Parameter-space merging: pure kernels, their registry, mergekit-config planning and the streaming engine."""
