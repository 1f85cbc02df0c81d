"""Model zoo: layers, feed-forwards, block schemes and the transformer (imports config and kernels only)."""

from sdd_train.model.blocks import BLOCKS, Block, register
from sdd_train.model.feed_forward import FEED_FORWARDS
from sdd_train.model.layers import RMSNorm, SDDLinear
from sdd_train.model.transformer import LossOutput, ParallelPlan, ParamCounts, Transformer, check_model_config

__all__ = ["BLOCKS", "Block", "FEED_FORWARDS", "LossOutput", "ParallelPlan", "ParamCounts", "RMSNorm", "SDDLinear",
           "Transformer", "check_model_config", "register"]
