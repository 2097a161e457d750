"""Hostile specs, YAML and command-line values (issue 17): each is refused with one line that
names the file, field or option and says what is wrong, exit 2, and nothing is written.

One section per class of the issue; each mechanism lives in one place:
- weightspace/yaml_io.py, the one YAML reader: duplicate keys, alias bombs, nesting, size, UTF-8;
- weightspace/spec.py `_check_text`: text fields bounded (they are recorded in the output);
- weightspace/spec.py `_nonfinite` and Param.coerce: numbers a float cannot hold;
- weightspace/paths.py `expand_user`: `~user` paths;
- weightspace/zoo/search.py `parse_search` / `with_value`: --search values and their count;
- weightspace/zoo/spec.py `ZooSpec.runs`: the size of a zoo grid.
Fixtures are written here; nothing is downloaded.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from _error_helpers import assert_nothing_written, linear_spec, out_fixture, single_error_line  # noqa: F401

from weightspace.errors import SpecError
from weightspace.spec import parse_spec
from weightspace.zoo.spec import parse_zoo_spec

ZOO = "name: z\ndataset: digits\narch: {arch: mlp, depth: 1}\ntrain: {epochs: 1}\n"


def refused(run_cli, *args: str) -> str:
    """Run wsmerge, expect a spec error (exit 2) in one line; return that line."""
    code, _, err = run_cli(*args)
    assert code == 2, err
    single_error_line(err)
    assert err.count("\n") == 1, err  # one line
    for raw in ("Error:", "Traceback", "pydantic", "errors.pydantic.dev"):
        assert raw not in err.replace("error: ", "", 1), err
    return err


# ---------------------------------------------------------------- duplicate keys (class 7)


def test_duplicate_key_in_a_merge_spec_is_refused_naming_key_and_both_lines(tiny_models, run_cli,
                                                                           write_spec, out):
    spec = write_spec("merge_method: ties\n" + linear_spec(tiny_models.ft_a, tiny_models.ft_b))
    err = refused(run_cli, "run", spec, out)
    assert f"{spec}: key 'merge_method' is given twice (lines 1 and 2); keep one" in err
    assert_nothing_written(out)


def test_duplicate_key_in_a_nested_mapping_of_a_zoo_spec(run_cli, write_spec, tmp_path):
    spec = write_spec(ZOO + "grid:\n  seed: [0, 1]\n  width: [4]\n  seed: [2]\n", name="zoo.yaml")
    err = refused(run_cli, "zoo", "build", spec, "-o", tmp_path / "zoo", "--dry-run")
    assert "zoo.yaml: key 'seed' is given twice (lines 6 and 8)" in err
    assert not (tmp_path / "zoo").exists()


def test_duplicate_key_in_a_later_document_of_a_multi_stage_spec(tiny_models, run_cli, write_spec, out):
    stage = f"name: first\n{linear_spec(tiny_models.ft_a, tiny_models.ft_b)}"            # lines 1-7
    final = "merge_method: slerp\n" + linear_spec(Path("first"), tiny_models.ft_b)        # from line 9
    spec = write_spec(f"{stage}---\n{final}", name="stages.yaml")
    err = refused(run_cli, "run", spec, out)
    assert "stages.yaml: key 'merge_method' is given twice (lines 9 and 10)" in err
    assert_nothing_written(out)


def test_a_merge_key_may_still_be_overridden():
    # `<<: *defaults` then an explicit key is YAML's override, not a duplicate
    spec = parse_spec("merge_method: ties\nbase_model: b\nmodels:\n"
                      "  - model: a\n    parameters: &d {weight: 1.0, density: 0.5}\n"
                      "  - model: c\n    parameters: {<<: *d, density: 0.3}\n")
    assert spec.models[1].parameters == {"weight": 1.0, "density": 0.3}


# ---------------------------------------------------------------- alias bombs, nesting, size (class 6, 12)


def _bomb(levels: int = 40) -> str:
    """A grid axis whose values double in size at each alias level (2^40 entries written out);
    its values all differ, so the grid's duplicate check walks (repr) all of them."""
    lines = ["grid:", "  seed: &l0 [0, 1]"]
    lines += [f"  l{i}: &l{i} [*l{i - 1}, [*l{i - 1}]]" for i in range(1, levels)]
    return ZOO + "\n".join(lines) + "\n"


def test_an_alias_bomb_in_a_zoo_grid_fails_fast(run_cli, write_spec, tmp_path):
    spec = write_spec(_bomb(), name="bomb.yaml")
    start = time.perf_counter()
    with pytest.raises(SpecError, match=r"bomb\.yaml: line \d+: the document grows past 8,388,608 values "
                                        r"and characters by alias \*l\d+; aliases may not multiply"):
        parse_zoo_spec(spec.read_text(), source=str(spec))
    assert time.perf_counter() - start < 2
    err = refused(run_cli, "zoo", "build", spec, "-o", tmp_path / "zoo", "--dry-run")
    assert "bomb.yaml: line" in err


def test_an_alias_bomb_in_a_merge_spec_and_a_self_containing_alias():
    bomb = _bomb().replace(ZOO, "merge_method: linear\nmodels: [{model: a, parameters: {weight: 1}}]\n")
    with pytest.raises(SpecError, match=r"<spec>: line \d+: the document grows past"):
        parse_spec(bomb)
    with pytest.raises(SpecError, match=r"<spec>: line 1: alias \*a is inside its own anchor"):
        parse_spec("merge_method: &a [*a]\n")


def test_deeply_nested_yaml_is_refused_naming_the_file_and_line(run_cli, write_spec, out):
    spec = write_spec("merge_method: linear\nmodels: " + "[" * 5000 + "]" * 5000 + "\n")
    err = refused(run_cli, "run", spec, out)
    assert f"{spec}: line 2: nested more than 100 levels deep" in err
    assert "RecursionError" not in err


def test_a_spec_file_is_read_up_to_a_bound(run_cli, write_spec, out, monkeypatch):
    import weightspace.yaml_io

    monkeypatch.setattr(weightspace.yaml_io, "MAX_BYTES", 1024)
    spec = write_spec("merge_method: linear\nname: " + "x" * 2000 + "\n")
    err = refused(run_cli, "run", spec, out)
    assert f"{spec}: spec is larger than" in err
    assert "x" * 20 not in err  # no file contents echoed


def test_not_utf8_names_the_file_byte_and_line(run_cli, tmp_path, out):
    spec = tmp_path / "latin1.yaml"
    spec.write_bytes("merge_method: linear\nname: caf\xe9\n".encode("latin-1"))
    err = refused(run_cli, "run", spec, out)
    assert f"{spec}: spec is not UTF-8 text (byte 30, line 2" in err
    assert "UnicodeDecodeError" not in err


def test_bad_yaml_syntax_is_one_line_with_its_line(run_cli, write_spec, out):
    spec = write_spec("merge_method: linear\nmodels: [a\nname: x\n")
    err = refused(run_cli, "run", spec, out)
    assert f"{spec}: not valid YAML: line " in err


def test_a_command_line_yaml_value_goes_through_the_same_reader(run_cli, tmp_path):
    err = refused(run_cli, "zoo", "find", tmp_path, "width=" + "[" * 500)
    assert "'width=[[[" in err and "nested more than 100 levels deep" in err


# ---------------------------------------------------------------- text bounded (class 7)


def test_a_huge_name_is_refused_before_anything_is_written(tiny_models, run_cli, write_spec, out):
    spec = write_spec(linear_spec(tiny_models.ft_a, tiny_models.ft_b) + "name: " + "n" * 100_000 + "\n")
    err = refused(run_cli, "run", spec, out)
    assert (f"{spec}: name (line 7): 100,000 characters of text; a spec field holds at most 65,536 "
            f"(64 KiB)") in err
    assert "nnnnnnnnnn" not in err
    assert_nothing_written(out)


def test_any_long_text_field_is_named():
    text = "merge_method: linear\nmodels:\n  - model: a\n    parameters: {weight: [{filter: F, value: 1}]}\n"
    with pytest.raises(SpecError, match=r"models\[0\]\.parameters\.weight\[0\]\.filter \(line 4\): 70,000 "):
        parse_spec(text.replace("F", "f" * 70_000))


# ---------------------------------------------------------------- numbers (class 12)


def test_a_400_digit_weight_is_a_spec_error(tiny_models, run_cli, write_spec, out):
    spec = write_spec(linear_spec(tiny_models.ft_a, tiny_models.ft_b, weights=[int("1" + "0" * 400), 1]))
    err = refused(run_cli, "run", spec, out)
    assert "models[0].parameters (line 4): weight must be a finite number, got an integer of about 401 digits" \
        in err
    assert "OverflowError" not in err
    assert_nothing_written(out)


def test_an_integer_too_long_for_python_is_a_spec_error(tiny_models, run_cli, write_spec, out):
    spec = write_spec(linear_spec(tiny_models.ft_a, tiny_models.ft_b, weights=["9" * 5000, 1]))
    err = refused(run_cli, "run", spec, out)
    assert f"{spec}: line 4: an integer of 5,000 characters is too long to read" in err


# ---------------------------------------------------------------- density never clamped (class 7)


@pytest.mark.parametrize("method", ["ties", "dare_ties", "breadcrumbs", "della"])
@pytest.mark.parametrize("form, value, field", [
    ("spec value", "{d}", "density"),
    ("gradient", "[0.5, {d}]", r"density[1]"),
    ("filter", "[{{filter: mlp, value: {d}}}, {{value: 0.5}}]", "density[0].value"),
])
@pytest.mark.parametrize("density", [-1, 2])
def test_density_outside_0_1_is_refused_before_any_model_is_opened(run_cli, write_spec, out, method,
                                                                    form, value, field, density):
    extra = ", epsilon: 0.1" if method == "della" else ""
    setting = value.format(d=density)
    spec = write_spec(f"merge_method: {method}\nbase_model: nowhere/base\nmodels:\n"
                      f"  - model: nowhere/a\n    parameters: {{weight: 1, density: {setting}{extra}}}\n"
                      f"  - model: nowhere/b\n    parameters: {{weight: 1}}\n")
    err = refused(run_cli, "run", spec, out)
    assert f"{spec}: models[0].parameters.{field} (line 5): must be in [0, 1]; got {float(density)}" in err


def test_search_values_are_range_checked_before_the_first_merge(tiny_models, run_cli, write_spec, out,
                                                               monkeypatch):
    import weightspace.merge

    def no_merge(*a, **k):
        raise AssertionError("a candidate was merged before every value was checked")

    monkeypatch.setattr(weightspace.merge, "run_plan", no_merge)
    spec = write_spec(f"merge_method: ties\nbase_model: {tiny_models.base}\n"
                      + linear_spec(tiny_models.ft_a, tiny_models.ft_b).split("\n", 1)[1])
    err = refused(run_cli, "run", spec, out, "--search", "density=0.5,2", "--data", "digits")
    assert f"--search density=2: {spec}: parameters.density: must be in [0, 1]; got 2.0" in err


# ---------------------------------------------------------------- --search values (class 6, 12)


@pytest.mark.parametrize("values, message", [
    ("weight=0:1:1000000000", "--search weight: 1,000,000,000 values; it tries at most 1,000"),
    ("weight=" + ",".join(["0.5"] * 1001), "--search weight: 1,001 values; it tries at most 1,000"),
    ("weight=nan,1", "--search weight: nan is not a finite number"),
    ("weight=0:inf:3", "--search weight: inf is not a finite number"),
])
def test_search_values_are_bounded_and_finite(tiny_models, run_cli, write_spec, out, values, message):
    spec = write_spec(linear_spec(tiny_models.ft_a, tiny_models.ft_b))
    start = time.perf_counter()
    err = refused(run_cli, "run", spec, out, "--search", values, "--data", "digits")
    assert time.perf_counter() - start < 2
    assert message in err
    assert_nothing_written(out)


def test_a_value_set_in_code_is_validated_like_a_spec_file():
    from weightspace.zoo.search import with_value

    spec = parse_spec("merge_method: linear\nmodels: [{model: a, parameters: {weight: 1}}]\n")
    with pytest.raises(SpecError, match=r"^--search weight=nan: invalid merge spec: models\[0\]\.parameters: "
                                        r"weight must be a finite number, got nan$"):
        with_value(spec, "weight", float("nan"))


# ---------------------------------------------------------------- paths (class 12)


def test_a_home_of_no_user_names_the_field(tiny_models, run_cli, write_spec, out):
    spec = write_spec(linear_spec(Path("~no_such_user_wsmerge/m"), tiny_models.ft_b))
    err = refused(run_cli, "run", spec, out)
    assert (f"{spec}: models[0].model (line 3): '~no_such_user_wsmerge/m': cannot expand "
            f"'~no_such_user_wsmerge': no such user") in err
    assert "RuntimeError" not in err and "home directory." not in err


# ---------------------------------------------------------------- zoo grid size (class 6)


def test_a_zoo_grid_too_large_to_make_is_refused_by_its_count(run_cli, write_spec, tmp_path):
    axes = "".join(f"  {a}: [{', '.join(str(i + 1) for i in range(20))}]\n"
                   for a in ("seed", "width", "batch_size", "epochs", "lr"))
    spec = write_spec(ZOO + "grid:\n" + axes, name="big.yaml")
    start = time.perf_counter()
    err = refused(run_cli, "zoo", "build", spec, "-o", tmp_path / "zoo", "--dry-run")
    assert time.perf_counter() - start < 2
    assert "big.yaml: grid: 3,200,000 models (20 seed x 20 width x 20 batch_size x 20 epochs x 20 lr) is " \
           "more than the 100,000 one zoo may hold" in err


# ---------------------------------------------------------------- a model card's front matter


def test_a_card_front_matter_goes_through_the_same_reader(tmp_path):
    from weightspace.errors import InputError
    from weightspace.hub import _check_card

    card = tmp_path / "README.md"
    card.write_text("---\nlibrary_name: transformers\nlibrary_name: evil\n---\n# a card\n")
    with pytest.raises(InputError, match=r"README\.md: front matter: key 'library_name' is given twice"):
        _check_card(card)
