"""Weight generators on a tiny zoo: weight chunker, chunk VAE, KDE sampler, D2NWG and KDE pipelines, CLI."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
from torch.func import functional_call

from weightspace.errors import InputError, SpecError
from weightspace.sources import load_space
from weightspace.zoo.arch import model_from_config
from weightspace.zoo.build import build_zoo
from weightspace.zoo.data import load_task
from weightspace.zoo.gen.chunking import WeightChunker
from weightspace.zoo.gen.evaluate import evaluate_samples
from weightspace.zoo.gen.generator import check_data, load_generator, sample, train_generator
from weightspace.zoo.gen.kde import KDESampler, bandwidths
from weightspace.zoo.spec import parse_zoo_spec
from weightspace.zoo.store import Zoo, write_catalog

TASK_A, TASK_B = "digits:classes=0-4", "digits:classes=5-9"

# 12 tiny MLPs (610 parameters): 2 tasks x 2 seeds x 3 learning rates, 3 epochs each
ZOO_SPEC = f"""
name: tiny-gen
arch: {{arch: mlp, width: 8, depth: 1}}
train: {{optimizer: sgd, lr: 0.05, momentum: 0.9, epochs: 3, batch_size: 32, checkpoints: [1]}}
grid:
  dataset: ["{TASK_A}", "{TASK_B}"]
  seed: [0, 1]
  lr: [0.03, 0.05, 0.1]
"""


@pytest.fixture(scope="module")
def tiny_zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen") / "zoo"
    build_zoo(parse_zoo_spec(ZOO_SPEC), root, workers=1, progress=False)
    return root


@pytest.fixture(scope="module")
def d2nwg(tiny_zoo):
    return train_generator(tiny_zoo, tiny_zoo.parent / "d2nwg", method="d2nwg", vae_epochs=300,
                           diffusion_epochs=800, seed=0)


@pytest.fixture(scope="module")
def kde_head(tiny_zoo):
    """A KDE generator of the head only (layers.0.* kept from each task's best model)."""
    return train_generator(tiny_zoo, tiny_zoo.parent / "kde", method="kde", subset="head.*",
                           vae_epochs=200, seed=0)


def _accuracy(tensors: dict[str, torch.Tensor], config: dict, ref: str) -> float:
    task = load_task(ref)
    with torch.no_grad():
        logits = functional_call(model_from_config(config), tensors, (task.test.x,))
    return float((logits.argmax(-1) == task.test.y).float().mean())


# ---------------------------------------------------------------- weight chunker

SHAPES = {"a.weight": (5, 7), "a.bias": (3,), "b.weight": (64,), "c.weight": (2, 3, 4)}


def _models(n: int, shapes=SHAPES, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [{k: torch.randn(s, generator=g) * (i + 1) + 3.0 for k, s in shapes.items()} for i in range(n)]


@pytest.mark.parametrize("chunk, padding, n_chunks", [
    (16, [13, 13, 0, 8], 3 + 1 + 4 + 2),
    (7, [0, 4, 6, 4], 5 + 1 + 10 + 4),
    (1, [0, 0, 0, 0], 35 + 3 + 64 + 24),
    (1000, [965, 997, 936, 976], 4),
])
def test_tokenizer_round_trip_is_exact_with_padding(chunk, padding, n_chunks):
    models = _models(4)
    tok = WeightChunker.fit(models, chunk=chunk)
    assert tok.padding == padding and tok.n_chunks == n_chunks and tok.num_params == 126
    tokens = tok.encode_many(models)
    assert tokens.shape == (4, n_chunks, chunk) and tokens.dtype == torch.float32
    assert int(tok.mask().sum()) == 126
    assert bool((tokens[:, ~tok.mask()] == 0).all())                 # padding is zeros
    for m, t in zip(models, tokens):
        back = tok.decode(t)
        assert list(back) == list(SHAPES)
        for k in SHAPES:
            assert back[k].shape == m[k].shape
            torch.testing.assert_close(back[k], m[k], rtol=1e-6, atol=1e-6)
    again = WeightChunker.from_state(json.loads(json.dumps(tok.state_dict())))
    assert torch.equal(again.encode(models[1]), tokens[1])


def test_tokenizer_normalizes_per_tensor_with_zoo_statistics():
    models = _models(3)
    models = [{**m, "c.weight": torch.full((2, 3, 4), 0.5)} for m in models]     # constant over the zoo
    tok = WeightChunker.fit(models, chunk=8)
    for i, name in enumerate(tok.names):
        values = torch.stack([m[name] for m in models]).double()
        assert tok.mean[i] == pytest.approx(float(values.mean()), rel=1e-9)
        want = float(values.std(unbiased=False)) if name != "c.weight" else 1.0
        assert tok.std[i] == pytest.approx(want, rel=1e-9)
    tokens = tok.encode_many(models)[:, tok.mask()]
    assert float(tokens.mean()) == pytest.approx(0.0, abs=1e-5)


def test_tokenizer_refuses_mixed_architectures_and_empty_subsets():
    a = _models(1)[0]
    b = {**a, "a.weight": torch.zeros(5, 8)}
    with pytest.raises(InputError, match=r"mixed architectures.*'a.weight' has shape \[5, 7\] in m0 but "
                                         r"\[5, 8\] in m1"):
        WeightChunker.fit([a, b], labels=["m0", "m1"])
    c = {k: v for k, v in a.items() if k != "a.bias"}
    with pytest.raises(InputError, match="mixed architectures.*'a.bias' is in model 0 but not in model 1"):
        WeightChunker.fit([a, c])
    with pytest.raises(InputError, match="--subset 'head.*' matches no tensor"):
        WeightChunker.fit([a], include="head.*")
    with pytest.raises(InputError, match="empty zoo"):
        WeightChunker.fit([])
    tok = WeightChunker.fit([a], include="a.*")
    assert tok.names == ["a.weight", "a.bias"]
    with pytest.raises(InputError, match=r"tokens have shape \[3, 4\]"):
        tok.decode(torch.zeros(3, 4))
    with pytest.raises(InputError, match="another architecture"):
        tok.encode(b)


# ---------------------------------------------------------------- KDE

def test_bandwidth_rules():
    x = np.random.RandomState(0).randn(50, 3) * np.array([1.0, 2.0, 0.0])
    h = bandwidths(x, "scott")
    assert h[:2] == pytest.approx(1.06 * x[:, :2].std(axis=0, ddof=1) * 50 ** -0.2)
    assert h[2] == pytest.approx(1e-6)                                # no spread: tiny, positive
    s = bandwidths(x, "silverman")
    iqr = np.subtract(*np.percentile(x[:, 0], [75, 25]))
    assert s[0] == pytest.approx(0.9 * min(x[:, 0].std(ddof=1), iqr / 1.34) * 50 ** -0.2)
    assert list(bandwidths(x, 0.25)) == [0.25] * 3
    with pytest.raises(InputError, match="unknown rule"):
        bandwidths(x, "wide")


def test_independent_kde_sampler_fits_the_top_fraction_and_samples_inside_their_range():
    rng = np.random.RandomState(1)
    z = rng.randn(20, 6) * np.arange(1, 7)
    scores = rng.rand(20)
    kde = KDESampler(fraction=0.3, sampler="independent").fit(z, scores)
    assert kde.bandwidth == "scott"
    top = np.argsort(-scores)[:6]
    assert kde.anchors.shape == (6, 6) and np.allclose(np.sort(kde.anchors, 0), np.sort(z[top], 0))
    s = kde.sample(200, seed=3)
    assert s.shape == (200, 6) and s.dtype == torch.float32
    lo, hi = torch.from_numpy(z[top].min(0)).float(), torch.from_numpy(z[top].max(0)).float()
    assert bool(((s >= lo - 1e-6) & (s <= hi + 1e-6)).all())        # inside the anchors' (and zoo's) range
    assert bool((s.std(0) > 0).all())
    assert torch.equal(kde.sample(5, seed=3), kde.sample(5, seed=3))
    assert not torch.equal(kde.sample(5, seed=3), kde.sample(5, seed=4))
    assert KDESampler(fraction=0.01).fit(z, scores).anchors.shape[0] == 1
    with pytest.raises(InputError, match="one score per model"):
        kde.fit(z, scores[:3])
    with pytest.raises(InputError, match="fraction"):
        KDESampler(fraction=0.0)
    with pytest.raises(InputError, match="anchor, independent"):
        KDESampler(sampler="uniform")
    # the per-dimension draw is sklearn's KernelDensity.sample on one stream, dimension after
    # dimension, clipped to the anchors' range (our sampler before the authors' became the default)
    from sklearn.neighbors import KernelDensity

    stream = np.random.RandomState(7)
    cols = [KernelDensity(kernel="gaussian", bandwidth=float(h)).fit(kde.anchors[:, [d]])
            .sample(30, random_state=stream)[:, 0] for d, h in enumerate(kde.h)]
    old = np.clip(np.stack(cols, 1), kde.anchors.min(0), kde.anchors.max(0))
    assert torch.allclose(kde.sample(30, seed=7), torch.from_numpy(old).float(), atol=1e-6)


def test_anchor_kde_sampler_is_the_authors_loop_and_stays_next_to_one_anchor():
    """The hyper-representation authors' sampler (`sample` in ghrp/sampling_auxiliaries/
    sample_finetune_auxiliaries.py): for every latent dimension, KernelDensity(gaussian,
    bandwidth=0.002) fitted on the top 30 % and sampled with random_state=42. Our old sampler
    drew every dimension on its own with a wide bandwidth, so a sample mixed many anchors."""
    from sklearn.neighbors import KernelDensity

    rng = np.random.RandomState(1)
    z = rng.randn(20, 6) * np.arange(1, 7)
    scores = rng.rand(20)
    kde = KDESampler(fraction=0.3).fit(z, scores)
    assert kde.sampler == "anchor" and kde.bandwidth == 0.002 and list(kde.h) == [0.002] * 6
    # the top 30 % by score, in the zoo's order (the authors' z_full[idx_best])
    best = [i for i in range(20) if scores[i] >= np.sort(scores)[-6]]
    assert np.array_equal(kde.anchors, z[best])
    theirs = np.concatenate([KernelDensity(kernel="gaussian", bandwidth=0.002).fit(z[best][:, [d]])
                             .sample(n_samples=50, random_state=42) for d in range(6)], axis=1)
    ours = kde.sample(50, seed=42)
    assert torch.allclose(ours, torch.from_numpy(theirs).float(), atol=1e-6)
    # every sample is one anchor plus one offset, the same in every dimension, of the kernel's size
    off = ours.double().numpy()[:, None, :] - kde.anchors[None]          # (50, anchors, dims)
    own = np.abs(off).max(2).argmin(1)
    d = off[np.arange(50), own]
    assert np.allclose(d, d[:, :1], atol=1e-5) and 0 < np.abs(d).max() < 5 * 0.002
    assert len(set(own.tolist())) > 1                                    # different samples, anchors
    # the independent sampler's samples sit next to no anchor
    wide = KDESampler(fraction=0.3, sampler="independent").fit(z, scores).sample(50, seed=42).double().numpy()
    assert np.abs(wide[:, None, :] - kde.anchors[None]).max(2).min(1).min() > 10 * 0.002


# ---------------------------------------------------------------- VAE and D2NWG

def test_vae_reconstruction_keeps_accuracy(tiny_zoo, d2nwg):
    gen = load_generator(d2nwg)
    zoo = Zoo(tiny_zoo)
    rows = zoo.final_rows()
    spaces = [zoo.load(r) for r in rows]
    tokens = gen.chunker.encode_many(spaces)
    latents = gen.vae.encode_models(tokens)
    assert latents.shape == (12, gen.chunker.n_chunks * 16) == (12, 192)
    recon = gen.vae.decode_models(latents)
    assert recon.shape == tokens.shape
    before, after = [], []
    for r, s, t in zip(rows, spaces, recon):
        cfg = s.meta["config"]
        before.append(_accuracy(s.materialize(), cfg, r["dataset"]))
        after.append(_accuracy(gen.chunker.decode(t), cfg, r["dataset"]))
    diffs = [a - b for a, b in zip(after, before)]
    # measured: mean accuracy 0.723 -> 0.731; 10 of 12 models within 0.05 (9 within 0.02); the two
    # 3-epoch models of one seed and task that differ only in lr come out blurred together
    # (0.71 -> 0.91, 0.78 -> 0.60: worst ratio 0.77)
    assert sum(after) / 12 > sum(before) / 12 - 0.03
    assert sum(abs(d) < 0.05 for d in diffs) >= 9
    assert all(a >= 0.7 * b for a, b in zip(after, before))
    with pytest.raises(InputError, match="this VAE decodes"):
        gen.vae.decode_models(torch.zeros(2, 5))


def test_d2nwg_samples_are_zoo_checkpoints_that_work(tiny_zoo, d2nwg, tmp_path):
    meta = json.loads((d2nwg / "generator.json").read_text())
    assert meta["method"] == "d2nwg" and [t["dataset"] for t in meta["tasks"]] == [TASK_A, TASK_B]
    assert meta["tasks"][0]["classes"] == [0, 1, 2, 3, 4] and meta["diffusion"]["pca"]["components"] == 11
    assert sorted(p.name for p in d2nwg.iterdir()) == [
        "diffusion.safetensors", "encoder.safetensors", "generator.json", "latent_pca.safetensors",
        "vae.safetensors"]
    paths = sample(d2nwg, TASK_A, 6, tmp_path / "s", seed=0)
    assert [p.name for p in paths] == [f"sample-{i:03d}" for i in range(6)]
    like = Zoo(tiny_zoo).load(Zoo(tiny_zoo).final_rows()[0])
    from weightspace.zoo.bind import open_model

    for p in paths:
        space = load_space(p)
        assert {n: r.shape for n, r in space.items()} == {n: r.shape for n, r in like.items()}
        cfg = space.meta["config"]
        assert cfg["model_type"] == "weightspace-zoo" and cfg["arch"] == like.meta["config"]["arch"]
        assert cfg["input_shape"] == [1, 8, 8] and cfg["num_classes"] == 10 and cfg["dataset"] == TASK_A
        assert cfg["generated_by"]["method"] == "d2nwg" and cfg["generated_by"]["sampler"] == "ddpm"
        assert open_model(p).num_classes == 10
    again = sample(d2nwg, TASK_A, 6, tmp_path / "again", seed=0)          # seeded: the same models
    assert torch.equal(load_space(again[1])["head.weight"].load(), load_space(paths[1])["head.weight"].load())

    report = evaluate_samples(tmp_path / "s", TASK_A, zoo_dir=tiny_zoo, finetune_epochs=(0, 1))
    gen0, gen1 = report["generated"]["0"], report["generated"]["1"]
    rand0, rand1 = report["random_init"]["0"], report["random_init"]["1"]
    # measured (seed 0): zero-shot mean 0.72 (best 0.92) vs chance 0.20 and random init 0.15;
    # after 1 epoch mean 0.81 (best 0.94) vs random init 0.36; the zoo's own 3-epoch models: mean 0.62.
    # sampling seeds 1 and 2: zero-shot 0.42 / 0.46, after 1 epoch 0.68 / 0.71
    assert gen0["mean"] > report["chance"] + 0.15 and gen0["mean"] > rand0["mean"] + 0.15
    assert gen1["mean"] > rand1["mean"] + 0.15 and gen1["best"] > 0.8
    assert report["zoo"]["n"] == 6 and report["zoo"]["trained_epochs"] == [3]
    mem = report["memorization"]
    assert mem["zoo_models"] == 12 and len(mem["per_sample"]) == 6
    # measured: nearest-model distance median 0.47 (min 0.15) vs 0.37 between zoo neighbours and 0.03
    # between a model and its autoencoder copy; error consistency 0.83 (neighbours 0.46, copies 0.94)
    assert 0.05 < mem["distance"]["min"] <= mem["distance"]["median"] < 1.5
    assert mem["distance"]["min"] > 2 * mem["autoencoder_copy"]["distance_median"]
    assert -1 <= mem["consistency"]["median"] <= 1 and mem["zoo_reference"]["distance_median"] > 0


def test_d2nwg_trains_its_dataset_encoder_by_default(tiny_zoo, d2nwg, tmp_path):
    """The authors train the dataset encoder with the diffusion model (cond_stage_trainable: True);
    ours was a random map that stayed frozen. Now the default trains it; --encoder random does not."""
    from safetensors.torch import load_file

    from weightspace.zoo.gen.setenc import DatasetEncoder

    meta = json.loads((d2nwg / "generator.json").read_text())
    e = meta["encoder"]
    assert (e["training"], e["k"], e["support"]) == ("joint", 5, "fresh")
    assert (meta["diffusion"]["schedule"], meta["diffusion"]["timesteps"]) == ("sqrt_linear", 1024)
    start = DatasetEncoder(64, hidden=64, out_dim=32, seed=0).state_dict()
    trained = load_file(str(d2nwg / "encoder.safetensors"))
    moved = [k for k in start if not torch.equal(start[k], trained[k])]
    assert sorted(moved) == sorted(start)                        # every encoder tensor was trained

    frozen = train_generator(tiny_zoo, tmp_path / "random", encoder="random", diffusion_epochs=20,
                             vae_from=d2nwg, seed=0)
    kept = load_file(str(frozen / "encoder.safetensors"))
    assert all(torch.equal(start[k], kept[k]) for k in start)
    fm = json.loads((frozen / "generator.json").read_text())
    assert fm["encoder"]["training"] == "random" and fm["vae_from"] == str(d2nwg.resolve())
    # vae_from: the same autoencoder, not retrained
    assert all(torch.equal(a, b) for a, b in zip(load_file(str(d2nwg / "vae.safetensors")).values(),
                                                 load_file(str(frozen / "vae.safetensors")).values()))
    with pytest.raises(InputError, match="--vae-from .* trained on other models"):
        train_generator(tiny_zoo, tmp_path / "other", tasks=[TASK_A], vae_from=d2nwg, diffusion_epochs=2)
    with pytest.raises(SpecError, match="--encoder: must be one of joint, random"):
        train_generator(tiny_zoo, tmp_path / "x", encoder="frozen")


def test_error_consistency_written_out_and_the_jaccard_bound():
    """The old check read "error sets overlap little (Jaccard)" as "no copy"; but Jaccard is at most
    |smaller error set| / |larger one|, so a weak noisy copy of a strong model always looks new."""
    from weightspace.zoo.gen.evaluate import error_consistency

    n = 1000
    strong = torch.ones(n, dtype=torch.bool)
    strong[:50] = False                                          # 95 % right
    copy = strong.clone()
    copy[50:500] = False                                         # right only where `strong` is: 50 %
    errors_s, errors_c = ~strong, ~copy
    jaccard = float((errors_s & errors_c).sum() / (errors_s | errors_c).sum())
    assert jaccard == pytest.approx(50 / 500) and jaccard <= errors_s.sum() / errors_c.sum()
    r = error_consistency(copy, strong)
    a, b = 0.5, 0.95
    assert r["observed"] == pytest.approx(550 / n)               # both right 500, both wrong 50
    assert r["chance"] == pytest.approx(a * b + (1 - a) * (1 - b))
    assert r["most"] == pytest.approx(1 - abs(a - b))
    assert r["normalized"] == pytest.approx(1.0)                 # as alike as the accuracies allow
    # a 50 % model whose mistakes are independent of a 95 % model's: about 0 (the estimate is noisy
    # when the accuracies are far apart, c_max - c_exp = 0.05 here: hence 20,000 examples)
    g = torch.Generator().manual_seed(0)
    big = torch.rand(20000, generator=g) >= 0.05
    other = torch.rand(20000, generator=g) >= 0.5
    a2, b2 = float(other.double().mean()), float(big.double().mean())
    c = float((other == big).double().mean())
    c_exp = a2 * b2 + (1 - a2) * (1 - b2)
    r = error_consistency(other, big)
    assert r["normalized"] == pytest.approx((c - c_exp) / (1 - abs(a2 - b2) - c_exp)) and abs(r["normalized"]) < 0.15
    assert error_consistency(strong | True, strong | True)["normalized"] is None


def test_memorization_tells_autoencoder_copies_from_new_models(tiny_zoo, d2nwg, tmp_path):
    """The authors' KDE (bandwidth 0.002) returns the anchors through the autoencoder: its samples
    sit as close to a training model as that model's own reconstruction. The per-dimension sampler's
    do not."""
    near = train_generator(tiny_zoo, tmp_path / "anchor", method="kde", vae_from=d2nwg, seed=0)
    wide = train_generator(tiny_zoo, tmp_path / "wide", method="kde", kde_sampler="independent",
                           vae_from=d2nwg, seed=0)
    reports = {}
    for name, gen in (("anchor", near), ("wide", wide)):
        paths = sample(gen, TASK_A, 6, tmp_path / f"s-{name}", seed=0)
        reports[name] = evaluate_samples(paths, TASK_A, zoo_dir=tiny_zoo, finetune_epochs=(0,))["memorization"]
    m = reports["anchor"]
    assert m["reference"] == "the generator's training models" and m["zoo_models"] == 12
    copy, nbrs = m["autoencoder_copy"], m["zoo_reference"]
    assert copy["models"] == nbrs["models"] == 6
    # measured: distance 0.024 (autoencoder copies 0.031, zoo neighbours 0.37); consistency 0.91
    # (copies 0.94, neighbours 0.46)
    assert m["distance"]["median"] == pytest.approx(copy["distance_median"], rel=0.25)
    assert m["distance"]["median"] < 0.5 * nbrs["distance_median"]
    assert m["consistency"]["median"] > 0.9 and copy["consistency_median"] > 0.9
    assert {s["nearest_dataset"] for s in m["per_sample"]} == {TASK_A}
    w = reports["wide"]
    # measured: distance 0.32, consistency 0.74
    assert w["distance"]["median"] > 3 * copy["distance_median"]
    assert w["consistency"]["median"] < m["consistency"]["median"]


def test_kde_generator_per_task_subset_and_pooled_fallback(tiny_zoo, kde_head, tmp_path):
    meta = json.loads((kde_head / "generator.json").read_text())
    assert sorted(meta["generated_tensors"]) == ["head.bias", "head.weight"]
    assert sorted(meta["kept_tensors"]) == ["layers.0.bias", "layers.0.weight"]
    assert set(meta["kde"]["samplers"]) == {"pooled", "task.0", "task.1"}
    assert meta["kde"]["samplers"]["task.0"] == {**meta["kde"]["samplers"]["task.0"], "anchors": 2, "of": 6}
    zoo = Zoo(tiny_zoo)
    best = meta["kept_from"]["task.1"]
    best_space = zoo.load(next(r for r in zoo.final_rows() if r["model_id"] == best["model_id"]))
    paths = sample(kde_head, TASK_B, 4, tmp_path / "b", seed=1)
    heads, accs = [], []
    for p in paths:
        s = load_space(p)
        assert sorted(s) == ["head.bias", "head.weight", "layers.0.bias", "layers.0.weight"]
        assert torch.equal(s["layers.0.weight"].load(), best_space["layers.0.weight"].load())
        heads.append(s["head.weight"].load())
        assert s.meta["config"]["generated_by"]["sampler"] == "kde"
        accs.append(_accuracy(s.materialize(), s.meta["config"], TASK_B))
    assert not torch.equal(heads[0], heads[1])
    # measured 0.94, 0.21, 0.94, 0.94 (chance 0.20, the task's best model 0.94): the anchor sampler
    # puts every head next to one anchor's; three are next to the best model's own, which fits the
    # kept first layer, one next to the other anchor's, whose hidden units are other ones
    assert sum(a > 0.9 for a in accs) == 3 and min(accs) < 0.5
    notes = []
    sample(kde_head, "digits:rotate=90", 1, tmp_path / "r", note=notes.append)
    assert any("pooled KDE sampler" in n for n in notes)
    assert any("class set (0-9) was never trained on as one task" in n for n in notes)


def test_contrastive_encoder_and_all_checkpoints(tiny_zoo, tmp_path):
    path = train_generator(tiny_zoo, tmp_path / "g", checkpoints="all", vae_epochs=5, diffusion_epochs=5,
                           contrastive_epochs=4, seed=1)
    meta = json.loads((path / "generator.json").read_text())
    assert meta["settings"]["models"] == 24                    # epochs 1 and 3 of 12 models
    assert meta["encoder"]["contrastive_epochs"] == 4 and len(meta["history"]["contrastive_loss"]) == 2
    assert all(math.isfinite(v) for v in meta["history"]["contrastive_loss"])
    assert len(sample(path, TASK_B, 1, tmp_path / "s", seed=0)) == 1


# ---------------------------------------------------------------- errors

def test_errors_empty_zoo_mixed_architectures_unseen_classes(tiny_zoo, kde_head, tmp_path):
    empty = tmp_path / "empty"
    Zoo(empty, create=True)
    write_catalog(empty / "catalog.parquet", [])
    with pytest.raises(InputError, match="the zoo is empty"):
        train_generator(empty, tmp_path / "g0")
    with pytest.raises(InputError, match="not a zoo"):
        train_generator(tmp_path / "nowhere", tmp_path / "g0")
    with pytest.raises(InputError, match=r"--tasks 'digits': the zoo .* has no models trained on it"):
        train_generator(tiny_zoo, tmp_path / "g0", tasks=["digits"])
    with pytest.raises(SpecError, match="unknown method 'gan'"):
        train_generator(tiny_zoo, tmp_path / "g0", method="gan")
    with pytest.raises(SpecError, match="already exists"):
        train_generator(tiny_zoo, kde_head)

    mixed = tmp_path / "mixed"
    build_zoo(parse_zoo_spec("arch: {arch: mlp, depth: 1}\ntrain: {epochs: 1}\ngrid: {width: [4, 8]}\n"),
              mixed, workers=1, progress=False)
    with pytest.raises(InputError, match=r"mixed architectures for one generator: model \w+ is .*\"width\": \d.* "
                                         r"but model \w+ is .*\"width\": \d") as e:
        train_generator(mixed, tmp_path / "g1")
    assert '"width": 4' in str(e.value) and '"width": 8' in str(e.value)
    assert not (tmp_path / "g1").exists()

    gen = load_generator(kde_head)
    with pytest.raises(InputError, match=r"inputs have shape \[16\], but the generator makes models for "
                                         r"inputs of shape \[1, 8, 8\]"):
        check_data(gen, "teacher")
    gen.meta["tasks"] = [t for t in gen.meta["tasks"] if t["dataset"] == TASK_A]
    with pytest.raises(InputError, match=r"classes 5-9 were never seen by this generator; it was trained on "
                                         r"digits:classes=0-4 \(classes 0-4\)"):
        check_data(gen, TASK_B)
    gen.meta["num_classes"] = 5
    with pytest.raises(InputError, match="beyond the generated models' head of 5 classes"):
        check_data(gen, TASK_A)

    with pytest.raises(InputError, match="not a weight generator"):
        load_generator(tiny_zoo)
    broken = tmp_path / "broken"
    shutil.copytree(kde_head, broken)
    (broken / "vae.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(InputError, match="vae.safetensors: not a readable safetensors file"):
        load_generator(broken)
    with pytest.raises(SpecError, match="-n: must be a positive integer"):
        sample(kde_head, TASK_A, 0, tmp_path / "none")


# ---------------------------------------------------------------- CLI

def test_cli_train_sample_eval(tiny_zoo, tmp_path, run_cli, monkeypatch):
    gen, out = tmp_path / "gen", tmp_path / "samples"
    code, stdout, err = run_cli("generate", "train", tiny_zoo, "-o", gen, "--tasks", TASK_A,
                                "--epochs", "150,300", "--no-progress")
    assert code == 0, err
    assert "d2nwg generator for" in stdout and "6 checkpoints of 1 task(s)" in stdout
    assert "12 chunks of 64 -> latent 192" in stdout and "5 principal coordinates" in stdout
    code, _, err = run_cli("generate", "train", tiny_zoo, "-o", gen)
    assert code == 2 and "already exists" in err
    code, _, err = run_cli("generate", "train", tiny_zoo, "-o", tmp_path / "x", "--epochs", "1,2,3")
    assert code == 2 and "VAE[,DIFFUSION]" in err

    code, stdout, err = run_cli("generate", "sample", gen, "--data", TASK_A, "-n", "3", "-o", out)
    assert code == 0, err
    assert "3 models for digits:classes=0-4" in stdout and len(list(out.iterdir())) == 3
    code, _, err = run_cli("generate", "sample", gen, "--data", TASK_B, "-n", "2", "-o", tmp_path / "b")
    assert code == 1 and "classes 5-9 were never seen by this generator" in err
    code, _, err = run_cli("generate", "sample", gen, "--data", "teacher", "-n", "2", "-o", tmp_path / "t")
    assert code == 1 and "inputs have shape [16]" in err

    code, stdout, err = run_cli("generate", "eval", out, "--data", TASK_A, "--epochs", "0,1", "--json")
    assert code == 0, err
    report = json.loads(stdout)
    assert report["epochs"] == [0, 1] and report["generated"]["1"]["n"] == 3
    assert report["zoo_dir"] == str(tiny_zoo)                # found through generated_by
    code, stdout, err = run_cli("generate", "eval", out, "--data", TASK_A, "--zoo", tiny_zoo, "--epochs", "1")
    assert code == 0, err
    for text in ("generated", "random init", "zoo final (3 epochs, 6 models)",
                 "memorization vs 6 zoo models (the generator's training models)", "zoo neighbours (median)",
                 "autoencoder copy (median)", "consistency"):
        assert text in stdout
    code, _, err = run_cli("generate", "eval", out, "--data", TASK_A, "--epochs", "one")
    assert code == 2
    # a zoo that holds none of the generator's training models is named, not asked for again
    import weightspace.zoo.gen.evaluate as evaluate

    monkeypatch.setattr(evaluate, "_reference_rows", lambda zoo, generated_by: ([], "none"))
    code, stdout, err = run_cli("generate", "eval", out, "--data", TASK_A, "--zoo", tiny_zoo, "--epochs", "0")
    assert code == 0, err
    assert f"memorization: the zoo at {tiny_zoo} holds none of the models the generator learned from" in stdout
    assert "pass --zoo" not in stdout
    code, stdout, _ = run_cli("generate", "--help")
    assert code == 0 and "wsmerge generate sample" in stdout
