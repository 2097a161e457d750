"""Merging models whose vocabularies differ: `tokenizer_source`, the `tokenizer:` block and
`chat_template`, with mergekit 0.1.5's semantics.

Three tiny Llamas with WordLevel tokenizers (written here as tokenizer.json) share 13 tokens:
- base: the 13 only (13 rows), no chat template;
- ft_a: + apple, pear and the special token <|im_start|> (16 rows), chat template CHAT_A;
- ft_b: + pear, kiwi, fig (16 rows), chat template CHAT_A as well.
Each test writes out, per model and per token, which input row the merge must see.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from weightspace import load_space
from weightspace.chat_templates import CHAT_TEMPLATES
from weightspace.merge import plan_merge
from weightspace.merges.linear import weighted_average
from weightspace.spec import load_spec
from weightspace.tokenizers import VocabRowsRef
from weightspace.zoo.tiny import write_tiny_llama

COMMON = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(10)]
WORDS = {"base": [], "ft_a": ["apple", "pear"], "ft_b": ["pear", "kiwi", "fig"]}
SPECIAL = {"base": [], "ft_a": ["<|im_start|>"], "ft_b": []}
CHAT_A = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
WEIGHTS = {"base": 0.5, "ft_a": 0.3, "ft_b": 0.2}
EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"


def write_tokenizer(d: Path, words: list[str], special: list[str] = (), template: str | None = None) -> None:
    """A WordLevel tokenizer.json (split on whitespace) and its tokenizer_config.json."""
    vocab = {w: i for i, w in enumerate(words)}
    added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True}
             for i, t in enumerate(["<unk>", "<s>", "</s>"] + list(special))]
    for a in added[3:]:
        a["id"] = len(words) + added.index(a) - 3
    tok = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
           "normalizer": None, "pre_tokenizer": {"type": "WhitespaceSplit"}, "post_processor": None,
           "decoder": None, "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}}
    (d / "tokenizer.json").write_text(json.dumps(tok, indent=1))
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "<unk>", "bos_token": "<s>",
           "eos_token": "</s>"}
    if template is not None:
        cfg["chat_template"] = template
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))


@pytest.fixture
def models(tmp_path: Path) -> Path:
    """tmp_path/models/{base,ft_a,ft_b}: the three models of the module docstring."""
    for seed, name in enumerate(["base", "ft_a", "ft_b"]):
        words = COMMON + WORDS[name]
        d = write_tiny_llama(tmp_path / "models" / name, seed=0, delta_seed=seed or None,
                             vocab=len(words) + len(SPECIAL[name]))
        write_tokenizer(d, words, SPECIAL[name], CHAT_A if name != "base" else None)
    return tmp_path / "models"


def vocab_of(d: Path) -> dict[str, int]:
    """token -> id of a tokenizer.json (its model vocabulary and its added tokens)."""
    tok = json.loads((d / "tokenizer.json").read_text())
    return {**tok["model"]["vocab"], **{a["content"]: a["id"] for a in tok["added_tokens"]}}


def rows_of(models: Path, name: str) -> dict[str, dict[str, torch.Tensor]]:
    """model -> token -> its own row of tensor `name`."""
    out = {}
    for m in WEIGHTS:
        t = load_file(str(models / m / "model.safetensors"))[name]
        out[m] = {tok: t[i] for tok, i in vocab_of(models / m).items()}
    return out


def spec_text(extra: str, models_: tuple[str, ...] = ("base", "ft_a", "ft_b"), base: str | None = "base",
              method: str = "linear") -> str:
    lines = [f"merge_method: {method}"] + ([f"base_model: models/{base}"] if base else []) + ["models:"]
    for m in models_:
        lines += [f"  - model: models/{m}", f"    parameters: {{weight: {WEIGHTS[m]}}}"]
    return "\n".join(lines) + "\n" + extra


def run(tmp_path: Path, run_cli, extra: str, **kw) -> tuple[int, str, str, Path]:
    spec = tmp_path / "spec.yaml"
    spec.write_text(spec_text(extra, **kw))
    out = tmp_path / "out"
    code, stdout, err = run_cli("run", spec, out)
    return code, stdout, err, out


def input_rows(tmp_path: Path, extra: str, tensor: str = EMBED, **kw) -> dict[str, torch.Tensor]:
    """model -> its `tensor` as the merge method sees it (the plan's input refs, loaded)."""
    spec = tmp_path / "spec.yaml"
    spec.write_text(spec_text(extra, **kw))
    plan = plan_merge(load_spec(spec), spec_dir=tmp_path)
    (step,) = [s for s in plan.steps if s.name == tensor]
    return {m.split("/")[-1]: r.load("cpu", torch.float32) for m, r in zip(step.info["models"], step.inputs)}


def expect(sources: dict[str, dict[str, object]], rows: dict, tokens: list[str],
           members: tuple[str, ...] = tuple(WEIGHTS)) -> dict[str, torch.Tensor]:
    """model -> the rows it must bring for `tokens`. A source is a model (its row of that token),
    ("mean", [models]), ("row", model, token) or "zero"; a model not listed uses its own row."""
    out = {}
    for m in members:
        got = []
        for t in tokens:
            how = sources.get(t, {}).get(m, m)
            if how == "zero":
                got.append(torch.zeros_like(rows["base"]["w0"]))
            elif isinstance(how, tuple) and how[0] == "mean":
                acc = torch.zeros_like(rows["base"]["w0"])
                for d in how[1]:
                    acc = acc + rows[d][t]
                got.append(acc / len(how[1]))
            elif isinstance(how, tuple):
                got.append(rows[how[1]][how[2]])
            else:
                got.append(rows[how][t])
        out[m] = torch.stack(got)
    return out


def linear(per_model: dict[str, torch.Tensor]) -> torch.Tensor:
    return weighted_average([per_model[m].clone() for m in WEIGHTS], [WEIGHTS[m] for m in WEIGHTS])


# What each model brings for the tokens it lacks (mergekit's rules): a token one model has comes
# from it; pear (ft_a and ft_b, not the base) is their mean; the base's own row where it has one.
UNION_SOURCES = {
    "apple": {"base": "ft_a", "ft_b": "ft_a"},
    "pear": {"base": ("mean", ["ft_a", "ft_b"])},
    "kiwi": {"base": "ft_b", "ft_a": "ft_b"},
    "fig": {"base": "ft_b", "ft_a": "ft_b"},
    "<|im_start|>": {"base": "ft_a", "ft_b": "ft_a"},
}
UNION_ORDER = COMMON + ["apple", "pear", "kiwi", "fig", "<|im_start|>"]

# ---------------------------------------------------------------- union


@pytest.mark.requires("hf")
def test_union_builds_the_vocabulary_remaps_every_models_rows_and_writes_a_loadable_tokenizer(
        models, tmp_path, run_cli):
    code, _, err, out = run(tmp_path, run_cli, "tokenizer_source: union\nchat_template: auto\n")
    assert code == 0, err
    # the base's ids, then each model's new tokens in its own order; the special token last,
    # special as in ft_a
    tok = json.loads((out / "tokenizer.json").read_text())
    assert vocab_of(out) == {t: i for i, t in enumerate(UNION_ORDER)}
    added = {a["content"]: a for a in tok["added_tokens"]}
    assert added["<|im_start|>"]["special"] and not added["kiwi"]["special"]
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 18
    assert (out / "chat_template.jinja").read_text() == CHAT_A.strip()   # auto: the most common
    assert "chat_template" not in json.loads((out / "tokenizer_config.json").read_text())

    merged = load_file(str(out / "model.safetensors"))
    for name in (EMBED, HEAD):
        rows = rows_of(models, name)
        want = expect(UNION_SOURCES, rows, UNION_ORDER)
        assert merged[name].shape == (18, 32)
        torch.testing.assert_close(merged[name], linear(want), rtol=0, atol=1e-7)
    # every other tensor is the plain weighted average
    ins = {m: load_file(str(models / m / "model.safetensors")) for m in WEIGHTS}
    n = "model.layers.1.mlp.up_proj.weight"
    torch.testing.assert_close(merged[n], linear({m: ins[m][n] for m in WEIGHTS}), rtol=0, atol=1e-7)

    from transformers import AutoTokenizer, LlamaForCausalLM

    t = AutoTokenizer.from_pretrained(str(out))
    assert t("w1 apple kiwi <|im_start|> pear").input_ids == [4, 13, 15, 17, 14]
    text = t.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert text == "user: hi\n"
    model = LlamaForCausalLM.from_pretrained(str(out))
    assert model.get_input_embeddings().weight.shape == (18, 32)


@pytest.mark.requires("hf")
def test_each_model_sees_its_rows_in_the_union_order(models, tmp_path):
    rows = rows_of(models, EMBED)
    got = input_rows(tmp_path, "tokenizer_source: union\n")
    want = expect(UNION_SOURCES, rows, UNION_ORDER)
    for m in WEIGHTS:
        assert torch.equal(got[m], want[m]), m


@pytest.mark.requires("hf")
def test_without_a_base_the_first_model_leads_and_a_shared_token_is_averaged(models, tmp_path):
    # no base_model: ft_a's vocabulary comes first; pear (ft_a and ft_b) is the mean for nobody
    # (both have it), kiwi/fig come from ft_b and apple from ft_a
    got = input_rows(tmp_path, "tokenizer_source: union\n", models_=("ft_a", "ft_b"), base=None)
    vocab = COMMON + ["apple", "pear", "<|im_start|>", "kiwi", "fig"]
    rows = rows_of(models, EMBED)
    want = expect({"kiwi": {"ft_a": "ft_b"}, "fig": {"ft_a": "ft_b"},
                   "apple": {"ft_b": "ft_a"}, "<|im_start|>": {"ft_b": "ft_a"}}, rows, vocab,
                  members=("ft_a", "ft_b"))
    for m in ("ft_a", "ft_b"):
        assert torch.equal(got[m], want[m]), m


@pytest.mark.requires("hf")
def test_a_token_two_models_have_besides_the_base_is_taken_from_the_base(models, tmp_path):
    # base + ft_a + ft_b all have w3; give the base a token ft_b also has (kiwi): the model that
    # lacks it (ft_a) takes the base's row, not the mean of base and ft_b
    words = COMMON + ["kiwi"]
    write_tiny_llama(models / "base", seed=0, vocab=len(words))
    write_tokenizer(models / "base", words)
    rows = rows_of(models, EMBED)
    got = input_rows(tmp_path, "tokenizer_source: union\n")
    kiwi = vocab_of(tmp_path / "models" / "base")["kiwi"]
    assert torch.equal(got["ft_a"][kiwi], rows["base"]["kiwi"])
    assert torch.equal(got["ft_b"][kiwi], rows["ft_b"]["kiwi"])


# ---------------------------------------------------------------- base and a model


@pytest.mark.requires("hf")
def test_base_source_with_larger_vocabularies_remaps_instead_of_failing_on_shapes(models, tmp_path,
                                                                                   run_cli):
    code, _, err, out = run(tmp_path, run_cli, "tokenizer_source: base\n")
    assert code == 0, err
    # the base's tokenizer, unchanged: its files as they are
    for f in ("tokenizer.json", "tokenizer_config.json"):
        assert (out / f).read_bytes() == (models / "base" / f).read_bytes()
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 13
    merged = load_file(str(out / "model.safetensors"))
    for name in (EMBED, HEAD):
        want = expect({}, rows_of(models, name), COMMON)
        torch.testing.assert_close(merged[name], linear(want), rtol=0, atol=1e-7)


def test_without_tokenizer_source_differing_vocabularies_are_refused_with_the_fix(models, tmp_path,
                                                                                  run_cli):
    code, _, err, out = run(tmp_path, run_cli, "")
    assert code == 1
    assert "does not match" in err and "the vocabularies differ? tokenizer_source: union" in err, err
    assert not out.exists()


@pytest.mark.requires("hf")
def test_a_model_as_source_gives_its_vocabulary(models, tmp_path, run_cli):
    code, _, err, out = run(tmp_path, run_cli, "tokenizer_source: models/ft_b\n")
    assert code == 0, err
    order = COMMON + ["pear", "kiwi", "fig"]
    assert vocab_of(out) == {t: i for i, t in enumerate(order)}
    assert (out / "tokenizer.json").read_bytes() == (models / "ft_b" / "tokenizer.json").read_bytes()
    rows = rows_of(models, EMBED)
    want = expect({"pear": {"base": ("mean", ["ft_a", "ft_b"])}, "kiwi": {"base": "ft_b", "ft_a": "ft_b"},
                   "fig": {"base": "ft_b", "ft_a": "ft_b"}}, rows, order)
    merged = load_file(str(out / "model.safetensors"))
    torch.testing.assert_close(merged[EMBED], linear(want), rtol=0, atol=1e-7)


@pytest.mark.requires("hf")
def test_identical_vocabularies_keep_their_tensors_streaming_in_row_blocks(models, tmp_path):
    # every model with the base's tokenizer and rows: nothing is re-ordered
    for m in ("ft_a", "ft_b"):
        write_tiny_llama(models / m, seed=0, delta_seed=1, vocab=13)
        write_tokenizer(models / m, COMMON)
    spec = tmp_path / "spec.yaml"
    spec.write_text(spec_text("tokenizer_source: union\n"))
    plan = plan_merge(load_spec(spec), spec_dir=tmp_path)
    assert not any(isinstance(r, VocabRowsRef) for s in plan.steps for r in s.inputs)
    assert plan.vocabulary.tokenizer is None  # the base's files, copied as they are


# ---------------------------------------------------------------- padding and token overrides


@pytest.mark.requires("hf")
def test_pad_to_multiple_of_pads_each_model_with_its_mean_row(models, tmp_path, run_cli):
    code, _, err, out = run(tmp_path, run_cli, "tokenizer:\n  source: union\n  pad_to_multiple_of: 8\n")
    assert code == 0, err
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 24
    assert len(vocab_of(out)) == 18
    rows = rows_of(models, EMBED)
    want = expect(UNION_SOURCES, rows, UNION_ORDER)
    padded = {m: torch.cat([w, w.mean(0).expand(6, -1)]) for m, w in want.items()}
    merged = load_file(str(out / "model.safetensors"))
    assert merged[EMBED].shape == (24, 32)
    torch.testing.assert_close(merged[EMBED], linear(padded), rtol=0, atol=1e-7)


@pytest.mark.requires("hf")
def test_token_overrides_zero_force_a_model_and_another_models_token(models, tmp_path, run_cli):
    extra = """\
tokenizer:
  source: union
  tokens:
    "<|im_start|>":
      source: {kind: zero}
    pear:
      source: models/ft_b
      force: true
    apple:
      source: {kind: zero}
      force: true
    "[NEW]":
      source: {kind: model_token, model: models/ft_a, token: apple}
"""
    code, _, err, out = run(tmp_path, run_cli, extra)
    assert code == 0, err
    order = UNION_ORDER + ["[NEW]"]   # a token named in `tokens` joins the vocabulary
    assert vocab_of(out) == {t: i for i, t in enumerate(order)}
    sources = {**UNION_SOURCES,
               "<|im_start|>": {"base": "zero", "ft_b": "zero"},            # ft_a keeps its own
               "pear": {m: "ft_b" for m in WEIGHTS},                         # forced: ft_a too
               "apple": {m: "zero" for m in WEIGHTS},
               "[NEW]": {m: ("row", "ft_a", "apple") for m in WEIGHTS}}
    rows = rows_of(models, EMBED)
    merged = load_file(str(out / "model.safetensors"))
    torch.testing.assert_close(merged[EMBED], linear(expect(sources, rows, order)), rtol=0, atol=1e-7)
    got = input_rows(tmp_path, extra)
    want = expect(sources, rows, order)
    for m in WEIGHTS:
        assert torch.equal(got[m], want[m]), m


@pytest.mark.requires("hf")
def test_a_new_token_in_no_model_gets_zero_rows_with_a_note(models, tmp_path, run_cli):
    code, _, err, out = run(tmp_path, run_cli, "tokenizer:\n  source: base\n  tokens:\n    '<tool>': {}\n")
    assert code == 0, err
    assert "note: 1 token(s) of the output vocabulary are in none of the models merged into " \
           "'model.embed_tokens.weight' ('<tool>'); their rows there are zeros" in err, err
    v = vocab_of(out)
    assert v["<tool>"] == 13
    merged = load_file(str(out / "model.safetensors"))
    assert torch.equal(merged[EMBED][13], torch.zeros(32))


# ---------------------------------------------------------------- tied embeddings, companions


def _tie(d: Path) -> None:
    """Drop lm_head and mark the config tied, as a tied checkpoint is saved."""
    t = load_file(str(d / "model.safetensors"))
    del t[HEAD]
    save_file(t, str(d / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((d / "config.json").read_text())
    cfg["tie_word_embeddings"] = True
    (d / "config.json").write_text(json.dumps(cfg))


@pytest.mark.requires("hf")
def test_tied_embeddings_remap_the_one_tensor_and_load_tied(models, tmp_path, run_cli):
    for m in WEIGHTS:
        _tie(models / m)
    code, _, err, out = run(tmp_path, run_cli, "tokenizer_source: union\n")
    assert code == 0, err
    merged = load_file(str(out / "model.safetensors"))
    assert HEAD not in merged
    torch.testing.assert_close(merged[EMBED], linear(expect(UNION_SOURCES, rows_of(models, EMBED),
                                                            UNION_ORDER)), rtol=0, atol=1e-7)
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(str(out))
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert model.lm_head.weight.shape == (18, 32)


@pytest.mark.requires("hf")
def test_fisher_companions_are_reordered_with_their_tensor(models, tmp_path, run_cli):
    # Fisher diagonals with the model's shapes: a token only ft_a has merges to ft_a's row
    for seed, m in enumerate(WEIGHTS):
        g = torch.Generator().manual_seed(seed)
        ws = load_space(models / m)
        save_file({n: torch.rand(ws[n].shape, generator=g) + 0.1 for n in ws}, str(models / f"{m}.fisher.safetensors"))
    spec = tmp_path / "spec.yaml"
    spec.write_text("merge_method: fisher\nmodels:\n" + "".join(
        f"  - model: models/{m}\n    parameters: {{weight: 1.0, fisher: models/{m}.fisher.safetensors}}\n"
        for m in WEIGHTS) + "tokenizer_source: union\n")
    code, _, err = run_cli("run", spec, tmp_path / "out")
    assert code == 0, err
    merged = load_file(str(tmp_path / "out" / "model.safetensors"))
    rows = rows_of(models, EMBED)
    torch.testing.assert_close(merged[EMBED][UNION_ORDER.index("kiwi")], rows["ft_b"]["kiwi"],
                               rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(merged[EMBED][UNION_ORDER.index("apple")], rows["ft_a"]["apple"],
                               rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------- chat templates


@pytest.mark.requires("hf")
def test_a_named_chat_template_is_written_where_transformers_reads_it(models, tmp_path, run_cli):
    code, _, err, out = run(tmp_path, run_cli, "tokenizer_source: union\nchat_template: chatml\n")
    assert code == 0, err
    assert (out / "chat_template.jinja").read_text() == CHAT_TEMPLATES["chatml"]
    from transformers import AutoTokenizer

    t = AutoTokenizer.from_pretrained(str(out))
    text = t.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                 add_generation_prompt=True)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.requires("hf")
def test_an_inline_chat_template_without_a_tokenizer_source_rewrites_the_copied_tokenizer(
        models, tmp_path, run_cli):
    # every model with the base's vocabulary, so no tokenizer_source is needed
    for m in ("ft_a", "ft_b"):
        write_tiny_llama(models / m, seed=0, delta_seed=1, vocab=13)
        write_tokenizer(models / m, COMMON)
    inline = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{% endfor %}"
    code, _, err, out = run(tmp_path, run_cli, f"chat_template: \"{inline}\"\n")
    assert code == 0, err
    assert (out / "chat_template.jinja").read_text() == inline
    assert vocab_of(out) == vocab_of(models / "base")
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 13
    from transformers import AutoTokenizer

    t = AutoTokenizer.from_pretrained(str(out))
    assert t.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == "[user] hi"


# ---------------------------------------------------------------- errors, before any tensor is read


SPEC_ERRORS = [  # found by validating the spec: no tokenizer is read, no extra is needed
    ("tokenizer:\n  tokens:\n    pear:\n      source: models/nope\n",
     r"tokenizer\.tokens\.pear\.source \(line 13\): token 'pear' takes its row from 'models/nope', "
     r"which is not a model of this merge \(models: models/base, models/ft_a, models/ft_b\)"),
    ("chat_template: chatmel\n",
     r"chat_template \(line 10\): unknown chat template 'chatmel' \(did you mean 'chatml'\?\); use auto, "
     r"one of alpaca, chatml, exaone, llama3, mistral"),
    ("chat_template: \"{{ x }}\"\n", r"chat_template \(line 10\): not a chat template"),
    ("chat_template: \"{% for m in messages %}{{ m }}\"\n",
     r"chat_template \(line 10\): the inline chat template is not valid Jinja"),
    ("tokenizer_source: union\ntokenizer: {source: base}\n",
     r"tokenizer \(line 11\): give tokenizer_source or a tokenizer: block"),
    ("tokenizer:\n  pad_to_multiple_of: 0\n",
     r"tokenizer\.pad_to_multiple_of \(line 11\): must be a positive integer"),
    ("tokenizer:\n  tokens:\n    x: {source: {kind: one}}\n",
     r"tokenizer\.tokens\.x\.source \(line 12\): use a model, \{kind: zero\}"),
    ("tokenizer:\n  tokens:\n    '[PAD]': {sorce: models/ft_a}\n",
     r"tokenizer\.tokens\.\[PAD\]\.sorce \(line 12\): unknown key 'sorce'; did you mean 'source'\?"),
]
VOCAB_ERRORS = [  # found reading the models' vocabularies
    ("tokenizer:\n  tokens:\n    x:\n      source: {kind: model_token, model: models/ft_b, token: apple}\n",
     r"tokenizer\.tokens\.x\.source \(line 13\): token 'apple' is not in model 'models/ft_b''s vocabulary"),
    ("tokenizer:\n  tokens:\n    apple:\n      source: models/ft_b\n      force: true\n",
     r"tokenizer\.tokens\.apple\.source \(line 13\): token 'apple' is not in model 'models/ft_b''s "
     r"vocabulary"),
    ("tokenizer:\n  tokens:\n    x:\n      source: {kind: model_token, model: models/ft_b, token_id: 99}\n",
     r"tokenizer\.tokens\.x\.source \(line 13\): row 99 is outside model 'models/ft_b''s vocabulary of "
     r"16 rows"),
]


def _refused(models, tmp_path, run_cli, monkeypatch, extra, code, message):
    import re

    import weightspace.ir as ir

    monkeypatch.setattr(ir, "read_tensor", lambda *a: pytest.fail("a tensor was read"))
    got, _, err, out = run(tmp_path, run_cli, extra)
    assert got == code, err
    assert re.search(message, err), err
    assert "Traceback" not in err and not out.exists()


@pytest.mark.parametrize("extra, message", SPEC_ERRORS)
def test_spec_errors_name_the_field_line_token_and_model(models, tmp_path, run_cli, monkeypatch,
                                                          extra, message):
    _refused(models, tmp_path, run_cli, monkeypatch, extra, 2, message)


@pytest.mark.requires("hf")
@pytest.mark.parametrize("extra, message", VOCAB_ERRORS)
def test_token_errors_name_the_field_line_token_and_model(models, tmp_path, run_cli, monkeypatch,
                                                           extra, message):
    _refused(models, tmp_path, run_cli, monkeypatch, extra, 2, message)


@pytest.mark.requires("hf")
def test_a_tokenizer_source_without_tokenizer_files_is_refused_naming_it(models, tmp_path, run_cli):
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (models / "base" / f).unlink()
    code, _, err, out = run(tmp_path, run_cli, "tokenizer_source: union\n")
    assert code == 1
    assert "tokenizer_source (line 10): model 'models/base' has no tokenizer files (looked for " \
           "tokenizer.json, tokenizer.model" in err, err
    assert not out.exists()


@pytest.mark.requires("hf")
def test_a_model_without_tokenizer_files_and_other_rows_is_refused(models, tmp_path, run_cli):
    (models / "ft_b" / "tokenizer.json").unlink()
    code, _, err, _ = run(tmp_path, run_cli, "tokenizer_source: union\n")
    assert code == 1
    assert "model 'models/ft_b' has no tokenizer files" in err and "16 embedding rows" in err, err


@pytest.mark.requires("hf")
def test_a_model_without_tokenizer_files_but_the_bases_rows_takes_the_bases_vocabulary(
        models, tmp_path, run_cli):
    write_tiny_llama(models / "ft_b", seed=0, delta_seed=2, vocab=13)  # (no tokenizer files)
    code, _, err, out = run(tmp_path, run_cli, "tokenizer_source: union\n")
    assert code == 0, err
    assert "note: model 'models/ft_b' has no tokenizer files; taking it to have the vocabulary of " \
           "'models/base'" in err
    assert vocab_of(out) == {t: i for i, t in enumerate(COMMON + ["apple", "pear", "<|im_start|>"])}


def test_without_the_hf_extra_the_tokenizer_step_says_what_to_install(models, tmp_path, run_cli,
                                                                       monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    code, _, err, out = run(tmp_path, run_cli, "tokenizer_source: union\n")
    assert code == 1
    assert "tokenizer_source (line 10): building the output tokenizer needs transformers: " \
           "pip install 'weightspace[hf]'" in err, err


# ---------------------------------------------------------------- bounded memory


@pytest.mark.requires("hf")
def test_a_reordered_tensor_reads_itself_and_only_the_donor_rows_of_the_others(models, tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text(spec_text("tokenizer_source: union\n"))
    plan = plan_merge(load_spec(spec), spec_dir=tmp_path)
    (step,) = [s for s in plan.steps if s.name == EMBED]
    row = 32 * 4
    base_ref = step.inputs[0]
    assert isinstance(base_ref, VocabRowsRef)
    # the base's own 13 rows, then donor rows: apple, <|im_start|> from ft_a (2 runs or one),
    # pear from ft_a and ft_b, kiwi and fig from ft_b
    own = 13 * row
    donors = sum(leaf.nbytes for leaf in base_ref.leaves()[1:])
    assert donors <= 6 * row and sum(leaf.nbytes for leaf in base_ref.leaves()) == own + donors


@pytest.mark.requires("hf")
def test_a_tokenizer_directory_without_weights_can_be_the_source(models, tmp_path, run_cli):
    d = models / "tok_only"
    d.mkdir()
    write_tokenizer(d, COMMON + ["kiwi"])
    code, _, err, out = run(tmp_path, run_cli, "tokenizer_source: models/tok_only\n")
    assert code == 0, err
    assert vocab_of(out) == {t: i for i, t in enumerate(COMMON + ["kiwi"])}
    rows = rows_of(models, EMBED)
    want = expect({"kiwi": {"base": "ft_b", "ft_a": "ft_b"}}, rows, COMMON + ["kiwi"])
    merged = load_file(str(out / "model.safetensors"))
    torch.testing.assert_close(merged[EMBED], linear(want), rtol=0, atol=1e-7)


@pytest.mark.requires("hf")
def test_slices_take_embeddings_from_the_first_slice_and_the_head_from_the_last(models, tmp_path,
                                                                              run_cli):
    # as in mergekit, a vocabulary tensor combines the models of its slice only: the embeddings
    # come from the base (which lacks ft_a's new tokens: zeros), lm_head from ft_a
    spec = tmp_path / "spec.yaml"
    spec.write_text("merge_method: passthrough\nslices:\n"
                    "  - sources:\n      - {model: models/base, layer_range: [0, 1]}\n"
                    "  - sources:\n      - {model: models/ft_a, layer_range: [1, 2]}\n"
                    "tokenizer_source: union\n")
    code, _, err = run_cli("run", spec, tmp_path / "out")
    assert code == 0, err
    order = COMMON + ["apple", "pear", "<|im_start|>"]
    assert vocab_of(tmp_path / "out") == {t: i for i, t in enumerate(order)}
    assert "note: 3 token(s) of the output vocabulary are in none of the models merged into " \
           "'model.embed_tokens.weight' ('apple', 'pear', '<|im_start|>')" in err
    assert "lm_head.weight" not in err
    merged = load_file(str(tmp_path / "out" / "model.safetensors"))
    emb, head = rows_of(models, EMBED), rows_of(models, HEAD)
    zero = torch.zeros(32)
    want_emb = torch.stack([emb["base"][t] if t in emb["base"] else zero for t in order])
    want_head = torch.stack([head["ft_a"][t] for t in order])
    assert torch.equal(merged[EMBED], want_emb) and torch.equal(merged[HEAD], want_head)


@pytest.mark.requires("hf")
@pytest.mark.parametrize("extra", [
    "tokenizer_source: union\n",
    "tokenizer:\n  source: union\n  pad_to_multiple_of: 8\n  tokens:\n    pear: {source: models/ft_b, force: true}\n",
])
def test_row_blocks_of_a_reordered_tensor_give_the_whole_tensor(models, tmp_path, run_cli,
                                                                monkeypatch, extra):
    import weightspace.tensor_steps as wm  # the block sizes the planner reads

    code, _, err, whole = run(tmp_path, run_cli, extra)
    assert code == 0, err
    monkeypatch.setattr(wm, "BLOCK_BYTES", 1000)  # 18 (24) rows of 32 fp32 -> blocks of 7 rows
    spec = tmp_path / "spec.yaml"
    plan = plan_merge(load_spec(spec), spec_dir=tmp_path)
    blocks = [s for s in plan.steps if s.name == EMBED]
    assert len(blocks) >= 3 and all(isinstance(r, VocabRowsRef) for s in blocks for r in s.inputs)
    # a block of token rows reads those rows and the donor rows it needs, not whole tensors (one
    # with padding rows reads every token row: they are the mean of them)
    token_blocks = [s for s in blocks if s.info["rows"][1] <= len(UNION_ORDER)]
    assert token_blocks and all(s.read_bytes < 3 * 13 * 32 * 4 for s in token_blocks)
    code, _, err = run_cli("run", spec, tmp_path / "blocked")
    assert code == 0, err
    a = load_file(str(whole / "model.safetensors"))
    b = load_file(str(tmp_path / "blocked" / "model.safetensors"))
    assert all(torch.equal(a[n], b[n]) for n in a)


def _bpe(d: Path) -> None:
    """A byte-free BPE tokenizer of 5 tokens whose last merge builds "abc"."""
    tok = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": [],
           "normalizer": None, "pre_tokenizer": {"type": "WhitespaceSplit"}, "post_processor": None,
           "decoder": None, "model": {"type": "BPE", "dropout": None, "unk_token": None,
                                      "continuing_subword_prefix": None, "end_of_word_suffix": None,
                                      "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                                      "vocab": {"a": 0, "b": 1, "c": 2, "ab": 3, "abc": 4},
                                      "merges": [["a", "b"], ["ab", "c"]]}}
    (d / "tokenizer.json").write_text(json.dumps(tok))
    (d / "tokenizer_config.json").write_text('{"tokenizer_class": "PreTrainedTokenizerFast"}')


@pytest.mark.requires("hf")
def test_tokens_past_the_bases_vocab_size_are_dropped_with_the_merges_that_make_them(tmp_path, run_cli):
    # config vocab_size 4, tokenizer 5 tokens: "abc" (id 4) has no embedding row. mergekit drops
    # it but keeps the merge "ab c" that makes it, and the tokenizer no longer loads
    for seed, m in enumerate(["base", "ft_a"]):
        _bpe(write_tiny_llama(tmp_path / "models" / m, seed=0, delta_seed=seed or None, vocab=4))
    spec = tmp_path / "spec.yaml"
    spec.write_text(spec_text("tokenizer_source: base\n", models_=("base", "ft_a")))
    code, _, err = run_cli("run", spec, tmp_path / "out")
    assert code == 0, err
    out = json.loads((tmp_path / "out" / "tokenizer.json").read_text())["model"]
    assert out["vocab"] == {"a": 0, "b": 1, "c": 2, "ab": 3}
    assert [list(m) if isinstance(m, list) else m.split() for m in out["merges"]] == [["a", "b"]]
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(str(tmp_path / "out")).tokenize("abc") == ["ab", "c"]
    merged = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert merged[EMBED].shape == (4, 32)


@pytest.mark.requires("hf")
def test_the_word_level_tokenizer_gives_specials_then_the_words_in_order(tmp_path):
    import transformers

    from weightspace.tokenizers.word_level import write_word_tokenizer

    write_word_tokenizer(tmp_path, ["apple", "pear"])
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    assert tok("pear apple kiwi", add_special_tokens=False)["input_ids"] == [4, 3, 0]
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    with pytest.raises(ValueError, match="repeat or name a special token"):
        write_word_tokenizer(tmp_path, ["apple", "apple"])
