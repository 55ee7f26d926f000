"""Teacher zoos: the tapped CNN family, the manifest, safe loading and demo training."""
