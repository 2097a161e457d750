"""Learngene training: an auxiliary network built from the gene, distilled from a small digits teacher."""

from __future__ import annotations

import warnings

import pytest
import torch

from weightspace.binding import ClassifierAdapter, load_into
from weightspace.errors import InputError, SpecError
from weightspace.ir import WeightSpace
from weightspace.merges.learngene import distillation_loss, expand, load_gene, train_gene
from weightspace.sources import load_space

# ---------------------------------------------------------------------------------------------
# training


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A small resmlp trained briefly on digits, saved as a zoo checkpoint."""
    from weightspace.zoo.build import checkpoint_config
    from weightspace.zoo.data import load_task
    from weightspace.zoo.train import ModelRun, TrainConfig, train

    run = ModelRun(dataset="digits", arch={"arch": "resmlp", "width": 16, "depth": 3},
                   train=TrainConfig(epochs=2, data_fraction=0.3))
    task = load_task("digits")
    ck = train(run, task=task).checkpoints[-1]
    out = tmp_path_factory.mktemp("teacher") / "resmlp"
    WeightSpace.from_tensors(ck.tensors).save(
        out, config=checkpoint_config(run, ck.epoch, task.input_shape, task.num_classes))
    return out


def test_distillation_loss_formula():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(4, 1, 5, generator=g), torch.randn(4, 1, 5, generator=g)
    y = torch.tensor([[0], [3], [-100], [1]])
    loss, kd, ce = distillation_loss(s, t, y, temperature=2.0, alpha=0.3)
    keep = [0, 1, 3]
    ps, pt = torch.softmax(s[keep, 0] / 2, -1), torch.softmax(t[keep, 0] / 2, -1)
    want_kd = 4 * (pt * (pt.log() - ps.log())).sum(-1).mean()
    want_ce = torch.nn.functional.cross_entropy(s[keep, 0], y[keep, 0])
    torch.testing.assert_close(kd, want_kd)
    torch.testing.assert_close(ce, want_ce)
    torch.testing.assert_close(loss, 0.3 * want_kd + 0.7 * want_ce)


@pytest.mark.parametrize("mode, init", [("tleg", "random"), ("sws", "random"), ("tleg", "fit")])
def test_train_gene_lowers_the_distillation_loss(teacher, mode, init):
    from weightspace.zoo.arch import build_model
    from weightspace.zoo.bind import open_batches, open_model

    adapter = open_model(teacher)
    arch = load_space(teacher).meta["config"]["arch"]
    batches = open_batches("digits", adapter, split="train", batch_size=128, n_examples=512)
    factory = lambda d: build_model({**arch, "depth": d}, (1, 8, 8), 10)  # noqa: E731
    gene = train_gene(factory, adapter, batches, mode=mode, aux_depth=4, stages=[1, 2, 1] if mode == "sws" else None,
                      steps=24, lr=3e-3, init=init, config={"model_type": "weightspace-zoo",
                                                              "arch": {**arch, "depth": 4}})
    rep = gene.meta["report"]
    assert rep["loss_end"] < rep["loss_start"]
    if init == "random":
        assert rep["kd_end"] < 0.7 * rep["kd_start"]
    else:  # a fit of the 3-layer teacher, expanded to 4 layers, starts close to it
        assert rep["kd_start"] < 0.2
    assert len(gene.meta["history"]) == 24 and gene.meta["source_depth"] == 4
    assert gene.meta["depth_key"] == "arch.depth"
    assert set(gene.suffixes) == {"norm.weight", "norm.bias", "fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"}
    expected = 2 if mode == "tleg" else 3
    assert len([n for n in gene.space if n.startswith("gene.")]) == expected * 6
    # the auxiliary network's loss is that of the gene expanded to aux_depth
    aux = load_into(factory(4), expand(gene, 4, stages=[1, 2, 1] if mode == "sws" else None).materialize())
    with torch.no_grad():
        kd = torch.stack([distillation_loss(aux(b["x"]).unsqueeze(1), adapter.logits(adapter.params(), b),
                                            b["y"].unsqueeze(1))[1] for b in batches]).mean()
    assert float(kd) == pytest.approx(rep["kd_end"], rel=1e-4)
    # and its accuracy, against the share of the most common label (what "at chance" compares to)
    with torch.no_grad():
        hits = sum(int((aux(b["x"]).argmax(-1) == b["y"]).sum()) for b in batches)
    ys = torch.cat([b["y"] for b in batches])
    assert rep["acc_end"] == pytest.approx(hits / len(ys))
    assert rep["chance"] == pytest.approx(float(torch.bincount(ys).max()) / len(ys))
    assert rep["at_chance"] is (rep["acc_end"] <= 1.5 * rep["chance"])
    student = load_into(factory(7), expand(gene, 7).materialize())   # any depth runs
    assert student(batches[0]["x"]).shape == (128, 10)


def test_a_gene_that_stayed_at_chance_is_reported(teacher):
    from weightspace.zoo.arch import build_model
    from weightspace.zoo.bind import open_batches, open_model

    adapter = open_model(teacher)
    arch = load_space(teacher).meta["config"]["arch"]
    batches = open_batches("digits", adapter, split="train", batch_size=128, n_examples=256)
    factory = lambda d: build_model({**arch, "depth": d}, (1, 8, 8), 10)  # noqa: E731
    rep = train_gene(factory, adapter, batches, aux_depth=4, steps=1, lr=1e-9).meta["report"]
    assert rep["at_chance"] and rep["acc_end"] <= 1.5 * rep["chance"]
    assert train_gene(factory, adapter, batches, aux_depth=4, steps=2, lr=1e-9).meta["report"]["epochs"] is None
    rep = train_gene(factory, adapter, batches, aux_depth=4, lr=1e-9).meta["report"]
    assert rep["epochs"] == 10 and rep["steps"] == 10 * len(batches)  # the default: 10 passes


def test_train_gene_on_a_vit_and_errors():
    from weightspace.zoo.arch import build_model

    arch = {"arch": "vit", "width": 16, "depth": 2, "patch": 4, "heads": 2}
    torch.manual_seed(1)
    t = build_model(arch, (1, 8, 8), 10)
    g = torch.Generator().manual_seed(0)
    batches = [{"x": torch.rand(32, 1, 8, 8, generator=g), "y": torch.randint(0, 10, (32,), generator=g)}
               for _ in range(2)]
    factory = lambda d: build_model({**arch, "depth": d}, (1, 8, 8), 10)  # noqa: E731
    gene = train_gene(factory, t, batches, aux_depth=3, steps=6, lr=3e-3, alpha=1.0)
    assert gene.meta["report"]["kd_end"] < gene.meta["report"]["kd_start"]
    assert "attn.qkv.weight" in gene.suffixes and "pos_embed" in gene.meta["non_layer"]
    assert expand(gene, 5).structure().stacks == {"blocks": 5}
    with pytest.raises(SpecError, match="give epochs or steps, not both"):
        train_gene(factory, t, batches, epochs=1, steps=1)
    with pytest.raises(SpecError, match="needs at least two layers"):
        train_gene(factory, t, batches, aux_depth=1)
    with pytest.raises(InputError, match="no data"):
        train_gene(factory, t, [])
    with pytest.raises(InputError, match="has no labels; use alpha=1"):
        train_gene(factory, ClassifierAdapter(t), [{"x": batches[0]["x"]}], steps=1)
    with pytest.raises(SpecError, match="add up to 4 layers, but the network has 3"):
        train_gene(factory, t, batches, mode="sws", aux_depth=3, stages=[2, 2])


# ---------------------------------------------------------------------------------------------
# CLI


def test_cli_train_on_a_zoo_teacher(teacher, tmp_path, run_cli):
    code, out, err = run_cli("learngene", "train", "--teacher", teacher, "--data", "digits", "--mode", "tleg",
                             "--aux-depth", "4", "--epochs", "1", "--n-examples", "256", "--lr", "3e-3",
                             "-o", tmp_path / "g", "--no-progress")
    assert code == 0, err
    assert "distillation" in out
    gene = load_gene(tmp_path / "g")
    assert gene.meta["provenance"]["teacher"] == str(teacher) and gene.meta["report"]["steps"] == 4
    code, out, err = run_cli("learngene", "expand", tmp_path / "g", "--depth", "9", "-o", tmp_path / "x9",
                             "--like", teacher)
    assert code == 0, err
    from weightspace.zoo.bind import open_model

    adapter = open_model(tmp_path / "x9")             # a zoo checkpoint of depth 9
    assert len(adapter.module.blocks) == 9
    code, out, err = run_cli("learngene", "train", "--teacher", tmp_path / "x9" / "missing", "--data", "digits",
                             "-o", tmp_path / "h")
    assert code == 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        code, out, err = run_cli("learngene", "train", "--teacher", teacher, "--data", "digits",
                                 "--mode", "sws", "--aux-depth", "4", "--stages", "2,3", "-o", tmp_path / "s")
    assert code == 2 and "add up to 5 layers, but the network has 4" in err


def test_cli_train_warns_when_the_gene_stayed_at_chance(teacher, tmp_path, run_cli):
    code, out, err = run_cli("learngene", "train", "--teacher", teacher, "--data", "digits", "--aux-depth", "4",
                             "--steps", "1", "--lr", "1e-9", "--n-examples", "256", "-o", tmp_path / "g",
                             "--no-progress")
    assert code == 0, err
    rep = load_gene(tmp_path / "g").meta["report"]
    assert f"accuracy {rep['acc_start']:.3f} -> {rep['acc_end']:.3f} on the training data" in out
    assert err.startswith("warning: the auxiliary network is still at chance after 1 steps")
    assert "train longer (--epochs) or with a larger --lr (now 1e-09)" in err
