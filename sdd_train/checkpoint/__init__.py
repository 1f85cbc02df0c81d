"""Checkpoints: atomic, verified, reshardable DCP directories of a run (:mod:`.storage`), their
integrity manifests (:mod:`.manifest`), which one a run continues from and the config each was
written with (:mod:`.restore`), and ``sdd-ckpt`` to list and verify them (:mod:`.__main__`)."""

from sdd_train.checkpoint.storage import (CheckpointError, Checkpointer, CheckpointMismatch, CheckpointSaveError,
                                          checkpoint_dir, complete_checkpoints, first_of, is_complete_checkpoint,
                                          latest, read_meta, read_model_state, resolve_checkpoint, step_of, verified,
                                          verify_checkpoint, write_atomic)
from sdd_train.checkpoint.restore import Restore, Restored, checkpoint_config, model_changes

__all__ = ["Restore", "Restored", "checkpoint_config", "CheckpointError", "CheckpointMismatch", "CheckpointSaveError",
           "Checkpointer", "checkpoint_dir", "complete_checkpoints", "first_of", "is_complete_checkpoint", "latest",
           "model_changes", "read_meta", "read_model_state", "resolve_checkpoint", "step_of", "verified",
           "verify_checkpoint", "write_atomic"]
