"""Log-likelihoods from a causal LM, batched, the way lm-evaluation-harness computes them.

    scorer = CausalLMScorer(model, tokenizer, batch_size=8, max_length=2048)
    scorer.perplexity(["one document", "another"])          # {"perplexity", "bits_per_byte", ...}
    scorer.multiple_choice([Question(...)])                 # {"acc", "acc_norm", "acc_bytes"}

Conventions (lm_eval/models/huggingface.py, HFLM, and lm_eval/utils.py):
- Text is encoded without special tokens (no BOS added by the tokenizer).
- Perplexity (`loglikelihood_rolling`): each document is [P] + its tokens, P the prefix token
  (BOS, else EOS); every token of the document is scored, P is not. A document longer than
  max_length is cut into disjoint rolling windows: the first predicts tokens 1..L from [P] and
  tokens 1..L-1, each next one predicts the next L tokens (fewer at the end) from the L tokens
  before each, so no token is scored twice and each sees as much context as fits.
  perplexity = exp(-sum of log-likelihoods / number of scored tokens), over the whole file;
  bits_per_byte = -sum / (UTF-8 bytes of the documents) / ln 2.
- Multiple choice (`loglikelihood` of context + " " + choice): trailing spaces of the context
  move to the continuation, context+continuation is encoded whole and the continuation is the
  tokens after the context's own encoding (`_encode_pair`); an empty context is [P]. The input
  is the last max_length+1 tokens, minus the last. acc ranks choices by the summed
  log-likelihood, acc_norm by it over the choice's length in characters, acc_bytes in UTF-8
  bytes (lm_eval/api/task.py, `process_results`).

Batches are padded on the right with an attention mask, so a token never sees padding and
batching does not change a score (beyond float rounding). The largest tensor is the logits,
batch x positions x vocab: a model that takes `logits_to_keep` (transformers' causal LMs)
computes them only for the positions scored (a choice's few tokens); perplexity scores every
position, so there memory grows as --batch-size x --max-length x vocab.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from weightspace.errors import InputError


@dataclass(frozen=True)
class Request:
    """Score the last `n_scored` targets of `tokens` (input tokens[:-1], targets tokens[1:])."""
    tokens: tuple[int, ...]
    n_scored: int


def rolling_windows(tokens: Sequence[int], prefix: int, max_length: int) -> list[Request]:
    """Disjoint windows scoring every token of a document once (lm_eval.utils
    get_rolling_token_windows with context_len=1, then make_disjoint_window)."""
    full = [prefix, *tokens]
    out, start = [], 1
    while start < len(full):
        end = min(len(full), start + max_length)     # targets full[start:end]
        out.append(Request(tuple(full[max(0, end - 1 - max_length):end]), end - start))
        start = end
    return out


class CausalLMScorer:
    def __init__(self, model: torch.nn.Module, tokenizer, *, batch_size: int = 8, max_length: int = 2048,
                 device: str | torch.device | None = None, progress: bool = False):
        if batch_size < 1:
            raise InputError(f"--batch-size must be at least 1, got {batch_size}")
        if max_length < 1:
            raise InputError(f"--max-length must be at least 1, got {max_length}")
        self.model, self.tok = model, tokenizer
        self.batch_size, self.max_length, self.progress = batch_size, max_length, progress
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        if prefix is None:
            raise InputError("the tokenizer has neither a BOS nor an EOS token, so the first token of a "
                             "text has nothing to be predicted from; give a tokenizer with one")
        self.prefix = int(prefix)
        self.pad = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.prefix)
        forward = getattr(model, "forward", None)
        try:
            self._keeps_logits = forward is not None and "logits_to_keep" in inspect.signature(forward).parameters
        except (TypeError, ValueError):
            self._keeps_logits = False

    def encode(self, text: str) -> list[int]:
        return list(self.tok(text, add_special_tokens=False)["input_ids"])

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """lm-eval's `_encode_pair`: context and continuation tokens, the split taken from the
        encoding of the whole string."""
        n = len(context) - len(context.rstrip())
        if n:
            context, continuation = context[:-n], context[-n:] + continuation
        if not context:
            return [self.prefix], self.encode(continuation)
        whole = self.encode(context + continuation)
        ctx = self.encode(context)
        return ctx, whole[len(ctx):]

    # -----------------------------------------------------------------------------------------

    def score(self, requests: Sequence[Request], desc: str = "scoring") -> list[tuple[float, bool]]:
        """(sum of log-likelihoods of the scored targets, whether each was the greedy token) per
        request, in order. Requests run longest first, `batch_size` at a time."""
        from tqdm.auto import tqdm

        order = sorted(range(len(requests)), key=lambda i: -len(requests[i].tokens))
        out: list[tuple[float, bool] | None] = [None] * len(requests)
        batches = [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        with torch.no_grad():
            for idx in tqdm(batches, desc=desc, unit="batch", disable=not self.progress):
                for i, r in zip(idx, self._batch([requests[i] for i in idx])):
                    out[i] = r
        return out  # type: ignore[return-value]

    def _batch(self, reqs: list[Request]) -> list[tuple[float, bool]]:
        width = max(len(r.tokens) - 1 for r in reqs)
        ids = torch.full((len(reqs), width), self.pad, dtype=torch.long)
        mask = torch.zeros((len(reqs), width), dtype=torch.long)
        for b, r in enumerate(reqs):
            n = len(r.tokens) - 1
            ids[b, :n] = torch.tensor(r.tokens[:-1])
            mask[b, :n] = 1
        kwargs = {}
        # only the positions some row scores need logits (B x T x vocab is the largest tensor of
        # a forward): the last `keep` of the padded width cover every row's scored tail
        keep = max(width - (len(r.tokens) - 1) + r.n_scored for r in reqs)
        if keep < width and self._keeps_logits:
            kwargs["logits_to_keep"] = keep
        logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device), **kwargs).logits
        offset = width - logits.shape[1]
        res = []
        for b, r in enumerate(reqs):
            n = len(r.tokens) - 1 - offset
            lp = torch.log_softmax(logits[b, n - r.n_scored:n].float(), dim=-1)
            target = torch.tensor(r.tokens[-r.n_scored:], device=lp.device)
            ll = lp.gather(-1, target[:, None]).squeeze(-1)
            res.append((float(ll.double().sum()), bool((lp.argmax(-1) == target).all())))
        return res

    # -----------------------------------------------------------------------------------------

    def perplexity(self, texts: Iterable[str]) -> dict[str, float]:
        texts = list(texts)
        requests, tokens, n_bytes = [], 0, 0
        for t in texts:
            ids = self.encode(t)
            tokens += len(ids)
            n_bytes += len(t.encode("utf-8"))
            requests += rolling_windows(ids, self.prefix, self.max_length)
        if not tokens:
            raise InputError("the documents encode to no tokens")
        total = sum(ll for ll, _ in self.score(requests, desc="perplexity"))
        return {"perplexity": math.exp(-total / tokens), "nll": -total / tokens,
                "bits_per_byte": -total / n_bytes / math.log(2), "tokens": tokens, "documents": len(texts)}

    def choice_loglikelihoods(self, questions: Sequence, source: str = "the data") -> list[list[float]]:
        """Per question, the summed log-likelihood of each choice (context + " " + choice); every
        choice is encoded (and checked) before the model runs."""
        requests, where = [], []
        for q in questions:
            for c in q.choices:
                ctx, cont = self.encode_pair(q.context, " " + c)
                if not cont:
                    raise InputError(f"{source}:{q.line}: choice {c!r} encodes to no tokens after its context")
                seq = (ctx + cont)[-(self.max_length + 1):]
                requests.append(Request(tuple(seq), min(len(cont), len(seq) - 1)))
            where.append(len(q.choices))
        flat = [ll for ll, _ in self.score(requests, desc="choices")]
        out, i = [], 0
        for n in where:
            out.append(flat[i:i + n])
            i += n
        return out

    def multiple_choice(self, questions: Sequence, source: str = "the data") -> dict[str, float]:
        lls = self.choice_loglikelihoods(questions, source)
        hits = {"acc": 0, "acc_norm": 0, "acc_bytes": 0}
        for q, ll in zip(questions, lls):
            chars = [len(c) for c in q.choices]
            nbytes = [len(c.encode("utf-8")) for c in q.choices]
            for name, score in (("acc", ll), ("acc_norm", [v / n for v, n in zip(ll, chars)]),
                                ("acc_bytes", [v / n for v, n in zip(ll, nbytes)])):
                hits[name] += int(max(range(len(score)), key=lambda k: (score[k], -k)) == q.answer)
        return {k: v / len(questions) for k, v in hits.items()}
