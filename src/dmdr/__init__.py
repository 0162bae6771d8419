"""dmdr: Distribution Matching Distillation meets Reinforcement Learning, reproducible on an embedded world."""
__version__ = "0.1.0"
