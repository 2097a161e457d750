"""Bundled datasets: splits, task families, corruptions, the teacher task, references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import norm

from weightspace.errors import SpecError
from weightspace.zoo.data import (
    BASES,
    CORRUPTIONS,
    OPS,
    SEVERITY,
    SPLIT_SEED,
    Split,
    TaskData,
    _digits_arrays,
    _stratified_split,
    corrupt,
    describe,
    load_task,
    teacher,
)

SPLITS = ("train", "val", "test")


def _all(task: TaskData) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.cat([task.split(s).x for s in SPLITS]), torch.cat([task.split(s).y for s in SPLITS]))


def _same(a: TaskData, b: TaskData) -> bool:
    return all(torch.equal(a.split(s).x, b.split(s).x) and torch.equal(a.split(s).y, b.split(s).y)
               for s in SPLITS)


@pytest.fixture(scope="module")
def digits() -> TaskData:
    return load_task("digits")


# ---------------------------------------------------------------- splits

def test_digits_splits_sum_disjoint_stratified(digits):
    _, y = _digits_arrays()
    idx = _stratified_split(y, SPLIT_SEED)
    assert sum(len(i) for i in idx) == 1797 == len(digits.train) + len(digits.val) + len(digits.test)
    assert [len(i) for i in idx] == [len(digits.train), len(digits.val), len(digits.test)]
    assert len(np.unique(np.concatenate(idx))) == 1797  # disjoint and covering
    assert torch.equal(digits.train.y, torch.from_numpy(y[idx[0]]))
    for c in range(10):
        n_c = int((y == c).sum())
        for part, frac in zip(idx, (0.6, 0.2, 0.2), strict=True):
            assert abs(int((y[part] == c).sum()) - frac * n_c) <= 1
    # a seeded shuffle, not the first 60% of each class
    assert not all(idx[0][y[idx[0]] == c].max() < idx[1][y[idx[1]] == c].min() for c in range(10))
    assert digits.train.x.dtype == torch.float32 and digits.train.y.dtype == torch.int64
    assert digits.train.x.shape[1:] == (1, 8, 8) and digits.input_shape == (1, 8, 8)
    assert 0 <= digits.train.x.min() and digits.train.x.max() <= 1


def test_digits_deterministic(digits):
    assert _same(digits, load_task("digits"))


# ---------------------------------------------------------------- task families

def test_rotate_four_times_is_identity_and_matches_rot90(digits):
    assert _same(load_task("digits:rotate=90:rotate=90:rotate=90:rotate=90"), digits)
    x = digits.test.x
    r90 = load_task("digits:rotate=90").test.x
    written = torch.empty_like(x)
    for i in range(8):
        for j in range(8):
            written[..., i, j] = x[..., j, 7 - i]  # counter-clockwise
    assert torch.equal(r90, written)
    assert torch.equal(r90, torch.rot90(x, 1, dims=(-2, -1)))
    assert torch.equal(load_task("digits:rotate=180").test.x, x.flip(-1).flip(-2))
    assert torch.equal(load_task("digits:rotate=270").test.x, torch.rot90(x, 3, dims=(-2, -1)))
    assert torch.equal(load_task("digits:rotate=90").test.y, digits.test.y)


def test_rotate_non_square_updates_input_shape():
    x = torch.arange(2 * 1 * 3 * 5, dtype=torch.float32).reshape(2, 1, 3, 5)
    s = Split(x, torch.zeros(2, dtype=torch.int64))
    out = OPS["rotate"](TaskData("t", s, s, s, 2, (1, 3, 5)), "90")
    assert out.input_shape == (1, 5, 3) == tuple(out.train.x.shape[1:])
    assert out.name == "t:rotate=90"


def test_flip(digits):
    assert torch.equal(load_task("digits:flip=h").train.x, digits.train.x.flip(-1))
    assert torch.equal(load_task("digits:flip=v").train.x, digits.train.x.flip(-2))


def test_permute_pixels_is_one_fixed_bijection(digits):
    task = load_task("digits:permute_pixels=3")
    for s in SPLITS:
        a, b = digits.split(s).x.flatten(1), task.split(s).x.flatten(1)
        assert torch.equal(a.sort(dim=1).values, b.sort(dim=1).values)
        assert torch.equal(task.split(s).y, digits.split(s).y)
    assert not torch.equal(task.train.x, digits.train.x)
    assert _same(task, load_task("digits:permute_pixels=3"))

    # positions as values recover the permutation: the same in every split, not the identity
    pos = torch.arange(64, dtype=torch.float32).reshape(1, 1, 8, 8)
    y = torch.zeros(1, dtype=torch.int64)
    probe = TaskData("p", Split(pos, y), Split(pos + 100, y), Split(pos + 200, y), 10, (1, 8, 8))
    out = OPS["permute_pixels"](probe, "3")
    perm = out.train.x.flatten().long()
    assert torch.equal(perm.sort().values, torch.arange(64))
    assert torch.equal(out.val.x.flatten().long() - 100, perm)
    assert torch.equal(out.test.x.flatten().long() - 200, perm)
    assert not torch.equal(perm, torch.arange(64))
    other = OPS["permute_pixels"](probe, "4").train.x.flatten().long()
    assert not torch.equal(other, perm)


def test_permute_labels_is_a_bijection(digits):
    task = load_task("digits:permute_labels=7")
    x0, y0 = _all(digits)
    x1, y1 = _all(task)
    assert torch.equal(x0, x1)
    mapping = {int(a): {int(b) for b in y1[y0 == a]} for a in y0.unique()}
    assert all(len(v) == 1 for v in mapping.values())  # a function, the same in every split
    images = sorted(next(iter(v)) for v in mapping.values())
    assert images == list(range(10))  # onto the same label set
    assert any(a != next(iter(v)) for a, v in mapping.items())


def test_ops_compose_left_to_right(digits):
    task = load_task("digits:classes=5-9:permute_labels=1")
    sub = load_task("digits:classes=5-9")
    perm = torch.from_numpy(np.random.default_rng(1).permutation(10))
    assert torch.equal(task.train.y, perm[sub.train.y])
    assert task.name == "digits:classes=5-9:permute_labels=1"
    assert task.num_classes == 10


# ---------------------------------------------------------------- corruptions

@pytest.mark.parametrize("name", CORRUPTIONS)
def test_corruption_ranges_labels_determinism_and_growth(digits, name):
    x = digits.train.x
    dist = []
    for s in range(1, 6):
        task = load_task(f"digits:corrupt={name}@{s}")
        for split in SPLITS:
            cx = task.split(split).x
            assert cx.shape == digits.split(split).x.shape and cx.dtype == torch.float32
            assert 0 <= cx.min() and cx.max() <= 1
            assert torch.equal(task.split(split).y, digits.split(split).y)
        assert _same(task, load_task(f"digits:corrupt={name}@{s}"))
        dist.append(float((task.train.x - x).abs().mean()))
    assert all(b >= a - 1e-3 for a, b in zip(dist, dist[1:], strict=False)), dist
    assert dist[4] > dist[0] + 0.05, dist
    assert dist[0] > 0


def test_corruption_defaults_and_alias():
    assert _same(load_task("digits:corrupt=blur"), load_task("digits:corrupt=blur@3"))
    assert _same(load_task("digits:corrupt=salt_and_pepper@2"), load_task("digits:corrupt=salt_pepper@2"))


@pytest.mark.parametrize("name", ["gaussian_noise", "shot_noise", "salt_pepper"])
def test_noise_is_seeded(name):
    x = torch.full((4, 1, 8, 8), 0.5)
    assert torch.equal(corrupt(x, name, 3, seed=1), corrupt(x, name, 3, seed=1))
    assert not torch.equal(corrupt(x, name, 3, seed=1), corrupt(x, name, 3, seed=2))
    # load_task seeds per split: the same images get different noise in train and test
    s = Split(x, torch.zeros(4, dtype=torch.int64))
    task = OPS["corrupt"](TaskData("t", s, s, s, 2, (1, 8, 8)), f"{name}@3")
    assert not torch.equal(task.train.x, task.test.x)


@pytest.mark.parametrize("severity", range(1, 6))
def test_gaussian_noise_std_matches_table(severity):
    sigma = SEVERITY["gaussian_noise"][severity - 1]
    x = torch.full((1000, 1, 8, 8), 0.5)
    std = float((corrupt(x, "gaussian_noise", severity, seed=0) - x).std())
    # clip(0.5 + sigma*Z, 0, 1): the std of a normal censored at +-0.5
    a = 0.5 / sigma
    censored = math.sqrt(sigma**2 * (2 * norm.cdf(a) - 1 - 2 * a * norm.pdf(a))
                         + 2 * 0.25 * norm.sf(a))
    assert std == pytest.approx(censored, rel=0.02)
    if severity <= 3:  # clipping is negligible: the table's sigma itself
        assert std == pytest.approx(sigma, rel=0.03)


def test_contrast_and_blur_formulas():
    x = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    m = x.mean(dim=(-2, -1), keepdim=True)
    assert torch.allclose(corrupt(x, "contrast", 5, 0), (x - m) * 0.05 + m)
    flat = torch.full((1, 1, 8, 8), 0.3)
    assert torch.allclose(corrupt(flat, "blur", 5, 0), flat)  # blur keeps constants
    assert torch.allclose(corrupt(flat, "pixelate", 5, 0), flat)
    assert float(corrupt(x, "blur", 5, 0).std()) < float(x.std())


# ---------------------------------------------------------------- teacher

def test_teacher_shapes_labels_determinism():
    task = load_task("teacher:dim=5:classes=3:n=300:seed=2")
    assert task.input_shape == (5,) and task.num_classes == 3
    x, y = _all(task)
    assert x.shape == (300, 5) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert int(y.min()) >= 0 and int(y.max()) < 3
    assert torch.bincount(y, minlength=3).min() >= 30  # no class starved
    assert abs(len(task.train) - 180) <= 3 and abs(len(task.test) - 60) <= 3
    assert _same(task, load_task("teacher:dim=5:classes=3:n=300:seed=2"))
    assert _same(task, teacher(dim=5, classes=3, n=300, seed=2))
    assert not _same(task, load_task("teacher:dim=5:classes=3:n=300:seed=3"))
    assert _same(load_task("teacher"), teacher(16, 4, 2000, 0.3, 0))


def test_teacher_difficulty_keeps_inputs_and_sets_label_noise():
    def by_input(task: TaskData) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = _all(task)  # splits are stratified by label, so put rows in one order
        order = x[:, 0].argsort()
        return x[order], y[order]

    (x0, y0), (x1, y1) = by_input(teacher(difficulty=0)), by_input(teacher(difficulty="1"))
    assert torch.equal(x0, x1)  # same inputs, only labels change
    # difficulty 1: half the labels moved to another class, on top of a harder teacher
    assert float((y0 != y1).float().mean()) > 0.5


def test_teacher_difficulty_makes_a_linear_student_worse():
    from sklearn.linear_model import LogisticRegression

    def accuracy(difficulty: float) -> float:
        task = teacher(difficulty=difficulty)
        model = LogisticRegression(max_iter=300).fit(task.train.x.numpy(), task.train.y.numpy())
        return float(model.score(task.test.x.numpy(), task.test.y.numpy()))

    easy, hard = accuracy(0.0), accuracy(1.0)
    assert easy > 0.9
    assert easy > hard + 0.3


def test_teacher_classes_option_then_transform():
    task = load_task("teacher:classes=4:n=400:classes=0-1")
    assert task.num_classes == 4
    assert set(_all(task)[1].tolist()) == {0, 1}
    assert load_task("teacher:n=400:classes=3").num_classes == 3
    # after a transform, classes is the subset transform
    sub = load_task("teacher:n=400:permute_labels=0:classes=2")
    assert sub.num_classes == 4 and set(_all(sub)[1].tolist()) == {2}


def test_teacher_takes_vector_transforms_only():
    task = load_task("teacher:n=100:dim=6:permute_pixels=1:permute_labels=2")
    base = load_task("teacher:n=100:dim=6")
    assert torch.equal(task.train.x.sort(dim=1).values, base.train.x.sort(dim=1).values)
    with pytest.raises(SpecError, match="rotate.*image"):
        load_task("teacher:rotate=90")
    with pytest.raises(SpecError, match="corrupt.*image"):
        load_task("teacher:corrupt=blur")


# ---------------------------------------------------------------- references and errors

@pytest.mark.parametrize(("ref", "fragment"), [
    ("digits:rotat=90", "'rotat'.*Did you mean 'rotate'.*Transforms: classes, rotate"),
    ("digits:dim=4", "'dim'.*Options of digits: none"),
    ("teacher:dimm=4", "'dimm'.*Did you mean 'dim'.*Options of teacher: dim, classes, n"),
    ("digits:rotate=45", "rotate.*'45'"),
    ("digits:flip=d", "flip.*'d'"),
    ("digits:permute_pixels=-1", "permute_pixels.*'-1'"),
    ("digits:permute_labels=x", "permute_labels.*'x'"),
    ("digits:corrupt=fog@3", "corrupt.*'fog'.*gaussian_noise"),
    ("digits:corrupt=blurr", "'blurr'.*Did you mean 'blur'"),
    ("digits:corrupt=blur@9", "corrupt.*severity.*'9'"),
    ("digits:corrupt=blur@", "corrupt.*severity"),
    ("teacher:classes=1", "teacher: classes must be >= 2"),
    ("teacher:dim=x", "teacher: dim must be an integer, got 'x'"),
    ("teacher:classes=0-1", "classes must be an integer.*teacher:classes=4:classes=0-1"),
    ("teacher:dim=0", "dim must be >= 1"),
    ("teacher:n=30", "n must be >= 40"),
    ("teacher:difficulty=1.5", "difficulty must be in \\[0, 1\\]"),
    ("teacher:difficulty=nan", "difficulty"),
    ("teacher:seed=1.5", "seed must be an integer"),
    ("teacher:dim=4:n=100:dim=5", "'dim' is given twice"),
    ("mnist", "unknown dataset 'mnist'"),
    ("digits:rotate", "'rotate' in 'digits:rotate' is not key=value"),
])
def test_bad_references(ref, fragment):
    with pytest.raises(SpecError, match=fragment) as e:
        load_task(ref)
    if ":" in ref:
        assert ref in str(e.value)  # the whole reference, once


def test_corrupt_function_validates():
    x = torch.zeros(1, 1, 8, 8)
    assert torch.equal(corrupt(x, "blur", np.int64(2), 0), corrupt(x, "blur", 2, 0))
    for bad in (0, 6, 2.0, True):
        with pytest.raises(SpecError, match="severity"):
            corrupt(x, "blur", bad, 0)
    with pytest.raises(SpecError, match="fog"):
        corrupt(x, "fog", 1, 0)
    with pytest.raises(SpecError, match="images"):
        corrupt(torch.zeros(4, 16), "gaussian_noise", 1, 0)


def test_describe_lists_everything():
    rows = describe()
    assert all(len(r) == 3 and all(isinstance(v, str) and v for v in r) for r in rows)
    by_kind: dict[str, list[str]] = {}
    for name, kind, _ in rows:
        by_kind.setdefault(kind, []).append(name)
    assert by_kind == {"dataset": list(BASES), "transform": list(OPS), "corruption": list(CORRUPTIONS)}
    assert "difficulty=0.3" in dict((r[0], r[2]) for r in rows)["teacher"]


def test_part_splits_train_into_disjoint_stratified_parts():
    full = load_task("digits")
    parts = [load_task(f"digits:part={k}/3") for k in (1, 2, 3)]
    assert sum(len(p.train) for p in parts) == len(full.train)
    rows = [set(map(tuple, p.train.x.flatten(1).tolist())) for p in parts]
    assert not (rows[0] & rows[1]) and not (rows[1] & rows[2])
    for p in parts:   # val/test untouched, every class present in each part
        assert torch.equal(p.test.x, full.test.x) and len(torch.unique(p.train.y)) == 10
    for bad in ("0/2", "3/2", "1/1", "a/b", "2"):
        with pytest.raises(SpecError, match="part: expected K/N"):
            load_task(f"digits:part={bad}")
