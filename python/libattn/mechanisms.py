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

from . import _lib, _nsa, _ops
from .plan import Plan

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

# ---------------------------------------------------------------- sparse: planners (C)

BLOCK = 64
KEEP = 1 / 8  # fraction of the key blocks a query block keeps (top-k; at least 2)


def _nkeep(m):
    nkb = -(-m // BLOCK)
    return min(nkb, max(2, int(math.ceil(KEEP * nkb))))


def _planned(make_plan):
    def fn(q, k, v, causal):
        return _ops.attention(q, k, v, causal=causal, plan=make_plan(q, k, causal))

    return fn


def _planned_grad(make_plan):
    def fn(q, k, v, causal):
        from . import torch as lat

        plan = make_plan(q.detach(), k.detach(), causal)
        return lat.attention(q, k, v, causal=causal, plan=plan)

    return fn


def _static_plan(q, k, causal):
    n, m = q.shape[1], k.shape[1]
    return Plan.static(n, m, BLOCK, BLOCK, local=max(1, _nkeep(m) // 2), stride=8,
                       global_tokens=BLOCK)


def _topk_plan(q, k, causal):
    return Plan.select(q, k, BLOCK, BLOCK, top_k=_nkeep(k.shape[1]), causal=causal)


def _mass_plan(q, k, causal):
    return Plan.select(q, k, BLOCK, BLOCK, top_k=0, mass=MASS, causal=causal)


MASS = 0.9
PSA_QUOTA = (1 / 16, 1 / 8, 1 / 4)  # of the key blocks at level 0, 1 (pooled by 2), 2 (by 4)


def _psa_plan(q, k, causal):
    return Plan.psa(q, k, PSA_QUOTA, BLOCK, BLOCK, causal=causal)


_planners = lambda: _lib.HAS_PLANNERS  # noqa: E731
register(Mechanism("static", "sparse", _planned(_static_plan),
                   f"static blocks (attn_plan_static): local band of {KEEP:.3g} of the key blocks "
                   f"/ 2, every 8th block, the first {BLOCK} tokens global; causal only",
                   patterns=("causal-self", "causal-cross"), encoder=False, available=_planners,
                   backward=_planned_grad(_static_plan)))
register(Mechanism("topk", "sparse", _planned(_topk_plan),
                   f"dynamic top-k blocks (attn_plan_select): {KEEP:.3g} of the {BLOCK}x{BLOCK} "
                   "key blocks by mean-pooled scores, plus diagonal and first block",
                   available=_planners,
                   backward=_planned_grad(_topk_plan)))
register(Mechanism("mass", "sparse", _planned(_mass_plan),
                   f"dynamic blocks reaching {MASS} of the estimated mass (attn_plan_select)",
                   available=_planners,
                   backward=_planned_grad(_mass_plan)))
register(Mechanism("psa", "sparse", _planned(_psa_plan),
                   "Pyramid Sparse Attention (attn_plan_psa): best 1/16 of key blocks at full "
                   "resolution, next 1/8 pooled by 2, next 1/4 pooled by 4", available=_planners,
                   backward=_planned_grad(_psa_plan)))

# ---------------------------------------------------------------- sparse: NSA (C)


def _nsa_fn(q, k, v, causal):
    """NSA with equal gates (no learned gate MLP here): compressed blocks of
    32 keys every 16, the best 1/8 of the 64-key blocks, a 256-key window."""
    if not causal:
        raise ValueError("nsa: causal patterns only")
    m = k.shape[1]
    return _nsa.nsa_attention(q, k, v, cmp_block=32, cmp_stride=16, sel_block=BLOCK,
                                  sel_count=_nkeep(m), query_block=BLOCK, window=WINDOW)

register(Mechanism("nsa", "sparse", _nsa_fn,
                   "Native Sparse Attention (attn_nsa_forward), gates 1/3 each: compressed "
                   f"means of 32 keys every 16, the best {KEEP:.3g} of the {BLOCK}-key blocks "
                   f"per {BLOCK}-query block, a {WINDOW}-key window; causal only, forward only",
                   patterns=("causal-self", "causal-cross"), encoder=False,
                   available=lambda: _nsa.HAS_NSA))

# ---------------------------------------------------------------- linear


def _phi(x):
    return torch.nn.functional.elu(torch.as_tensor(x).float()) + 1.0


def _linear_elu(q, k, v, causal):
    """Katharopoulos et al.: phi(x) = elu(x) + 1, o_i = phi(q_i) S / phi(q_i) z.
    Self: attn_linear_attention. Cross (N != M): the normaliser z carried as
    an extra value column of ones through attn_linear_forward, the keys
    before the queries' span as a state."""
    N, M = q.shape[1], k.shape[1]
    if N == M and _lib.HAS_FEATURE_MAPS:
        return _ops.feature_map_attention(q, k, v, feature_map="elu1", causal=causal, scale=1.0)
    q, k, v = _phi(q), _phi(k), torch.as_tensor(v).float()
    ones = torch.ones(v.shape[:-1] + (1,), dtype=v.dtype)
    va = torch.cat([v, ones], -1)
    if N == M:
        oa = _ops.linear_attention(q, k, va, causal=causal, scale=1.0)
    elif not causal:  # the state over all keys, read by every query
        oa = torch.einsum("bnhd,bhde->bnhe", q, _linear_state(k, va, q.shape[2]))
    else:  # causal cross, N < M: the first M - N keys as a state, then causal
        if N > M:
            raise ValueError("causal cross attention with N > M has rows without keys")
        S = _linear_state(k[:, :M - N], va[:, :M - N], q.shape[2])
        oa = _ops.linear_attention(q, k[:, M - N:], va[:, M - N:], causal=True, scale=1.0,
                                   state_in=S)
    return oa[..., :-1] / (oa[..., -1:] + 1e-6)


def _linear_state(k, va, heads):
    """The state sum_j phi(k_j)^T [v_j, 1] over all keys, per query head."""
    B, M, Hk, D = k.shape
    qd = torch.zeros(B, M, heads, D)
    _, S = _ops.linear_attention(qd, k, va, causal=False, scale=1.0, return_state=True)
    return S


def _linear_elu_grad(q, k, v, causal):
    """The same, differentiable (self patterns: the feature map in PyTorch,
    the recurrence through attn_linear_forward / attn_linear_backward)."""
    from . import torch as lat

    if q.shape[1] != k.shape[1]:
        raise NotImplementedError("linear_elu backward: self patterns only")
    qp, kp = torch.nn.functional.elu(q) + 1.0, torch.nn.functional.elu(k) + 1.0
    va = torch.cat([v, torch.ones(v.shape[:-1] + (1,), dtype=v.dtype)], -1)
    oa = lat.linear_attention(qp, kp, va, causal=causal, scale=1.0)
    return oa[..., :-1] / (oa[..., -1:] + 1e-6)


register(Mechanism("linear_elu", "linear", _linear_elu,
                   "linear attention, phi = elu + 1 (Katharopoulos 2020), normalised "
                   "(attn_linear_attention; cross patterns through attn_linear_forward's state)",
                   available=lambda: _lib.HAS_LINEAR, backward=_linear_elu_grad))


def retention_log_decays(heads: int) -> torch.Tensor:
    """RetNet's per-head decays gamma_h = 1 - 2^(-5 - h), as log gates [H]
    (Lightning Attention-2 uses one fixed decay per head the same way)."""
    h = torch.arange(heads, dtype=torch.float64)
    return torch.log1p(-torch.pow(2.0, -5.0 - h)).float()


def _lightning(q, k, v, causal):
    """Decayed linear attention, causal self: S_t = gamma_h S_{t-1} +
    phi(k_t)^T [v_t, 1], o_t = phi(q_t) S_t / (phi(q_t) . z_t + eps), phi =
    elu + 1 (attn_linear_forward with ATTN_GATE_HEAD, the normaliser as an
    extra value column of ones)."""
    if not causal or q.shape[1] != k.shape[1]:
        raise ValueError("lightning: a decay needs the causal self pattern")
    qp, kp, v = _phi(q), _phi(k), torch.as_tensor(v).float()
    va = torch.cat([v, torch.ones(v.shape[:-1] + (1,), dtype=v.dtype)], -1)
    oa = _ops.linear_attention(qp, kp, va, retention_log_decays(q.shape[2]), gate="head",
                               causal=True, scale=1.0)
    return oa[..., :-1] / (oa[..., -1:] + 1e-6)


register(Mechanism("lightning", "linear", _lightning,
                   "decayed linear attention (Lightning Attention-2 / RetNet decays "
                   "1 - 2^(-5-h) per head), phi = elu + 1, normalised (attn_linear_forward, "
                   "ATTN_GATE_HEAD); causal self only",
                   patterns=("causal-self",), encoder=False,
                   available=lambda: _lib.HAS_LINEAR))


def get(name: str) -> Mechanism:
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown mechanism {name!r}; known: {', '.join(REGISTRY)}") from None


__all__ = ["Mechanism", "REGISTRY", "PATTERNS", "register", "available", "get"]
