"""Robust weight signatures: the per-tensor report and layer selection."""

from __future__ import annotations

import pytest
import torch

from tests.signature_models import (
    _spaces,
    zoo_models_fixture,  # noqa: F401  (fixtures)
)
from weightspace.errors import SpecError
from weightspace.ir import WeightSpace
from weightspace.merges.signatures import (
    extract_signature,
    layer_report,
    layer_summary,
    robust_weight_signature,
    select_layers,
)
from weightspace.sources import load_space

# ---------------------------------------------------------------------------------------------
# the report


def test_layer_report_numbers_and_depths(zoo_models):
    pre, clean, robust = _spaces(zoo_models)
    rows = {r["name"]: r for r in layer_report(pre, clean, robust)}
    assert set(rows) == set(pre)
    name = "blocks.0.fc1.weight"
    p = pre[name].load().double()
    dc, ds = robust[name].load().double() - p, clean[name].load().double() - p
    r = rows[name]
    assert r["layer"] == 0 and r["position"] == 0.0 and r["depth"] == 0.0 and r["numel"] == p.numel()
    assert r["rel_change_robust"] == pytest.approx(float(dc.norm() / p.norm()), rel=1e-9)
    assert r["rel_change_clean"] == pytest.approx(float(ds.norm() / p.norm()), rel=1e-9)
    assert r["cos_robust_clean"] == pytest.approx(float((dc * ds).sum() / (dc.norm() * ds.norm())), abs=1e-9)
    rws_t = robust_weight_signature(dc, ds).double()
    assert r["rws_share"] == pytest.approx(float(rws_t.norm() / dc.norm()), rel=1e-6)
    # the stem sits before the stack, the head and final norm after it
    assert rows["stem.weight"]["position"] == -1.0 and rows["stem.weight"]["depth"] == 0.0
    assert rows["head.weight"]["position"] == 3.0 and rows["head.weight"]["layer"] is None
    assert rows["blocks.2.fc2.bias"]["position"] == 2.0 and rows["blocks.2.fc2.bias"]["depth"] == 1.0


def test_layer_report_skips_integer_buffers():
    t = {"layers.0.weight": torch.ones(2, 2), "layers.0.steps": torch.tensor([3])}
    ft = {"layers.0.weight": torch.full((2, 2), 1.1), "layers.0.steps": torch.tensor([3])}
    rows = layer_report(*(WeightSpace.from_tensors(x) for x in (t, ft, ft)))
    assert [r["name"] for r in rows] == ["layers.0.weight"]


# ---------------------------------------------------------------------------------------------
# layer selection


def _row(name, position, layer, rws_norm):
    return {"name": name, "position": position, "layer": layer, "rws_norm": rws_norm}


REPORT = [
    _row("embed.weight", -1.0, None, 1.0),            # rws^2 = 1
    _row("layers.0.w", 0.0, 0, 2.0),                  # 4
    _row("layers.0.b", 0.0, 0, 1.0),                  # 1
    _row("layers.1.w", 1.0, 1, 2.0),                  # 4
    _row("layers.2.w", 2.0, 2, 1.0),                  # 1
    _row("head.weight", 3.0, None, 3.0),              # 9   (total 20)
]


@pytest.mark.parametrize("spec, share, expected", [
    ("all", 0.5, [r["name"] for r in REPORT]),
    ("first:1", 0.5, ["embed.weight", "layers.0.w", "layers.0.b"]),
    ("first:2", 0.5, ["embed.weight", "layers.0.w", "layers.0.b", "layers.1.w"]),
    ("first:3", 0.5, ["embed.weight", "layers.0.w", "layers.0.b", "layers.1.w", "layers.2.w"]),
    ("layers.0.*", 0.5, ["layers.0.w", "layers.0.b"]),
    ("*.w", 0.5, ["layers.0.w", "layers.1.w", "layers.2.w"]),
    ("re:^layers\\.[12]\\.", 0.5, ["layers.1.w", "layers.2.w"]),
    # auto: cumulative rws^2 by depth: pre 1 (5%), +layer 0 -> 6 (30%), +layer 1 -> 10 (50%), ...
    ("auto", 0.05, ["embed.weight"]),
    ("auto", 0.3, ["embed.weight", "layers.0.w", "layers.0.b"]),
    ("auto", 0.31, ["embed.weight", "layers.0.w", "layers.0.b", "layers.1.w"]),
    ("auto", 0.5, ["embed.weight", "layers.0.w", "layers.0.b", "layers.1.w"]),
    ("auto", 0.51, ["embed.weight", "layers.0.w", "layers.0.b", "layers.1.w", "layers.2.w"]),
    ("auto", 1.0, [r["name"] for r in REPORT]),
])
def test_select_layers(spec, share, expected):
    assert select_layers(REPORT, spec, share) == expected


@pytest.mark.parametrize("spec, message", [
    ("first:0", "K in first:K"),
    ("first:x", "K in first:K"),
    ("first:4", "only 3 layers"),
    ("re:[", "not a valid regular expression"),
    ("frist:2", "selects no tensor"),
    ("", "empty layer selection"),
])
def test_select_layers_errors_name_the_spec(spec, message):
    with pytest.raises(SpecError, match=message) as e:
        select_layers(REPORT, spec)
    assert repr(spec) in str(e.value) or spec == ""


def test_select_layers_refuses_first_k_without_a_stack_and_a_zero_signature():
    flat = [_row("conv.weight", 0.0, None, 1.0), _row("fc.weight", 0.0, None, 1.0)]
    with pytest.raises(SpecError, match="no layer stack"):
        select_layers(flat, "first:1")
    zero = [dict(r, rws_norm=0.0) for r in REPORT]
    with pytest.raises(SpecError, match="zero everywhere"):
        select_layers(zero, "auto")
    with pytest.raises(SpecError, match="share"):
        select_layers(REPORT, "auto", share=0.0)


def test_auto_keeps_the_shallow_layers_of_a_shallow_robust_change(zoo_models):
    sig = extract_signature(*_spaces(zoo_models), layers="auto", share=0.5)
    assert sig.kept == [n for n in load_space(zoo_models["pre"]) if n.startswith(("stem.", "blocks.0."))]
    summary = layer_summary(sig.meta["report"], sig.kept)
    assert [u["label"] for u in summary] == ["pre", "layer 0", "layer 1", "layer 2", "post"]
    assert [u["kept"] for u in summary] == ["all", "all", "none", "none", "none"]
    assert sum(u["rws_fraction"] for u in summary) == pytest.approx(1.0, rel=1e-4)
