"""README.md model cards with Hub metadata for merge outputs."""

from __future__ import annotations

from typing import TYPE_CHECKING

import yaml

if TYPE_CHECKING:
    from weightspace.merge import MergePlan


def model_card(plan: MergePlan) -> str:
    m = plan.method
    refs = list(dict.fromkeys(plan.spaces))
    # only models opened from the Hub are named as base_model; a local path never is
    hub = [h for r in refs if (h := plan.spaces[r].meta.get("hub_id"))]
    front: dict = {}
    if hub:
        front["base_model"] = hub if len(hub) > 1 else hub[0]
    if (plan.config or {}).get("architectures") or (plan.config or {}).get("model_type") not in (None, "weightspace-zoo"):
        front["library_name"] = "transformers"     # zoo models are not transformers models
    front["tags"] = ["merge", "weightspace", m.name]
    title = plan.spec.name or "merged model"
    lines = ["---", yaml.safe_dump(front, sort_keys=False).rstrip(), "---", "", f"# {title}", ""]
    pretty = m.pretty_name or m.name
    lines.append(f"This model was made with [weightspace](https://pypi.org/project/weightspace/) "
                 f"using the **{pretty}** merge method (`{m.name}`).")
    if m.paper:
        cite = f"[{m.paper}]({m.reference_url})" if m.reference_url else m.paper
        lines += ["", f"Method: {cite}."]
    lines += ["", "## Models merged", ""]
    if plan.spec.base_model:
        lines.append(f"- base: `{plan.spec.base_model}`")
    for r in refs:
        if r != plan.spec.base_model:
            lines.append(f"- `{r}`")
    lines += ["", "## Spec", "", "```yaml", plan.spec.to_yaml().rstrip(), "```", ""]
    return "\n".join(lines)
