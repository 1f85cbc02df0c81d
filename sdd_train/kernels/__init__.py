"""Hand-written kernels (Triton on GPU, batched matmuls on CPU), each with a PyTorch fallback chosen at call time."""
