"""Checkpoints: atomic, reshardable DCP directories of a run (:mod:`.storage`)."""

from sdd_train.checkpoint.storage import (Checkpointer, checkpoint_dir, latest, read_meta, read_model_state,
                                          resolve_checkpoint, step_of, write_atomic)

__all__ = ["Checkpointer", "checkpoint_dir", "latest", "read_meta", "read_model_state", "resolve_checkpoint",
           "step_of", "write_atomic"]
