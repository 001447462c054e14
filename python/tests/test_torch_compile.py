"""The mechanisms of libattn.torch registered as torch.library custom ops:
torch.compile(fullgraph=True) of a small function over each one gives the
eager values and gradients (a graph break, e.g. a ctypes call traced,
fails fullgraph), and torch.library.opcheck passes on three of them. The
compile backend is aot_eager: Dynamo and AOTAutograd over the fake
implementations, without Inductor's C++ build (seconds per op)."""

import pytest

torch = pytest.importorskip("torch")

import libattn.torch as lat  # noqa: E402
from libattn import _grid, _lib, _linmech, _ssm, _tokens  # noqa: E402
from torch._dynamo.testing import CompileCounterWithBackend  # noqa: E402

F = torch.nn.functional


def rnd(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def qkv(T=16, H=2, Hk=1, D=8, Dv=4):
    return rnd(1, T, H, D, seed=1), rnd(1, T, Hk, D, seed=2), rnd(1, T, Hk, Dv, seed=3)


def scan_inputs(ssd):
    if ssd:  # x [B, T, H, P], dt [B, T, H], a [H], bm, cm [B, T, G, N], dskip [H]
        return (rnd(1, 9, 2, 3, seed=1), F.softplus(rnd(1, 9, 2, seed=2)),
                -rnd(2, seed=3).abs() - 0.1, rnd(1, 9, 1, 4, seed=4), rnd(1, 9, 1, 4, seed=5),
                rnd(2, seed=6))
    return (rnd(1, 9, 3, seed=1), F.softplus(rnd(1, 9, 3, seed=2)),  # x, delta [B, T, E]
            -rnd(3, 4, seed=3).abs(), rnd(1, 9, 4, seed=4), rnd(1, 9, 4, seed=5), rnd(3, seed=6))


def case(name):
    """(function of the tensors, the tensors, whether this build has it)."""
    q, k, v = qkv()
    if name == "linear_attention":
        return lambda q, k, v: lat.linear_attention(q, k, v, causal=False), (q, k, v), \
            _lib.HAS_LINEAR
    if name == "gla_attention":
        g = F.logsigmoid(rnd(1, 16, 2, seed=4))
        return lambda q, k, v, g: lat.gla_attention(q, k, v, g), (q, k, v, g), _lib.HAS_LINEAR
    if name in ("ssd", "ssd_no_dskip", "mamba_scan"):
        fn = lat.mamba_scan if name == "mamba_scan" else lat.ssd
        z = scan_inputs(name != "mamba_scan")
        has = _ssm.HAS_MAMBA if name == "mamba_scan" else _ssm.HAS_SSD
        return (fn, z, has) if name != "ssd_no_dskip" else (fn, z[:5], has)
    if name == "sra_attention":
        return lambda q, k, v: lat.sra_attention(q, k, v, (4, 4), (2, 1), softcap=5.0), \
            (q, k, v), _grid.HAS_GRID
    if name == "pooled_cross_attention":
        return lambda q, k, v: lat.pooled_cross_attention(q, k, v, (4, 4), (2, 1)), \
            (q, k, v), _grid.HAS_POOLED_CROSS_BACKWARD
    if name == "catanet_attention":  # two outputs, mixed unevenly so both count
        feats, centres = rnd(1, 16, 1, 3, seed=4), rnd(1, 3, 1, 3, seed=5)
        return lambda q, k, v: _mix(*lat.catanet_attention(q, k, v, feats, centres)), \
            (q, k, v), _tokens.HAS_CATANET_BACKWARD
    if name == "neighborhood_attention":
        return lambda q, k, v: lat.neighborhood_attention(q, k, v, (4, 4), (1, 1), block=4), \
            (q, k, v), _grid.HAS_GRID
    if name == "hilo_attention":
        q, k, v = qkv(Hk=2)
        return lambda q, k, v: lat.hilo_attention(q, k, v, (4, 4), (2, 2), 1, softcap=5.0), \
            (q, k, v), _grid.HAS_WINDOW_BACKWARD
    if name == "global_context_attention":  # both outputs in the loss
        q, k, v = qkv(Hk=2)
        return lambda q, qg, k, v: torch.cat(
            lat.global_context_attention(q, qg, k, v, (4, 4), (2, 2)), -1), \
            (q, rnd(1, 4, 2, 8, seed=4), k, v), _grid.HAS_WINDOW_BACKWARD
    if name == "lightnet_attention":
        return lambda q, k, v: lat.lightnet_attention(q, k, v), (q, k, v), _linmech.HAS_LIGHTNET
    if name == "rfa_attention":
        return lambda q, k, v: lat.rfa_attention(q, k, v, features=8), (q, k, v), \
            _linmech.HAS_RFA
    if name == "wersa_attention":
        w = torch.tensor([1.0, 0.7, 0.5])
        return lambda q, k, v, w: lat.wersa_attention(q, k, v, w, features=8, causal=False), \
            (q, k, v, w), _linmech.HAS_WERSA
    if name == "lla_attention":
        return lambda q, k, v: lat.lla_attention(q, k, v, lam=0.5), (q, k, v), \
            _linmech.HAS_LLA_BACKWARD
    raise KeyError(name)


def _mix(o_intra, o_inter):
    return o_intra + 2 * o_inter


NAMES = ["linear_attention", "gla_attention", "ssd", "ssd_no_dskip", "mamba_scan",
         "sra_attention", "pooled_cross_attention", "catanet_attention",
         "neighborhood_attention", "hilo_attention", "global_context_attention",
         "lightnet_attention", "rfa_attention", "wersa_attention", "lla_attention"]


@pytest.mark.parametrize("name", NAMES)
def test_compile_fullgraph_matches_eager(name):
    fn, inputs, has = case(name)
    if not has:
        pytest.skip(f"this libattn build has no {name} (or its backward)")
    torch._dynamo.reset()
    out = fn(*inputs)
    do = rnd(*out.shape, seed=7)
    loss = lambda *a: (fn(*a) * do).sum().sin()  # noqa: E731
    backend = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(loss, backend=backend, fullgraph=True)
    results = []
    for f in (loss, compiled):
        leaves = [x.clone().requires_grad_() for x in inputs]
        y = f(*leaves)
        results.append((y, torch.autograd.grad(y, leaves)))
    (y, grads), (yc, gradsc) = results
    op = f"libattn.{name.replace('_no_dskip', '')}_fwd"
    assert backend.frame_count == 1 and any(
        op in str(n.target) for n in backend.graphs[0].graph.nodes), backend.graphs[0].graph
    assert torch.allclose(yc, y, rtol=1e-6, atol=1e-6)
    for gc, g in zip(gradsc, grads):
        assert gc.shape == g.shape and gc.dtype == g.dtype
        assert torch.allclose(gc, g, rtol=1e-5, atol=1e-6)


def _passed(res):
    return all(v == "SUCCESS" for v in res.values())


@pytest.mark.skipif(not _grid.HAS_GRID, reason="no grid mechanisms in this build")
def test_opcheck_sra():
    """Two outputs (o, LSE), list-of-int arguments, an optional float."""
    q, k, v = (x.requires_grad_() for x in qkv())
    assert _passed(torch.library.opcheck(torch.ops.libattn.sra_attention_fwd.default,
                                         (q, k, v, [4, 4], [2, 1], None, 0.0)))


@pytest.mark.skipif(not _tokens.HAS_CATANET_BACKWARD, reason="no CATANet backward")
def test_opcheck_catanet():
    """Four outputs, two of them differentiable; no gradient for feats, centres."""
    q, k, v = (x.requires_grad_() for x in qkv())
    feats, centres = rnd(1, 16, 1, 3, seed=4), rnd(1, 3, 1, 3, seed=5)
    assert _passed(torch.library.opcheck(torch.ops.libattn.catanet_attention_fwd.default,
                                         (q, k, v, feats, centres, None)))


@pytest.mark.skipif(not _grid.HAS_WINDOW_BACKWARD, reason="no HiLo / GC backward in this build")
def test_opcheck_global_context():
    """Four outputs of which two are differentiable (a gradient each)."""
    q, k, v = qkv(Hk=2)
    qg = rnd(1, 4, 2, 8, seed=4)
    args = [x.requires_grad_() for x in (q, qg, k, v)]
    assert _passed(torch.library.opcheck(torch.ops.libattn.global_context_attention_fwd.default,
                                         (*args, [4, 4], [2, 2], None, 0.0)))


@pytest.mark.skipif(not _ssm.HAS_SSD, reason="no SSD in this build")
def test_opcheck_ssd_without_dskip():
    """An optional tensor left out: the backward op returns an empty tensor for it."""
    z = [x.requires_grad_() for x in scan_inputs(True)[:5]]
    assert _passed(torch.library.opcheck(torch.ops.libattn.ssd_fwd.default, (*z, None)))
