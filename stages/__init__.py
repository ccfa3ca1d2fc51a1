"""What each stage computes: index, pixels, lare (math), sd (models), extract, synthetic data."""
