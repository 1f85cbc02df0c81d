"""Evaluation and interoperability: loading trained models, generation, lm-eval-harness, Hugging Face export."""
