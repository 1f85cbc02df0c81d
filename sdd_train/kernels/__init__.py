"""Hand-written GPU kernels, each with a PyTorch fallback chosen at call time."""
