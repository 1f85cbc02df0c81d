"""sdd_train: LLM pretraining built around Scale-Distribution Decoupling (SDD)."""

__version__ = "0.1.0"
