"""Learngene training: an auxiliary network built from the gene, distilled from a small digits teacher."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from weightspace.binding import ClassifierAdapter, load_into
from weightspace.errors import InputError, SpecError
from weightspace.ir import WeightSpace
from weightspace.merges.learngene import distillation_loss, expand, load_gene, lr_at, train_gene
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


# ---------------------------------------------------------------------------------------------
# the authors' recipe (preset="authors") and the defects it fixed


def test_distillation_loss_mean_reduction_divides_by_every_logit():
    """kd_reduction="mean" is the authors' losses.py (DeiT): sum KL * T^2 / outputs.numel(), so at
    the same alpha its distillation term is C times smaller than the KL per prediction."""
    g = torch.Generator().manual_seed(3)
    B, C, T = 6, 10, 1.0
    s, t = torch.randn(B, 1, C, generator=g), torch.randn(B, 1, C, generator=g)
    y = torch.randint(0, C, (B, 1), generator=g)
    ps, pt = torch.softmax(s[:, 0] / T, -1), torch.softmax(t[:, 0] / T, -1)
    kl_sum = (pt * (pt.log() - ps.log())).sum()
    loss, kd, ce = distillation_loss(s, t, y, temperature=T, alpha=1.0, kd_reduction="mean")
    torch.testing.assert_close(kd, kl_sum * T * T / (B * C))
    torch.testing.assert_close(loss, kd)                        # alpha = 1: distillation only
    _, kd_batch, _ = distillation_loss(s, t, y, temperature=T, alpha=1.0)
    torch.testing.assert_close(kd_batch, kl_sum / B)
    torch.testing.assert_close(kd_batch, C * kd)
    with pytest.raises(SpecError, match="kd_reduction: unknown 'sum'"):
        distillation_loss(s, t, y, kd_reduction="sum")


def _resmlp(depth: int, width: int = 8):
    from weightspace.zoo.arch import build_model

    return build_model({"arch": "resmlp", "width": width, "depth": depth}, (1, 4, 4), 5)


def _random_batches(n: int = 2, size: int = 16):
    g = torch.Generator().manual_seed(5)
    return [{"x": torch.rand(size, 1, 4, 4, generator=g), "y": torch.randint(0, 5, (size,), generator=g)}
            for _ in range(n)]


@pytest.mark.parametrize("teacher_depth, stages, groups", [
    (7, [1, 5, 1], [[0], [1, 2, 3, 4, 5], [6]]),        # the list itself, not 7 layers split 3,2,2
    (7, [2, 3, 2], [[0, 1], [2, 3, 4], [5, 6]]),
    (6, [1, 5, 1], [[0], [1, 2, 3, 4], [5]]),           # by relative depth: centres 1/12, 3/12, ... 11/12
    (6, [2, 3, 2], [[0, 1], [2, 3], [4, 5]]),
])
def test_sws_fit_init_starts_each_stage_from_its_own_teacher_layers(teacher_depth, stages, groups):
    torch.manual_seed(11)
    teacher = _resmlp(teacher_depth)
    with torch.no_grad():                                # layers that differ in every tensor
        for p in teacher.parameters():
            p.add_(torch.randn_like(p))
    gene = train_gene(lambda d: _resmlp(d), teacher, _random_batches(), mode="sws", aux_depth=sum(stages),
                      stages=stages, init="fit", steps=1, lr=1e-12)
    assert gene.meta["stages"] == stages
    tp = dict(teacher.named_parameters())
    for suffix in ("fc1.weight", "fc2.bias", "norm.weight"):
        for s, layers in enumerate(groups):
            want = torch.stack([tp[f"blocks.{j}.{suffix}"].detach() for j in layers]).mean(0)
            torch.testing.assert_close(gene.space[f"gene.stage{s}.{suffix}"].load(), want, atol=1e-6, rtol=0)
    with pytest.raises(SpecError, match="leave stage 1 without a layer of the 2-layer teacher"):
        train_gene(lambda d: _resmlp(d), _resmlp(2), _random_batches(), mode="sws", aux_depth=7,
                   stages=[3, 1, 3], init="fit", steps=1)


def test_lr_at_is_timm_cosine_with_linear_warmup():
    lr, lo, w0, total, warm = 5e-4, 1e-5, 1e-6, 40, 8
    got = [lr_at(i, total, lr=lr, warmup_steps=warm, warmup_lr=w0, min_lr=lo) for i in range(total)]
    want = [w0 + (lr - w0) * i / warm if i < warm else lo + 0.5 * (lr - lo) * (1 + math.cos(math.pi * i / total))
            for i in range(total)]
    assert got == pytest.approx(want, rel=1e-12)
    assert [lr_at(i, 10, lr=1e-3) for i in range(10)] == pytest.approx(
        [1e-3 * 0.5 * (1 + math.cos(math.pi * i / 10)) for i in range(10)], rel=1e-12)


@pytest.mark.filterwarnings("ignore:train_gene. the warm-up")  # runs of a step or two
def test_authors_preset_warms_up_from_1e6():
    """One AdamW step moves an entry with a gradient by ~lr: 1e-6 at the start of the authors'
    warm-up, 1e-3 without one (our default)."""
    batches = _random_batches()
    teacher = _resmlp(3)
    for preset, first_lr in (("authors", 1e-6), ("default", 1e-3)):
        gene = train_gene(lambda d: _resmlp(d), teacher, batches, preset=preset, aux_depth=3, steps=1, seed=2)
        torch.manual_seed(2)
        start = _resmlp(3).blocks[0].fc1.weight.detach()
        moved = (gene.space["gene.A.fc1.weight"].load() - start).abs().max()
        assert float(moved) == pytest.approx(first_lr, rel=0.1), preset     # float32 rounding of ~0.3


@pytest.mark.filterwarnings("ignore:train_gene. the warm-up")  # runs of a step or two
def test_authors_preset_settings():
    from weightspace.zoo.arch import build_model

    batches = _random_batches(n=3, size=16)
    teacher = _resmlp(3)
    rep = train_gene(lambda d: _resmlp(d), teacher, batches, preset="authors", steps=1).meta
    assert rep["source_depth"] == 12                                   # Aux-S of TLEG
    r = rep["report"]
    assert (r["preset"], r["temperature"], r["alpha"], r["kd_reduction"]) == ("authors", 1.0, 1.0, "mean")
    assert r["lr"] == pytest.approx(5e-4 * 16 / 512)                   # DeiT's linear scaling at batch 16
    assert (r["warmup_lr"], r["min_lr"], r["weight_decay"], r["decay_1d"], r["clip"]) == (1e-6, 1e-5, 0.05,
                                                                                       False, 0.0)
    r = train_gene(lambda d: _resmlp(d), teacher, batches, preset="authors", aux_depth=3, epochs=2).meta["report"]
    assert (r["epochs"], r["steps"], r["warmup_steps"]) == (2, 6, 15)  # 5 warm-up epochs of 3 batches
    sws = train_gene(lambda d: _resmlp(d), teacher, batches, mode="sws", preset="authors", steps=1).meta
    assert (sws["source_depth"], sws["stages"]) == (16, [3, 3, 4, 3, 3])   # SWS Aux-S, L16_33433
    assert train_gene(lambda d: _resmlp(d), teacher, batches, mode="sws", preset="authors", aux_depth=7,
                      steps=1).meta["stages"] == [2, 2, 1, 1, 1]
    r = train_gene(lambda d: _resmlp(d), teacher, batches, aux_depth=3, steps=1).meta["report"]
    assert (r["preset"], r["temperature"], r["alpha"], r["kd_reduction"], r["lr"], r["clip"],
            r["warmup_steps"], r["decay_1d"]) == ("default", 2.0, 0.5, "batchmean", 1e-3, 1.0, 0, True)
    with pytest.raises(SpecError, match="preset: unknown 'paper'; use default or authors"):
        train_gene(lambda d: _resmlp(d), teacher, batches, preset="paper")
    # no weight decay on 1-D tensors, biases, pos_embed or cls_token (timm's param_groups_weight_decay)
    from weightspace.merges.learngene.recipe import _check_recipe, _with_preset
    from weightspace.merges.learngene.train import _param_groups

    vit = build_model({"arch": "vit", "width": 8, "depth": 2, "patch": 2, "heads": 2}, (1, 4, 4), 5)
    leaves = {"gene.A.attn.qkv.weight": torch.zeros(24, 8), "gene.B.norm1.weight": torch.zeros(8),
              "gene.A.mlp.fc1.bias": torch.zeros(16), "pos_embed": torch.zeros(1, 5, 8),
              "cls_token": torch.zeros(1, 1, 8), "head.weight": torch.zeros(5, 8)}
    args = dict(mode="tleg", aux_depth=2, stages=None, denominator="L", temperature=None, alpha=None,
                kd_reduction=None, epochs=None, steps=1, lr=None, weight_decay=None, decay_1d=None, clip=None,
                warmup_epochs=None, warmup_lr=None, min_lr=None, seed=0, init="random")
    decayed, skipped = _param_groups(leaves, _check_recipe(_with_preset("authors", **args)), vit)
    assert decayed["weight_decay"] == 0.05 and skipped["weight_decay"] == 0.0
    assert decayed["names"] == ["gene.A.attn.qkv.weight", "head.weight"]
    assert skipped["names"] == ["gene.B.norm1.weight", "gene.A.mlp.fc1.bias", "pos_embed", "cls_token"]
    (every,) = _param_groups(leaves, _check_recipe(_with_preset("default", **args)), vit)
    assert every["names"] == list(leaves) and every["weight_decay"] == 0.05


def test_cli_train_with_the_authors_preset(teacher, tmp_path, run_cli):
    code, out, err = run_cli("learngene", "train", "--teacher", teacher, "--data", "digits", "--preset", "authors",
                             "--aux-depth", "3", "--epochs", "1", "--n-examples", "128", "--batch-size", "64",
                             "-o", tmp_path / "g", "--no-progress")
    assert code == 0, err
    assert "preset authors: lr 6.25e-05, T 1, alpha 1, KL mean, 10 warm-up steps" in out
    r = load_gene(tmp_path / "g").meta["report"]
    assert (r["preset"], r["steps"], r["alpha"]) == ("authors", 2, 1.0)
    # one epoch of 2 steps is inside the preset's 5-epoch warm-up: said once, as a warning line
    assert err.count("warning: the warm-up (10 steps) is as long as the whole run (2 steps)") == 1, err
    assert "UserWarning" not in err


def test_a_run_no_longer_than_its_warm_up_is_said():
    """The authors' 5 warm-up epochs with epochs=2 never reach the preset's lr (and never decay):
    the API warns, the report says so; with more epochs than the warm-up, nothing is said."""
    import warnings

    batches = _random_batches(n=3, size=16)
    teacher = _resmlp(3)
    with pytest.warns(UserWarning, match=r"the warm-up \(15 steps\) is as long as the whole run \(6 steps\)"):
        gene = train_gene(lambda d: _resmlp(d), teacher, batches, preset="authors", aux_depth=3, epochs=2)
    r = gene.meta["report"]
    assert (r["warmup_steps"], r["steps"], r["warmup_covers_run"]) == (15, 6, True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        r = train_gene(lambda d: _resmlp(d), teacher, batches, preset="authors", aux_depth=3, epochs=6).meta["report"]
    assert (r["warmup_steps"], r["steps"], r["warmup_covers_run"]) == (15, 18, False)
    r = train_gene(lambda d: _resmlp(d), teacher, batches, aux_depth=3, epochs=1).meta["report"]   # no warm-up
    assert (r["warmup_steps"], r["warmup_covers_run"]) == (0, False)
