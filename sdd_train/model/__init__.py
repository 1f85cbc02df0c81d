"""Model zoo: layers, feed-forwards, block schemes and the transformer."""

from sdd_train.model.blocks import BLOCKS, Block, register
from sdd_train.model.feed_forward import FEED_FORWARDS
from sdd_train.model.layers import RMSNorm, SDDLinear
from sdd_train.model.transformer import ParamCounts, Transformer

__all__ = ["BLOCKS", "Block", "FEED_FORWARDS", "ParamCounts", "RMSNorm", "SDDLinear", "Transformer", "register"]
