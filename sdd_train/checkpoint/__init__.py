"""Checkpoints: atomic, verified, reshardable DCP directories of a run (:mod:`.storage`), their
integrity manifests (:mod:`.manifest`), and ``sdd-ckpt`` to list and verify them (:mod:`.__main__`)."""

from sdd_train.checkpoint.storage import (CheckpointError, Checkpointer, CheckpointMismatch, CheckpointSaveError,
                                          checkpoint_dir, complete_checkpoints, first_of, latest, model_changes,
                                          read_meta, read_model_state, resolve_checkpoint, step_of, verified,
                                          verify_checkpoint, write_atomic)

__all__ = ["CheckpointError", "CheckpointMismatch", "CheckpointSaveError", "Checkpointer", "checkpoint_dir",
           "complete_checkpoints", "first_of", "latest", "model_changes", "read_meta", "read_model_state",
           "resolve_checkpoint", "step_of", "verified", "verify_checkpoint", "write_atomic"]
