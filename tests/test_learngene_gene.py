"""The gene directory on disk (save_gene, load_gene, gene.json) and gene_summary."""

from __future__ import annotations

import json

import pytest
import torch

from tests.learngene_models import _model, _random_stack, _tleg_gene, _zoo_config
from weightspace.errors import InputError, SpecError
from weightspace.ir import WeightSpace
from weightspace.merges.learngene import fit_gene, gene_summary, load_gene, save_expanded, save_gene
from weightspace.sources import load_space

# ---------------------------------------------------------------------------------------------
# on disk


def test_save_and_load_gene(tmp_path):
    tok = tmp_path / "src"
    tok.mkdir()
    (tok / "vocab.txt").write_text("[PAD]\nhello\n")
    model = _model(_random_stack(4), _zoo_config(4))
    model.meta["files"] = {"vocab.txt": tok / "vocab.txt"}
    gene = fit_gene(model, mode="sws", stages=[1, 3])
    out = save_gene(gene, tmp_path / "g")
    assert sorted(p.name for p in out.iterdir()) == ["gene.json", "model.safetensors", "source_config.json",
                                                     "vocab.txt"]
    back = load_gene(out)
    assert back.meta == json.loads(json.dumps(gene.meta))
    for n in gene.space:
        assert torch.equal(back.space[n].load(), gene.space[n].load())
    assert json.loads((out / "source_config.json").read_text()) == _zoo_config(4)
    with pytest.raises(SpecError, match="already exists"):
        save_gene(gene, out)
    exp = save_expanded(back, 6, tmp_path / "x6")
    assert json.loads((exp / "config.json").read_text())["arch"]["depth"] == 6
    assert (exp / "vocab.txt").read_text() == "[PAD]\nhello\n"
    assert load_space(exp).structure().stacks == {"blocks": 6}
    from weightspace.safetensors_io import read_header

    _, meta = read_header(exp / "model.safetensors")
    assert json.loads(meta["weightspace.learngene"])["stages"] == [3, 3]


def test_load_gene_errors_name_the_file(tmp_path):
    with pytest.raises(InputError, match="no such gene directory"):
        load_gene(tmp_path / "missing")
    WeightSpace.from_tensors({"w": torch.zeros(2)}).save(tmp_path / "plain")
    with pytest.raises(InputError, match=r"plain: not a learngene directory \(no gene.json"):
        load_gene(tmp_path / "plain")
    out = save_gene(fit_gene(_model(_random_stack(3))), tmp_path / "g")
    meta = json.loads((out / "gene.json").read_text())
    (out / "gene.json").write_text("{not json")
    with pytest.raises(InputError, match=r"g/gene.json: not valid JSON"):
        load_gene(out)
    (out / "gene.json").write_text(json.dumps({**meta, "suffixes": [*meta["suffixes"], "fc9.weight"],
                                               "dtypes": {**meta["dtypes"], "fc9.weight": "float32"}}))
    with pytest.raises(InputError, match=r"g/gene.json: tensor 'gene.A.fc9.weight' is missing"):
        load_gene(out)
    (out / "gene.json").write_text(json.dumps({**meta, "format": "something-else"}))
    with pytest.raises(InputError, match="not a learngene file"):
        load_gene(out)


# ---------------------------------------------------------------------------------------------
# summaries


def test_gene_summary_and_a_model_path(tmp_path):
    gene, A, B = _tleg_gene("L", source_depth=4)
    rows = {r["suffix"]: r for r in gene_summary(gene, depth=8)}
    a, b = A["fc1.weight"].double(), B["fc1.weight"].double()
    want = [float((a + (i / 8) * b).norm()) for i in range(8)]
    assert rows["fc1.weight"]["layer_norms"] == pytest.approx(want, rel=1e-5)
    assert rows["fc1.weight"]["norm_B"] == pytest.approx(float(b.norm()), rel=1e-5)
    path = _model(_random_stack(3), _zoo_config(3), dtype=torch.float32).save(tmp_path / "m")
    gene = fit_gene(str(path))                                   # a path is opened with load_space
    assert gene.source_depth == 3 and gene.meta["provenance"]["source"] == str(path.resolve())
