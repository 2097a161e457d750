"""Router (gate) initialisation for a mixture of experts built from dense models, as mergekit-moe
does it (mergekit 0.1.5, mergekit/moe/router.py and scripts/moe.py).

    gates = random_gates(num_layers=4, num_experts=3, hidden=32, seed=0)      # (L, E, H)
    tok = prompt_tokenizer("./base")                  # left padding, pad = bos (else eos)
    gates = cheap_embed_gates(embed, tok, experts, num_layers=4)
    gates = hidden_gates(model, tok, experts, average=False)   # model: a transformers causal LM

Row e of layer l's router is expert e's vector v, the rows being compared by dot product with
the token's hidden state, the largest `experts_per_token` winning:

- random: v ~ N(0, 1); uniform_random: v ~ U(-1/sqrt(H), 1/sqrt(H)) (nn.Linear's init). Seeded.
- cheap_embed: p = sum of the base's input-embedding rows of every (unpadded) token of the
  expert's positive prompts, over all prompts; p / ||p||; the same for negatives, n / ||n||;
  v = (p - n) / ||p - n||, the same vector in every layer.
- hidden (= hidden_last): run the base model on the prompts; layer l's vector is the hidden state
  that *enters* layer l (transformers' hidden_states[l]: the embeddings for l = 0) at the last
  position, averaged over the prompts; minus the same for the negatives; normalised per layer.
  hidden_avg: the hidden state averaged over every position (padding included, as mergekit
  does) instead of the last one.

Each prompt is tokenized as `bos_token + prompt` with no other special tokens, left-padded
with the bos token (the eos token where there is no bos), as mergekit's `tokenize_prompts`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

EPS = 1e-8


def random_gates(num_layers: int, num_experts: int, hidden: int, seed: int,
                 uniform: bool = False) -> torch.Tensor:
    """(L, E, H) router rows: N(0, 1), or U(-1/sqrt(H), 1/sqrt(H)) with `uniform`; the same for a seed."""
    g = torch.Generator().manual_seed(seed)
    if not uniform:
        return torch.randn((num_layers, num_experts, hidden), generator=g)
    scale = math.sqrt(1.0 / hidden)
    return torch.rand((num_layers, num_experts, hidden), generator=g) * 2 * scale - scale


def prompt_tokenizer(tokenizer: Any) -> Any:
    """The tokenizer set up as mergekit-moe sets it: left padding, the pad token = bos (else eos)."""
    tokenizer.padding_side = "left"
    tokenizer.pad_token_id = tokenizer.bos_token_id
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def tokenize_prompts(prompts: Sequence[str], tokenizer: Any) -> dict[str, torch.Tensor]:
    """`bos_token + prompt` for each prompt, padded into one batch (input_ids, attention_mask)."""
    enc = tokenizer([(tokenizer.bos_token or "") + p for p in prompts], return_tensors="pt",
                    padding=True, add_special_tokens=False)
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def cheap_embedding(embed: torch.Tensor, tokenized: dict[str, torch.Tensor], num_layers: int) -> torch.Tensor:
    """(L, H): the normalised sum of the embedding rows of the prompts' real tokens, in every layer."""
    ids, mask = tokenized["input_ids"], tokenized["attention_mask"]
    if int(ids.max()) >= embed.shape[0]:
        from weightspace.errors import InputError

        raise InputError(f"the prompts' tokenizer gives token id {int(ids.max())}, past the base's "
                         f"{embed.shape[0]} embedding rows; use the base model's own tokenizer")
    h = embed.float()[ids] * mask.unsqueeze(-1).float()      # (batch, seq, H)
    s = h.sum(dim=1).sum(dim=0, keepdim=True)                 # (1, H)
    return (s / s.norm(dim=-1, keepdim=True).clamp(min=EPS)).repeat(num_layers, 1)


def mean_hidden_states(model: Any, tokenized: dict[str, torch.Tensor], average: bool) -> torch.Tensor:
    """(L, H): per layer, the hidden state entering it, at the last position (or averaged over
    positions with `average`), averaged over the prompts."""
    device = next(model.parameters()).device
    with torch.no_grad():
        out = model(**{k: v.to(device) for k, v in tokenized.items()}, output_hidden_states=True,
                    return_dict=True)
    hs = torch.stack(out.hidden_states[:-1]).float()         # (L, batch, seq, H)
    hs = hs.sum(dim=2) / hs.shape[2] if average else hs[:, :, -1, :]
    return (hs.sum(dim=1) / hs.shape[1]).cpu()


def gate_vectors(experts: Sequence[Any], encode: Callable[[Sequence[str]], torch.Tensor],
                 progress: bool = False) -> torch.Tensor:
    """(L, E, H): per expert, encode(positives) - encode(negatives), normalised per layer.
    `experts` have `positive_prompts` and `negative_prompts`."""
    rows = []
    it = experts
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(experts, desc="expert prompts", leave=False)
    for e in it:
        v = encode(e.positive_prompts)
        if e.negative_prompts:
            v = v - encode(e.negative_prompts)
        rows.append(v / v.norm(p=2, dim=-1, keepdim=True).clamp(min=EPS))
    return torch.stack(rows, dim=0).permute(1, 0, 2).contiguous()


def degenerate_layers(gates: torch.Tensor, threshold: float = 5.0) -> list[int]:
    """Layers whose router rows are nearly dependent (condition number above `threshold`, as
    mergekit warns): some experts will seldom be chosen there."""
    return [i for i in range(gates.shape[0]) if float(torch.linalg.cond(gates[i].float())) > threshold]


__all__ = ["cheap_embedding", "degenerate_layers", "gate_vectors", "mean_hidden_states",
           "prompt_tokenizer", "random_gates", "tokenize_prompts"]
