"""libattn: efficient attention on the CPU, from numpy and PyTorch.

    import numpy as np, libattn
    q = np.random.randn(1, 128, 8, 64).astype(np.float32)   # [B, N, H, D]
    o = libattn.attention(q, q, q, causal=True)             # [B, N, H, D]

Ops (numpy arrays or PyTorch CPU tensors in, the same kind out, no copies,
the GIL released during compute): attention, attention_backward, decode,
lse_merge, linear_attention, linear_decode, feature_map_attention,
nsa_attention (with nsa_attention_backward); gated recurrences
gla_attention, ssd, mamba_scan (with *_backward), mamba_step; linear
mechanisms lightnet_attention, rfa_attention, wersa_attention,
lla_attention (with *_backward); grid mechanisms
sra_attention, pooled_cross_attention, neighborhood_attention,
hilo_attention, global_context_attention (all with *_backward), grid_pool;
reorderings gather_tokens, scatter_tokens, grid_window_index,
grid_axis_index, paro_choose; SpAtten's token_importance, top_tokens,
select_tokens, head_importance; CATANet's catanet_attention (with
catanet_attention_backward). Plan for block-sparse plans; Context for
threads/backend/ISA.
PyTorch autograd and torch.compile: libattn.torch.attention (imported on
demand, so numpy users never import torch). Errors raise AttnError with the C
library's message.
"""

from ._lib import AttnError, AttnMemoryError, Context, default_context, isa_detected, version
from ._lib import library_path
from ._ops import (attention, attention_backward, decode, feature_map_attention,
                   linear_attention, lse_merge)
from ._nsa import nsa_attention, nsa_attention_backward
from ._linmech import (lightnet_attention, lightnet_attention_backward, linear_decode,
                       lla_attention, lla_attention_backward, mamba_step, rfa_attention,
                       rfa_attention_backward, wersa_attention, wersa_attention_backward)
from ._ssm import (gla_attention, gla_attention_backward, mamba_scan, mamba_scan_backward, ssd,
                   ssd_backward)
from ._grid import (gather_tokens, global_context_attention, global_context_attention_backward,
                    grid_axis_index, grid_pool, grid_window_index, hilo_attention,
                    hilo_attention_backward, neighborhood_attention,
                    neighborhood_attention_backward, neighborhood_plan, paro_choose,
                    pooled_cross_attention, pooled_cross_attention_backward, scatter_tokens,
                    sra_attention, sra_attention_backward)
from ._tokens import (catanet_attention, catanet_attention_backward, head_importance,
                      select_tokens, token_importance, top_tokens)
from .plan import BLOCK_FULL, BLOCK_PARAMS, Plan

__version__ = "0.1.0"

__all__ = [
    "AttnError", "AttnMemoryError", "Context", "Plan", "BLOCK_FULL", "BLOCK_PARAMS",
    "attention", "attention_backward", "decode", "linear_attention", "feature_map_attention",
    "nsa_attention", "lse_merge", "default_context",
    "isa_detected", "version", "library_path",
    "gla_attention", "gla_attention_backward", "ssd", "ssd_backward", "mamba_scan",
    "mamba_scan_backward", "grid_pool", "sra_attention", "sra_attention_backward",
    "pooled_cross_attention", "pooled_cross_attention_backward", "neighborhood_plan",
    "neighborhood_attention", "neighborhood_attention_backward", "hilo_attention",
    "hilo_attention_backward", "global_context_attention", "global_context_attention_backward",
    "gather_tokens", "scatter_tokens", "grid_window_index", "grid_axis_index", "paro_choose",
    "token_importance", "top_tokens", "select_tokens", "head_importance", "catanet_attention",
    "catanet_attention_backward",
    "nsa_attention_backward", "lightnet_attention", "lightnet_attention_backward",
    "rfa_attention", "rfa_attention_backward", "wersa_attention", "wersa_attention_backward",
    "lla_attention", "lla_attention_backward", "linear_decode", "mamba_step",
]


def __getattr__(name):
    if name == "torch":
        import importlib

        return importlib.import_module(".torch", __name__)
    raise AttributeError(f"module 'libattn' has no attribute {name!r}")
