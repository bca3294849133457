"""Ready-made ways to sample trained models."""
