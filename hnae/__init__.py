"""hnae: the hierarchical neural attention encoder, a causal, streamable drop-in for nn.LSTM.

Public pieces:
    HNAE                  the nn.LSTM-compatible stack (parallel training, exact streaming)
    HNAEState             its streaming state: a flat, batched set of tensors
    HNAEConfig            the validated configuration
    HNAEBlock             one layer (one direction): hierarchical attention + feed-forward
    HierarchicalAttention the attention of one layer over windows and block summaries
    AttentionPool         the summary of one block, pooled by learned queries
    SelectPool            the summary of one block, its most salient items kept as they are
    receptive_field, first_visible   exact reach of a stack
    WritePolicy           which summaries each level writes ("all", "novelty", "learned")
    trace_memory          what one sequence's memory kept, and where a step's attention went
"""

from .attention import HierarchicalAttention
from .block import HNAEBlock
from .config import HNAEConfig
from .model import HNAE
from .pooling import AttentionPool, SelectPool
from .reach import first_visible, first_visible_stack, receptive_field
from .inspect import trace_memory
from .state import HNAEState
from .write_policy import WritePolicy

__all__ = ["HNAE", "HNAEState", "HNAEConfig", "HNAEBlock", "HierarchicalAttention", "AttentionPool",
           "SelectPool", "receptive_field", "first_visible", "first_visible_stack", "WritePolicy", "trace_memory"]
__version__ = "0.1.0"
