"""Stability diagnostics: per-layer norms, activation statistics, loss-spike handling, sweeps and reports."""
