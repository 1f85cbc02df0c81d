"""Training: optimizer and schedule, loss, checkpoints, metrics, the loop and its CLI."""
