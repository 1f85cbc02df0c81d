"""The one failure of training that is not a bug or a config error."""


class TrainingDiverged(RuntimeError):
    """The loss, the gradient norm or the parameters became NaN/Inf; nothing non-finite is checkpointed."""
