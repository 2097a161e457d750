"""merge_state_dicts / merge_tensors: mergekit 0.1.5's Python API shape, our spec validation."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from weightspace import merge_state_dicts, merge_tensors
from weightspace.errors import SpecError


@pytest.fixture
def three():
    g = torch.Generator().manual_seed(0)
    base = {"layers.0.weight": torch.randn(6, 4, generator=g), "layers.1.weight": torch.randn(6, 4, generator=g),
            "head.weight": torch.randn(3, 6, generator=g), "pos_ids": torch.arange(5)}
    ft = [{k: v + (0.1 * torch.randn(v.shape, generator=g) if v.is_floating_point() else 0)
           for k, v in base.items()} for _ in range(2)]
    return base, *ft


def test_task_arithmetic_and_ties_on_state_dicts_match_the_formulas(three):
    base, a, b = three
    got = merge_state_dicts([base, a, b], "task_arithmetic", base=0,
                            parameters={"weight": [9.0, 1.0, 0.5], "lambda": 0.8})
    for n, x in base.items():
        if not x.is_floating_point():
            assert torch.equal(got[n], x)  # integer buffers are copied from the base
            continue
        torch.testing.assert_close(got[n], x + 0.8 * ((a[n] - x) + 0.5 * (b[n] - x)))
    assert list(got) == list(base)
    # ids by mapping, per-input values by id; the base's own value is never used
    got2 = merge_state_dicts({"base": base, "a": a, "b": b}, "task_arithmetic", base="base",
                             parameters={"weight": {"a": 1.0, "b": 0.5}, "lambda": 0.8})
    assert all(torch.equal(got[n], got2[n]) for n in got)


def test_modules_merge_by_their_state_dict_and_merge_tensors_merges_one(three):
    torch.manual_seed(0)
    m1, m2 = nn.Linear(4, 3), nn.Linear(4, 3)
    got = merge_state_dicts([m1, m2], "linear", parameters={"weight": [0.25, 0.75]})
    torch.testing.assert_close(got["weight"], 0.25 * m1.weight.detach() + 0.75 * m2.weight.detach())
    x, y = torch.ones(5), torch.zeros(5)
    torch.testing.assert_close(merge_tensors([x, y], "linear", parameters={"weight": [1.0, 3.0]}),
                               torch.full((5,), 0.25))
    out = merge_tensors([x, y], "slerp", base_index=0, parameters={"t": 0.5}, out_dtype=torch.float16)
    assert out.dtype == torch.float16


@pytest.mark.parametrize("call, message", [
    (lambda s: merge_state_dicts(s, "ties", base=0, parameters={"density": 1.5}),
     "merge_state_dicts: parameters.density: must be in [0, 1]; got 1.5"),
    (lambda s: merge_state_dicts(s, "ties", base=0, parameters={"density": [0.5, 2.0, 0.5]}),
     "models[1].parameters.density: must be in [0, 1]; got 2.0"),
    (lambda s: merge_state_dicts(s, "tiez", base=0), "unknown merge_method 'tiez'. Did you mean 'ties'?"),
    (lambda s: merge_state_dicts(s, "ties", base=7), "base 7 is not one of the models' ids"),
    (lambda s: merge_state_dicts(s, "ties", base=0, parameters={"weight": [1.0]}), "1 values for 3 models"),
    (lambda s: merge_state_dicts(s, "linear", parameters={"normalize": [True, False, True]}),
     "per-input values are for per-model parameters"),
    (lambda s: merge_state_dicts([s[0], {k: v for k, v in s[1].items() if k != "head.weight"}], "linear",
                                 parameters={"weight": 1.0}),
     "model 1 has no tensor 'head.weight'; pass strict=False"),
])
def test_bad_calls_are_spec_errors_naming_the_field(three, call, message):
    with pytest.raises(SpecError) as e:
        call(list(three))
    assert message in str(e.value)


def test_strict_false_merges_the_shared_names(three):
    base, a, _ = three
    got = merge_state_dicts([base, {k: v for k, v in a.items() if k != "head.weight"}], "linear",
                            parameters={"weight": 0.5}, strict=False)
    assert "head.weight" not in got and "layers.0.weight" in got
