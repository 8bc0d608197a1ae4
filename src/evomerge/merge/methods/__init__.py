"""Built-in merge methods. Each module registers its methods with `evomerge.merge.registry.register`."""
