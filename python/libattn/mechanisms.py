"""The registry of attention mechanisms that the benchmark and MiniLM run.

A mechanism is one `Mechanism` entry: a function
    fn(q, k, v, causal) -> o
on PyTorch CPU tensors q [B, N, H, D], k [B, M, Hk, D], v [B, M, Hk, Dv]
(o [B, N, H, Dv], causal aligned bottom-right as everywhere in libattn), its
family ("exact", "sparse", "linear"), the patterns it runs (non-causal /
causal, self / cross), whether it applies to a bidirectional encoder, an
availability test (the C library may not have every engine), optionally a
differentiable version (backward) and the longest length the benchmark
runs it at (max_length, for a cost like LLA's O(T^2 D^2)). Adding a
mechanism is one `register(Mechanism(...))` call; the benchmark, its plots
and `python -m libattn.minilm` pick it up.

Mechanisms with inputs beyond q, k, v (gates, time steps, token grids,
centres) derive them here deterministically from q, k, v, as each entry's
description says, so that every entry runs on the benchmark's inputs and is
comparable with exact attention. Grid mechanisms (sra, crosslmm,
neighborhood, hilo, global_context, paro) lay the N tokens of a sequence on
the near-square grid grid_of(N) = h x w (h the largest divisor of N up to
sqrt(N): 64 x 64 for 4096, 64 x 128 for 8192, 1 x N for a prime N), with
windows and pooling ratios clipped to divisors of h and w.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional

import numpy as np
import torch

from . import _grid, _lib, _linmech, _nsa, _ops, _ssm, _tokens
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
    max_length: Optional[int] = None  # the benchmark skips longer L (a cost it cannot afford)


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


def _nsa_grad(q, k, v, causal):
    from . import torch as lat

    if not causal:
        raise ValueError("nsa: causal patterns only")
    return lat.nsa_attention(q, k, v, cmp_block=32, cmp_stride=16, sel_block=BLOCK,
                             sel_count=_nkeep(k.shape[1]), query_block=BLOCK, window=WINDOW)


register(Mechanism("nsa", "sparse", _nsa_fn,
                   "Native Sparse Attention (attn_nsa_forward; backward attn_nsa_backward + "
                   "attn_nsa_compress_backward), gates 1/3 each: compressed "
                   f"means of 32 keys every 16, the best {KEEP:.3g} of the {BLOCK}-key blocks "
                   f"per {BLOCK}-query block, a {WINDOW}-key window; causal only",
                   patterns=("causal-self", "causal-cross"), encoder=False,
                   available=lambda: _nsa.HAS_NSA,
                   backward=_nsa_grad if _nsa.HAS_NSA_BACKWARD else None))

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


def _expand_heads(x, heads):
    """[B, T, Hk, D] -> [B, T, heads, D] (GQA: each kv head repeated)."""
    return x if x.shape[2] == heads else x.repeat_interleave(heads // x.shape[2], 2)


def _normalised(oa):
    """o from the last value column carried as a normaliser (a column of ones)."""
    return oa[..., :-1] / (oa[..., -1:] + 1e-6)


def _with_ones(v):
    v = torch.as_tensor(v).float()
    return torch.cat([v, torch.ones(v.shape[:-1] + (1,), dtype=v.dtype)], -1)


# ---------------------------------------------------------------- linear: GLA

GLA_TAU = 16.0  # GLA's alpha = sigmoid(.)^(1/tau)


def gla_log_gates(k, heads):
    """GLA's log gates log alpha = logsigmoid(k) / 16 per key dim (GLA:
    alpha_t = sigmoid(x_t W_alpha)^(1/16), the keys standing in for x W_alpha:
    deterministic, no learned weights), per query head: [B, T, H, D]."""
    return _expand_heads(torch.nn.functional.logsigmoid(torch.as_tensor(k).float()) / GLA_TAU,
                         heads)


def _gla(q, k, v, causal):
    """GLA, normalised like linear_elu: phi = elu + 1 on q and k, gates from
    the raw keys (gla_log_gates), the normaliser as a value column of ones.
    Causal cross (N < M): the first M - N keys folded into a state."""
    if not causal:
        raise ValueError("gla: gates need the causal patterns")
    N, M, H = q.shape[1], k.shape[1], q.shape[2]
    if N > M:
        raise ValueError("causal cross attention with N > M has rows without keys")
    qp, kp, va, g = _phi(q), _phi(k), _with_ones(v), gla_log_gates(k, H)
    S = None
    if M > N:  # the keys before the queries' span, as the state they leave
        qd = torch.zeros(q.shape[0], M - N, H, q.shape[3])
        _, S = _ssm.gla_attention(qd, kp[:, :M - N], va[:, :M - N], g[:, :M - N], scale=1.0,
                                  return_state=True)
        kp, va, g = kp[:, M - N:], va[:, M - N:], g[:, M - N:]
    return _normalised(_ssm.gla_attention(qp, kp, va, g, scale=1.0, state_in=S))


def _gla_grad(q, k, v, causal):
    from . import torch as lat

    if not causal or q.shape[1] != k.shape[1]:
        raise NotImplementedError("gla backward: causal self only")
    qp, kp = torch.nn.functional.elu(q) + 1.0, torch.nn.functional.elu(k) + 1.0
    g = _expand_heads(torch.nn.functional.logsigmoid(k) / GLA_TAU, q.shape[2])
    va = torch.cat([v, torch.ones(v.shape[:-1] + (1,), dtype=v.dtype)], -1)
    return _normalised(lat.gla_attention(qp, kp, va, g, scale=1.0))


register(Mechanism("gla", "linear", _gla,
                   "Gated Linear Attention (attn_linear_forward, ATTN_GATE_KEY): per-key-dim "
                   "decays log alpha = logsigmoid(k) / 16 derived from the keys, phi = elu + 1, "
                   "normalised; causal only",
                   patterns=("causal-self", "causal-cross"), encoder=False,
                   available=lambda: _lib.HAS_LINEAR, backward=_gla_grad))

# ---------------------------------------------------------------- linear: Mamba-2 SSD


def ssd_inputs(q, k, v):
    """The SSD inputs of a (q, k, v) problem: C = phi(q), B = phi(k) (groups =
    kv heads, or one per head when they differ), x = [v, 1] per query head
    (the last column carries the normaliser), dt = softplus(mean_d k) per
    token and head (data-dependent, deterministic), A_h = the RetNet log
    decays (so dt = 1 decays by 1 - 2^(-5-h) per token)."""
    H = q.shape[2]
    kf = torch.as_tensor(k).float()
    cm, bm = _phi(q), _phi(k)
    if bm.shape[2] != H:
        bm = _expand_heads(bm, H)
    x = _expand_heads(_with_ones(v), H)
    dt = _expand_heads(torch.nn.functional.softplus(kf.mean(-1, keepdim=True)), H)[..., 0]
    return x, dt.contiguous(), retention_log_decays(H), bm, cm


def _ssd(q, k, v, causal):
    if not causal:
        raise ValueError("ssd: a recurrence needs the causal patterns")
    N, M = q.shape[1], k.shape[1]
    if N > M:
        raise ValueError("causal cross attention with N > M has rows without keys")
    x, dt, a, bm, cm = ssd_inputs(q, k, v)
    S = None
    if M > N:  # the keys before the queries' span, as the state they leave
        _, S = _ssm.ssd(x[:, :M - N], dt[:, :M - N], a, bm[:, :M - N],
                        torch.zeros_like(bm[:, :M - N]), return_state=True)
        x, dt, bm = x[:, M - N:], dt[:, M - N:], bm[:, M - N:]
    return _normalised(_ssm.ssd(x, dt, a, bm, cm, state_in=S))


def _ssd_grad(q, k, v, causal):
    from . import torch as lat

    if not causal or q.shape[1] != k.shape[1]:
        raise NotImplementedError("ssd backward: causal self only")
    H = q.shape[2]
    cm, bm = torch.nn.functional.elu(q) + 1.0, _expand_heads(torch.nn.functional.elu(k) + 1.0, H)
    x = _expand_heads(torch.cat([v, torch.ones(v.shape[:-1] + (1,), dtype=v.dtype)], -1), H)
    dt = _expand_heads(torch.nn.functional.softplus(k.mean(-1, keepdim=True)), H)[..., 0]
    return _normalised(lat.ssd(x, dt, retention_log_decays(H), bm, cm))


register(Mechanism("ssd", "linear", _ssd,
                   "Mamba-2 SSD as linear attention (attn_ssd_forward): C = phi(q), B = phi(k), "
                   "x = [v, 1] (normalised), dt = softplus(mean of k) per token, A = RetNet "
                   "log decays per head; phi = elu + 1; causal only",
                   patterns=("causal-self", "causal-cross"), encoder=False,
                   available=lambda: _ssm.HAS_SSD, backward=_ssd_grad))

# ---------------------------------------------------------------- linear: LightNet, RFA, WERSA, LLA
# These C ops take q and k of the same length. Cross patterns (N < M) run
# them on the queries padded at the front with zero rows to M and keep the
# last N outputs: a row's output depends on its own query only (and, for
# WERSA's causal filter, on the queries before it, which are zero before a
# sequence's first token either way), so this is the cross pattern itself,
# at the cost of M - N wasted rows.


def _padded(run, q, k, v, causal, rows_independent=False):
    """run(q, k, v) on queries padded to M = k's length; N > M only where
    rows are independent and not causal (then in slices of M queries)."""
    N, M = q.shape[1], k.shape[1]
    if N == M:
        return run(q, k, v)
    if N > M:
        if causal:
            raise ValueError("causal cross attention with N > M has rows without keys")
        if not rows_independent:
            raise ValueError("N > M: this mechanism's queries are not independent rows")
        return torch.cat([_padded(run, q[:, i:i + M], k, v, causal, True)
                          for i in range(0, N, M)], 1)
    qp = torch.zeros(q.shape[:1] + (M,) + q.shape[2:], dtype=q.dtype)
    qp[:, M - N:] = q
    return run(qp, k, v)[:, M - N:]


def _lightnet(q, k, v, causal):
    """LightNet: the keys as per-dim logits (a running softmax over time per
    key dim), the queries through a softmax over their D dims, scale 1: each
    output is a convex mix of running means of v (causal efficient
    attention, Shen et al.)."""
    if not causal:
        raise ValueError("lightnet: its recurrence is causal; causal patterns only")
    return _padded(lambda a, b, c: _linmech.lightnet_attention(a.softmax(-1), b, c, scale=1.0),
                   q, k, v, True)


def _lightnet_grad(q, k, v, causal):
    from . import torch as lat

    if not causal or q.shape[1] != k.shape[1]:
        raise NotImplementedError("lightnet backward: causal self only")
    return lat.lightnet_attention(q.softmax(-1), k, v, scale=1.0)


register(Mechanism("lightnet", "linear", _lightnet,
                   "LightNet additive recurrence (attn_lightnet_forward): per key dim a running "
                   "softmax over time of the raw keys, read by softmax(q) over the D dims "
                   "(scale 1); causal only (cross: queries padded at the front)",
                   patterns=("causal-self", "causal-cross"), encoder=False,
                   available=lambda: _linmech.HAS_LIGHTNET, backward=_lightnet_grad))

RFA_FEATURES = 2  # random features per head dim: F = 2 D


def _rfa(q, k, v, causal):
    F_ = RFA_FEATURES * q.shape[3]
    return _padded(lambda a, b, c: _linmech.rfa_attention(a, b, c, features=F_, causal=causal),
                   q, k, v, causal, rows_independent=True)


def _rfa_grad(q, k, v, causal):
    from . import torch as lat

    if q.shape[1] != k.shape[1]:
        raise NotImplementedError("rfa backward: self patterns only")
    return lat.rfa_attention(q, k, v, features=RFA_FEATURES * q.shape[3], causal=causal)


register(Mechanism("rfa", "linear", _rfa,
                   f"random-feature attention (Performer FAVOR+ positive features; "
                   f"attn_rfa_forward): F = {RFA_FEATURES} D features of the softmax kernel "
                   "from the context's seed, normalised; causal or not (cross: queries padded)",
                   available=lambda: _linmech.HAS_RFA, backward=_rfa_grad))

WERSA_WEIGHTS = (1.0, 0.8, 0.6, 0.4)  # 3 Haar levels: finest detail first, approximation last


def _wersa_w(dtype=torch.float32):
    return torch.tensor(WERSA_WEIGHTS, dtype=dtype)


def _wersa(q, k, v, causal):
    F_ = RFA_FEATURES * q.shape[3]
    w = _wersa_w()
    return _padded(lambda a, b, c: _linmech.wersa_attention(a, b, c, w, features=F_,
                                                            causal=causal),
                   q, k, v, causal)


def _wersa_grad(q, k, v, causal):
    from . import torch as lat

    if q.shape[1] != k.shape[1]:
        raise NotImplementedError("wersa backward: self patterns only")
    return lat.wersa_attention(q, k, v, _wersa_w(q.dtype), features=RFA_FEATURES * q.shape[3],
                               causal=causal)


register(Mechanism("wersa", "linear", _wersa,
                   f"WERSA (attn_wersa_forward): q and k through a causal Haar filter of "
                   f"{len(WERSA_WEIGHTS) - 1} levels, weights {WERSA_WEIGHTS} (finest detail "
                   f"first), then random features as rfa (F = {RFA_FEATURES} D); causal or not "
                   "(cross: queries padded at the front)",
                   available=lambda: _linmech.HAS_WERSA, backward=_wersa_grad))

LLA_LAMBDA = 1.0  # ridge at the scale of unit-variance keys (0.1: errors ~2.5x exact's norm
#                  on the bench inputs, the slope extrapolating far; inf: softmax)
LLA_MAX_LENGTH = 2048  # O(T^2 D^2): ~1.2 s per call at 4096, causal, 2 cores


def _lla(q, k, v, causal):
    return _padded(lambda a, b, c: _linmech.lla_attention(a, b, c, lam=LLA_LAMBDA,
                                                          causal=causal),
                   q, k, v, causal, rows_independent=True)


def _lla_grad(q, k, v, causal):
    from . import torch as lat

    if q.shape[1] != k.shape[1]:
        raise NotImplementedError("lla backward: self patterns only")
    return lat.lla_attention(q, k, v, lam=LLA_LAMBDA, causal=causal)


register(Mechanism("lla", "linear", _lla,
                   f"Local Linear Attention (FlashLLA; attn_lla_forward): a softmax-weighted "
                   f"local linear regression of v on k read at the query, ridge {LLA_LAMBDA}; "
                   f"O(T^2 D^2), so the benchmark stops at L = {LLA_MAX_LENGTH}; causal or not "
                   "(cross: queries padded)",
                   available=lambda: _linmech.HAS_LLA,
                   backward=_lla_grad if _linmech.HAS_LLA_BACKWARD else None,
                   max_length=LLA_MAX_LENGTH))

# ---------------------------------------------------------------- token grids

GRID_WIN = 8    # window side (HiLo, global context): at most 8 x 8 tokens
SRA_RATIO = 4   # SRA: keys and values pooled by up to 4 x 4
CROSS_RATIO = 2  # CrossLMM: queries pooled by up to 2 x 2
NBHD_RADIUS = 7  # neighbourhood: 15 x 15 keys


def _divisor_le(n, cap):
    """The largest divisor of n that is <= cap (>= 1)."""
    for d in range(max(1, min(n, int(cap))), 0, -1):
        if n % d == 0:
            return d
    return 1


def grid_of(n):
    """The near-square grid (h, w) of n tokens: h the largest divisor of n
    up to sqrt(n) (1 x n for a prime n)."""
    h = _divisor_le(n, math.isqrt(n))
    return h, n // h


def _clip(grid, side):
    """A window or ratio of up to side x side that divides the grid."""
    return _divisor_le(grid[0], side), _divisor_le(grid[1], side)


def _grid_only(name, causal):
    if causal:
        raise ValueError(f"{name}: tokens on a grid have no causal order")


def _sra(q, k, v, causal):
    _grid_only("sra", causal)
    g = grid_of(k.shape[1])
    return _grid.sra_attention(q, k, v, g, _clip(g, SRA_RATIO))


def _sra_grad(q, k, v, causal):
    from . import torch as lat

    _grid_only("sra", causal)
    g = grid_of(k.shape[1])
    return lat.sra_attention(q, k, v, g, _clip(g, SRA_RATIO))


_has_grid = lambda: _grid.HAS_GRID  # noqa: E731
register(Mechanism("sra", "sparse", _sra,
                   f"spatial-reduction attention (PVT; attn_sra_forward): keys and values "
                   f"average-pooled by up to {SRA_RATIO}x{SRA_RATIO} on the near-square grid of "
                   "the keys; non-causal",
                   patterns=("noncausal-self", "noncausal-cross"), available=_has_grid,
                   backward=_sra_grad))


def _patch_of_token(grid, ratio):
    """Each token's pooled patch (row-major grid, ratio per axis): int64 [h w]."""
    y, x = np.divmod(np.arange(grid[0] * grid[1]), grid[1])
    return torch.from_numpy((y // ratio[0]) * (grid[1] // ratio[1]) + x // ratio[1])


def _crosslmm(q, k, v, causal):
    """Pooled queries (CrossLMM): every query gets the output of its pooled
    patch (nearest upsampling back to N rows)."""
    _grid_only("crosslmm", causal)
    g = grid_of(q.shape[1])
    r = _clip(g, CROSS_RATIO)
    o = _grid.pooled_cross_attention(q, k, v, g, r)
    return o[:, _patch_of_token(g, r)]


def _crosslmm_grad(q, k, v, causal):
    from . import torch as lat

    _grid_only("crosslmm", causal)
    g = grid_of(q.shape[1])
    r = _clip(g, CROSS_RATIO)
    return lat.pooled_cross_attention(q, k, v, g, r)[:, _patch_of_token(g, r)]


register(Mechanism("crosslmm", "sparse", _crosslmm,
                   f"CrossLMM pooled cross-attention (attn_pooled_cross_forward; backward "
                   f"attn_pooled_cross_backward): queries average-pooled by up to "
                   f"{CROSS_RATIO}x{CROSS_RATIO} on their near-square grid attend to all keys; "
                   "each query takes its patch's output; non-causal",
                   patterns=("noncausal-self", "noncausal-cross"), available=_has_grid,
                   backward=_crosslmm_grad if _grid.HAS_POOLED_CROSS_BACKWARD else None))


def _nbhd(q, k, v, causal):
    _grid_only("neighborhood", causal)
    g = grid_of(q.shape[1])
    return _grid.neighborhood_attention(q, k, v, g, (NBHD_RADIUS, NBHD_RADIUS), block=BLOCK)


def _nbhd_grad(q, k, v, causal):
    from . import torch as lat

    _grid_only("neighborhood", causal)
    g = grid_of(q.shape[1])
    return lat.neighborhood_attention(q, k, v, g, (NBHD_RADIUS, NBHD_RADIUS), block=BLOCK)


register(Mechanism("neighborhood", "sparse", _nbhd,
                   f"2-D neighbourhood attention (CLEAR; attn_neighborhood_forward): the keys "
                   f"within {NBHD_RADIUS} rows and columns on the near-square grid "
                   f"({2 * NBHD_RADIUS + 1}x{2 * NBHD_RADIUS + 1}), plan of {BLOCK}-blocks; "
                   "non-causal self",
                   patterns=("noncausal-self",), available=_has_grid, backward=_nbhd_grad))


def _hilo_with(fn, q, k, v, causal):
    """HiLo through fn (the binding or its differentiable form): the first
    half of the heads in windows, the rest to pooled keys."""
    _grid_only("hilo", causal)
    H = q.shape[2]
    g = grid_of(q.shape[1])
    return fn(q, _expand_heads(k, H), _expand_heads(v, H), g, _clip(g, GRID_WIN), H // 2)


def _hilo(q, k, v, causal):
    return _hilo_with(_grid.hilo_attention, q, k, v, causal)


def _hilo_grad(q, k, v, causal):
    from . import torch as lat

    return _hilo_with(lat.hilo_attention, q, k, v, causal)


_has_window_backward = lambda: _grid.HAS_WINDOW_BACKWARD  # noqa: E731
register(Mechanism("hilo", "sparse", _hilo,
                   f"HiLo (LITv2; attn_hilo_forward, backward attn_hilo_backward): H - H/2 heads "
                   f"attend within windows of up to {GRID_WIN}x{GRID_WIN} on the near-square "
                   "grid, H/2 heads to keys and values pooled by the window; non-causal self",
                   patterns=("noncausal-self",), available=_has_window_backward,
                   backward=_hilo_grad))


def _global_context_with(fn, q, k, v, causal):
    """GC ViT through fn (the binding or its differentiable form): local
    window attention and the same windows queried by global queries (here
    the mean query of each window position over all windows), mixed evenly:
    o = (o_local + o_global) / 2."""
    _grid_only("global_context", causal)
    B, N, H, D = q.shape
    g = grid_of(N)
    w = _clip(g, GRID_WIN)
    wtok = w[0] * w[1]
    qw = q[:, torch.from_numpy(_grid.grid_window_index(g, w))]  # window-major
    qg = qw.reshape(B, N // wtok, wtok, H, D).mean(1)
    ol, og = fn(q, qg, _expand_heads(k, H), _expand_heads(v, H), g, w)
    return 0.5 * (ol + og)


def _global_context(q, k, v, causal):
    return _global_context_with(_grid.global_context_attention, q, k, v, causal)


def _global_context_grad(q, k, v, causal):
    from . import torch as lat

    return _global_context_with(lat.global_context_attention, q, k, v, causal)


register(Mechanism("global_context", "sparse", _global_context,
                   f"Global Context ViT (attn_global_context_forward, backward "
                   f"attn_global_context_backward): windows of up to {GRID_WIN}x{GRID_WIN} on "
                   "the near-square grid, local queries and global queries (the mean query of "
                   "each window position), outputs averaged; non-causal self",
                   patterns=("noncausal-self",), available=_has_window_backward,
                   backward=_global_context_grad))

PARO_SAMPLES = 16  # query rows scored per axis order and head


def _paro(q, k, v, causal):
    """PAROAttention: per head the grid axis order that makes attention most
    block-shaped (attn_paro_choose), tokens gathered into that order, then
    the same dynamic top-k block plan as `topk`, scattered back."""
    _grid_only("paro", causal)
    B, N, H, _ = q.shape
    g = grid_of(N)
    k, v = _expand_heads(k, H), _expand_heads(v, H)
    blk = min(BLOCK, N)
    keep = _nkeep(N)
    out = torch.empty(q.shape[:3] + (v.shape[3],), dtype=q.dtype)
    for b in range(B):
        qb, kb, vb = q[b:b + 1], k[b:b + 1], v[b:b + 1]
        perms = _grid.paro_choose(qb, kb, g, block=blk, keep=min(keep, -(-N // blk)),
                                  samples=min(PARO_SAMPLES, N))
        for perm in {tuple(p) for p in perms.tolist()}:
            heads = torch.tensor([h for h in range(H) if tuple(perms[h]) == perm])
            idx = _grid.grid_axis_index(g, perm)
            qh, kh, vh = (_grid.gather_tokens(x[:, :, heads], idx) for x in (qb, kb, vb))
            plan = Plan.select(qh, kh, BLOCK, BLOCK, top_k=keep)
            o = _ops.attention(qh, kh, vh, plan=plan)
            out[b:b + 1, :, heads] = _grid.scatter_tokens(o, idx)
    return out


register(Mechanism("paro", "sparse", _paro,
                   f"PAROAttention (attn_paro_choose + attn_gather_tokens / attn_scatter_tokens): "
                   f"per head the axis order of the near-square grid that concentrates attention "
                   f"({PARO_SAMPLES} sampled rows), then top-k blocks as `topk` in that order; "
                   "non-causal self",
                   patterns=("noncausal-self",),
                   available=lambda: _grid.HAS_GRID and _lib.HAS_PLANNERS))

# ---------------------------------------------------------------- token pruning and grouping

SPATTEN_KEEP = 1 / 2  # fraction of the keys kept (at least 16)
SPATTEN_SAMPLES = 64  # query rows whose attention ranks the keys


def _spatten(q, k, v, causal):
    """SpAtten token pruning, one layer: the keys ranked by the attention
    probability they receive from SPATTEN_SAMPLES evenly spaced query rows
    (attn_token_importance), the top fraction kept (attn_top_tokens,
    attn_select_tokens), then exact attention over the kept keys."""
    if causal:
        raise ValueError("spatten: pruned keys lose their positions; non-causal only")
    N, M = q.shape[1], k.shape[1]
    rows = torch.unique(torch.linspace(0, N - 1, min(N, SPATTEN_SAMPLES)).round().long())
    qs = q[:, rows]
    _, lse = _ops.attention(qs, k, v, return_lse=True)
    imp = _tokens.token_importance(qs, k, lse)
    keep = min(M, max(16, math.ceil(M * SPATTEN_KEEP)))
    out = []
    for b in range(q.shape[0]):
        idx = _tokens.top_tokens(imp[b], keep)
        kb, vb = (_tokens.select_tokens(x[b:b + 1], idx) for x in (k, v))
        out.append(_ops.attention(q[b:b + 1], kb, vb))
    return torch.cat(out)


register(Mechanism("spatten", "sparse", _spatten,
                   f"SpAtten token pruning (attn_token_importance / attn_top_tokens / "
                   f"attn_select_tokens): the {SPATTEN_KEEP:.3g} of the keys (>= 16) that "
                   f"{SPATTEN_SAMPLES} sampled query rows attend to most, then exact attention "
                   "over them; non-causal",
                   patterns=("noncausal-self", "noncausal-cross"),
                   available=lambda: _tokens.HAS_SPATTEN))

CATANET_GROUP = 128  # tokens per group, on average


def _catanet(q, k, v, causal):
    """CATANet: tokens grouped by their nearest centre (features: the keys
    averaged over heads; centres: G evenly spaced tokens, G = N / 128),
    attention within each group and to the group means, mixed evenly:
    o = (o_intra + o_inter) / 2."""
    if causal:
        raise ValueError("catanet: groups are not causal; non-causal self only")
    return _catanet_mix(_tokens.catanet_attention, q, k, v)


def _catanet_mix(attend, q, k, v):
    """attend(q, k, v, feats, centres) -> (o_intra, o_inter) per sequence,
    mixed evenly; the features come from the keys without a gradient (the
    grouping is a discrete choice, held fixed)."""
    B, N = q.shape[:2]
    G = max(1, -(-N // CATANET_GROUP))
    centres = torch.linspace(0, N - 1, G).round().long()
    out = []
    for b in range(B):
        feats = k[b:b + 1].detach().float().mean(2, keepdim=True)
        oi, ox = attend(q[b:b + 1], k[b:b + 1], v[b:b + 1], feats, feats[:, centres].contiguous())
        out.append(0.5 * (oi + ox))
    return torch.cat(out)


def _catanet_grad(q, k, v, causal):
    from . import torch as lat

    if causal:
        raise ValueError("catanet: groups are not causal; non-causal self only")
    return _catanet_mix(lat.catanet_attention, q, k, v)


register(Mechanism("catanet", "sparse", _catanet,
                   f"CATANet token aggregation (attn_catanet_forward; backward "
                   f"attn_catanet_backward, groups held fixed): groups of ~{CATANET_GROUP} "
                   "tokens around evenly spaced centres (features: keys averaged over heads), "
                   "attention within the group and to the group means, averaged; "
                   "non-causal self",
                   patterns=("noncausal-self",), available=lambda: _tokens.HAS_CATANET,
                   backward=_catanet_grad if _tokens.HAS_CATANET_BACKWARD else None))


def get(name: str) -> Mechanism:
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown mechanism {name!r}; known: {', '.join(REGISTRY)}") from None


__all__ = ["Mechanism", "REGISTRY", "PATTERNS", "register", "available", "get"]
