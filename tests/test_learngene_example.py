"""The README's learngene miniature, pinned on one seed and one depth (slow: about a minute).

Seed 1, depth 6, the settings of `python examples/learngene_digits.py` (genes trained with
preset="authors", descendants at the lr chosen on seed 0), so the numbers are those of
benchmarks/results/learngene_digits.json, runs[1], curves at depth "6". Measured there:

    test accuracy after epoch          0      1      5
    random                           0.117  0.633  0.783
    tleg                             0.553  0.758  0.767
    random + tleg's stem/norm/head   0.161  0.694  0.806
    sws                              0.478  0.725  0.758
    random + sws's stem/norm/head    0.086  0.703  0.792
    tleg fitted                      0.772  0.783  0.808
    identity + teacher's stem/...    0.703  0.775  0.808

and the fit's relative residual 0.596 (0.582 for the teacher's own initialization).
The assertions keep margins of a few test examples (1/360 each) to a few percent.
"""

from __future__ import annotations

import pytest
from _examples import committed_results, load_example

pytestmark = pytest.mark.slow

INITS = ("random", "tleg", "random + tleg's stem/norm/head", "sws", "random + sws's stem/norm/head",
         "tleg fitted", "identity + teacher's stem/norm/head")


def test_learngene_miniature_seed_1(tmp_path):
    mod = load_example("learngene_digits")
    committed = committed_results("learngene_digits")
    lrs = committed["summary"]["lr_choice"]["lr"]
    assert lrs == {"random": 0.003, "tleg": 0.001, "random + tleg's stem/norm/head": 0.003, "sws": 0.001,
                   "random + sws's stem/norm/head": 0.003, "tleg fitted": 0.01,
                   "random + teacher's stem/norm/head": 0.003, "identity + teacher's stem/norm/head": 0.003}
    r = mod.learngene_digits(tmp_path, 1, depths=(6,), lrs=lrs, inits=INITS)
    acc = {name: r["curves"][name][6] for name in INITS}

    # the run is the committed one
    want = committed["runs"][1]["curves"]
    for name in INITS:
        assert acc[name] == pytest.approx(want[name]["6"], abs=0.02), name

    # the authors' recipe trains the genes well away from chance (training accuracy of the aux nets)
    for g in ("tleg", "sws"):
        assert r["genes"][g]["acc_end"] > 0.8, g
    # before any training, the trained genes' lead is their layers': random blocks with the
    # same stem/norm/head are near chance
    for g in ("tleg", "sws"):
        assert acc[g][0] > acc["random"][0] + 0.3, g
        assert acc[f"random + {g}'s stem/norm/head"][0] < 0.25, g
    # after one epoch the genes lead random init and their like-for-like controls
    for g in ("tleg", "sws"):
        assert acc[g][1] > acc["random"][1] + 0.05, g
        assert acc[g][1] > acc[f"random + {g}'s stem/norm/head"][1] + 0.01, g
    # after five epochs they do not: the control is ahead (the claim does not hold this long here)
    for g in ("tleg", "sws"):
        assert acc[g][5] < acc[f"random + {g}'s stem/norm/head"][5], g
    # the fitted gene's zero-shot score is mostly its carried-over non-layer tensors
    assert acc["identity + teacher's stem/norm/head"][0] > 0.6
    assert acc["tleg fitted"][0] - acc["identity + teacher's stem/norm/head"][0] < 0.15
    # ... and the fit is far from exact: the teacher is about as non-linear in depth as its init
    fit = r["genes"]["tleg fitted"]
    assert 0.5 < fit["relative_residual"] < 0.7
    assert abs(fit["relative_residual"] - fit["relative_residual_at_init"]) < 0.05
