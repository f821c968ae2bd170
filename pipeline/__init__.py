"""PyTorch front end: FAIR scores, Tolerance-of-Difference plans, and the pruning plan file."""
