"""The README's aTLAS miniature, pinned on seed 0 (about 40 s: run with -m slow)."""

from __future__ import annotations

import pytest
from _examples import load_example


@pytest.mark.slow
def test_atlas_miniature_claims(tmp_path):
    """Seed 0 as measured (benchmarks/results/atlas_digits.json, mean test accuracy of the five
    tasks): task addition, task arithmetic 0.506, aTLAS 0.436 at the authors' 20 epochs and
    0.612 at 300; few-shot, task arithmetic of the other four 0.453, aTLAS 0.527-0.547 for
    k = 1..16 (best epoch on val); test-time, zero-shot 0.361, UFM 0.389 (best epoch on val),
    entropy's last epoch 0.313. Margins about half the measured gaps."""
    import torch

    torch.set_num_threads(1)
    r = load_example("atlas_digits").run_seed(tmp_path, 0)
    ta = {x["method"]: x["avg"] for x in r["task_addition"]}
    assert ta["aTLAS, 300 epochs (4500 steps)"] > ta["task arithmetic"] + 0.05
    # the authors' 20 epochs are too few here (README): below the long run
    assert ta["aTLAS, the authors' 20 epochs (300 steps)"] < ta["aTLAS, 300 epochs (4500 steps)"] - 0.08
    fs = {x["method"]: x["avg"] for x in r["few_shot"]}
    other_four = fs["task arithmetic of the other four (lambda on val)"]
    for k in (1, 4, 16):
        assert fs[f"aTLAS k={k} (best epoch on val)"] > other_four + 0.04
        assert fs[f"aTLAS k={k} (last epoch)"] > fs["zero-shot (base)"] + 0.08
    tt = {x["method"]: x for x in r["test_time"]}
    zero_shot = tt["zero-shot (base)"]["avg"]
    assert tt["UFM (best epoch on val)"]["avg"] > zero_shot + 0.01
    assert tt["entropy (last epoch)"]["avg"] < zero_shot - 0.02
    # every UFM step had a loss (trusted examples); pseudo-labels at 0.9 take none on some targets
    assert all(n == 300 for n in tt["UFM (best epoch on val)"]["steps_taken"])
    assert min(tt["pseudo-label p>=0.9, re-computed (best epoch on val)"]["steps_taken"]) == 0
