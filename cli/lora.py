"""`wsmerge lora`: LoRA adapters as weight-space objects."""

from __future__ import annotations

import click

from weightspace.cli.lora_merge import merge
from weightspace.cli.options import Group


@click.group(cls=Group)
def lora() -> None:
    """LoRA adapters: combine peft adapters in adapter space.

    \b
    Example (from the repository root):
      wsmerge lora merge examples/lora/merge.yaml -o runs/lora-merged
    """


lora.add_command(merge)
