"""The registry of attention mechanisms that the benchmark and MiniLM run.

A mechanism is one `Mechanism` entry: a function
    fn(q, k, v, causal) -> o
on PyTorch CPU tensors q [B, N, H, D], k [B, M, Hk, D], v [B, M, Hk, Dv]
(o [B, N, H, Dv], causal aligned bottom-right as everywhere in libattn), its
family ("exact", "sparse", "linear"), the patterns it runs (non-causal /
causal, self / cross), whether it applies to a bidirectional encoder, and an
availability test (the C library may not have every engine). Adding a
mechanism is one `register(Mechanism(...))` call; the benchmark, its plots
and `python -m libattn.minilm` pick it up.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional

import torch

from . import _lib, _ops
from .plan import BLOCK_PARAMS, Plan

PATTERNS = {  # name: (causal, cross)
    "noncausal-self": (False, False),
    "causal-self": (True, False),
    "noncausal-cross": (False, True),
    "causal-cross": (True, True),
}


@dataclass
class Mechanism:
    name: str
    family: str  # "exact" | "sparse" | "linear"
    fn: Callable  # fn(q, k, v, causal) -> o
    description: str
    patterns: tuple = tuple(PATTERNS)
    encoder: bool = True  # applies to a bidirectional (non-causal self) encoder
    available: Callable[[], bool] = field(default=lambda: True)
    backward: Optional[Callable] = None  # fn(q, k, v, causal) -> o with autograd, if any


REGISTRY: Dict[str, Mechanism] = {}


def register(m: Mechanism) -> Mechanism:
    REGISTRY[m.name] = m
    return m


def available() -> Dict[str, Mechanism]:
    return {n: m for n, m in REGISTRY.items() if m.available()}


# ---------------------------------------------------------------- exact


def _exact(q, k, v, causal):
    return _ops.attention(q, k, v, causal=causal)


def _exact_grad(q, k, v, causal):
    from . import torch as lat

    return lat.attention(q, k, v, causal=causal)


register(Mechanism("exact", "exact", _exact, "exact softmax attention (attn_forward)",
                   backward=_exact_grad))

# ---------------------------------------------------------------- sparse: sliding window

WINDOW = 256


def _window(q, k, v, causal):
    return _ops.attention(q, k, v, causal=causal, window=(WINDOW, 0 if causal else WINDOW))


def _window_grad(q, k, v, causal):
    from . import torch as lat

    return lat.attention(q, k, v, causal=causal, window=(WINDOW, 0 if causal else WINDOW))


register(Mechanism("window", "sparse", _window,
                   f"sliding window: {WINDOW} keys each side of the (bottom-right) diagonal",
                   backward=_window_grad))

# ---------------------------------------------------------------- sparse: block top-k

BLOCK = 64
KEEP = 1 / 8  # fraction of the key blocks each query block keeps (at least 2)


def block_topk_plan(q, k, causal, block=None, keep=None) -> Plan:
    """A per-head plan: each query block keeps the key blocks of highest
    mean-pooled score q_blk . k_blk (scores averaged over the batch), plus
    the diagonal block and the first block; causal blocks beyond the
    diagonal are never chosen. The call's causal rule is applied per element
    (BLOCK_PARAMS)."""
    block = BLOCK if block is None else block
    keep = KEEP if keep is None else keep
    B, N, H, D = q.shape
    M, Hk = k.shape[1], k.shape[2]
    nqb, nkb = -(-N // block), -(-M // block)
    qn = torch.as_tensor(q).float()
    kn = torch.as_tensor(k).float()
    qp = torch.nn.functional.pad(qn, (0, 0, 0, 0, 0, nqb * block - N))
    kp = torch.nn.functional.pad(kn, (0, 0, 0, 0, 0, nkb * block - M))
    qb = qp.reshape(B, nqb, block, H, D).sum(2) / torch.tensor(
        [min(block, N - i * block) for i in range(nqb)]).view(1, nqb, 1, 1)
    kb = kp.reshape(B, nkb, block, Hk, D).sum(2) / torch.tensor(
        [min(block, M - j * block) for j in range(nkb)]).view(1, nkb, 1, 1)
    kb = kb.repeat_interleave(H // Hk, 2)
    score = torch.einsum("bihd,bjhd->hij", qb, kb) / B  # [H, nqb, nkb]
    # last visible key of each query block (bottom-right alignment)
    last_q = torch.clamp(torch.arange(1, nqb + 1) * block, max=N) - 1
    diag = torch.clamp((last_q + (M - N)) // block, min=0, max=nkb - 1)  # [nqb]
    cols = torch.arange(nkb)
    if causal:
        score = score.masked_fill(cols[None, None, :] > diag[None, :, None], -math.inf)
    nkeep = max(2, int(math.ceil(keep * nkb)))
    nkeep = min(nkeep, nkb)
    top = score.topk(nkeep, dim=-1).indices
    mask = torch.zeros(H, nqb, nkb, dtype=torch.bool)
    mask.scatter_(2, top, True)
    mask[:, torch.arange(nqb), diag] = True
    mask[:, :, 0] = True
    if causal:
        mask &= cols[None, None, :] <= diag[None, :, None]
        # a causal query block whose first rows see no key of its blocks:
        # keep every block between the first row's diagonal and the last's
        first_q = torch.arange(nqb) * block
        lo = torch.clamp((first_q + (M - N)) // block, min=0)
        for i in range(nqb):
            mask[:, i, int(lo[i]):int(diag[i]) + 1] = True
    return Plan.from_block_mask(mask.numpy(), N, M, block, block, masks=BLOCK_PARAMS)


def _block_topk(q, k, v, causal):
    plan = block_topk_plan(q, k, causal)
    return _ops.attention(q, k, v, causal=causal, plan=plan)


register(Mechanism("block_topk", "sparse", _block_topk,
                   f"block-sparse plan: top {KEEP:.3g} of {BLOCK}x{BLOCK} key blocks per query "
                   "block by mean-pooled scores, plus diagonal and first block (planner in "
                   "Python, attention in attn_forward with the plan)"))

# ---------------------------------------------------------------- linear


def _phi(x):
    return torch.nn.functional.elu(torch.as_tensor(x).float()) + 1.0


def _linear_elu(q, k, v, causal):
    """Katharopoulos et al.: phi(x) = elu(x) + 1, o_i = phi(q_i) S / phi(q_i) z,
    the normaliser z carried as an extra value column of ones."""
    q, k, v = _phi(q), _phi(k), torch.as_tensor(v).float()
    N, M = q.shape[1], k.shape[1]
    ones = torch.ones(v.shape[:-1] + (1,), dtype=v.dtype)
    va = torch.cat([v, ones], -1)
    if N == M:
        oa = _ops.linear_attention(q, k, va, causal=causal, scale=1.0)
    elif not causal:  # cross: the state over all keys, read by every query
        S = _linear_state(k, va, q.shape[2])
        oa = torch.einsum("bnhd,bhde->bnhe", q, S)
    else:  # causal cross, N < M: the first M - N keys as a state, then causal
        if N > M:
            raise ValueError("causal cross attention with N > M has rows without keys")
        S = _linear_state(k[:, :M - N], va[:, :M - N], q.shape[2])
        oa = _ops.linear_attention(q, k[:, M - N:], va[:, M - N:], causal=True, scale=1.0,
                                   state_in=S)
    return oa[..., :-1] / oa[..., -1:]


def _linear_state(k, va, heads):
    """The state sum_j phi(k_j)^T [v_j, 1] over all keys, per query head."""
    B, M, Hk, D = k.shape
    qd = torch.zeros(B, M, heads, D)
    _, S = _ops.linear_attention(qd, k, va, causal=False, scale=1.0, return_state=True)
    return S


register(Mechanism("linear_elu", "linear", _linear_elu,
                   "linear attention, phi = elu + 1 (Katharopoulos 2020), normalised; "
                   "attn_linear_forward with the normaliser as an extra value column",
                   available=lambda: _lib.HAS_LINEAR))


def get(name: str) -> Mechanism:
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown mechanism {name!r}; known: {', '.join(REGISTRY)}") from None


__all__ = ["Mechanism", "REGISTRY", "PATTERNS", "register", "available", "get",
           "block_topk_plan"]
