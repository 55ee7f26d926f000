"""Datasets: reproducible fetching, torchvision loading, the global class space and the unlabeled pool."""
