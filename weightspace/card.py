"""README.md model cards with Hub metadata for merge outputs, built from plain data.

    card = model_card(Card(method="ties", pretty_name="TIES", models=["./a", "./b"],
                           spec_yaml=spec.to_yaml(), hub_ids=["org/base"]))
"""

from __future__ import annotations

from dataclasses import dataclass, field

import yaml


@dataclass(frozen=True)
class Card:
    """What a model card says about a merge."""

    method: str                       # the spec name, e.g. "ties"
    spec_yaml: str                    # the recipe, shown verbatim
    models: list[str]                 # every model reference, in spec order
    pretty_name: str = ""
    paper: str | None = None
    paper_url: str | None = None
    title: str = "merged model"
    base_model: str | None = None     # the spec's base_model as written
    hub_ids: list[str] = field(default_factory=list)  # models opened from the Hub (front matter)
    transformers: bool = False        # library_name: transformers (not for zoo checkpoints)


def model_card(card: Card) -> str:
    front: dict = {}
    if card.hub_ids:  # only models opened from the Hub are named as base_model; a local path never is
        front["base_model"] = card.hub_ids if len(card.hub_ids) > 1 else card.hub_ids[0]
    if card.transformers:
        front["library_name"] = "transformers"
    front["tags"] = ["merge", "weightspace", card.method]
    lines = ["---", yaml.safe_dump(front, sort_keys=False).rstrip(), "---", "", f"# {card.title}", ""]
    lines.append(f"This model was made with [weightspace](https://pypi.org/project/weightspace/) "
                 f"using the **{card.pretty_name or card.method}** merge method (`{card.method}`).")
    if card.paper:
        cite = f"[{card.paper}]({card.paper_url})" if card.paper_url else card.paper
        lines += ["", f"Method: {cite}."]
    lines += ["", "## Models merged", ""]
    if card.base_model:
        lines.append(f"- base: `{card.base_model}`")
    lines += [f"- `{r}`" for r in card.models if r != card.base_model]
    lines += ["", "## Spec", "", "```yaml", card.spec_yaml.rstrip(), "```", ""]
    return "\n".join(lines)


__all__ = ["Card", "model_card"]
