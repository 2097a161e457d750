"""Shared by the CLI consistency tests: repository paths, a tiny zoo spec, every wsmerge
command, and the digits example models."""

from __future__ import annotations

from pathlib import Path

import click

from weightspace.cli.main import wsmerge

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"


# a zoo of 4 MLPs in two batches (one per width), trained in seconds
ZOO_SPEC = """
name: tiny
dataset: digits
arch: {arch: mlp, depth: 1}
train: {epochs: 1, batch_size: 128}
grid:
  width: [4, 8]
  seed: [0, 1]
metrics: {max_examples: 64, hessian_iters: 2, trace_samples: 2, bezier_steps: 2}
"""


def _walk(cmd: click.Command, path: tuple[str, ...] = ("wsmerge",)):
    """(path, command) for every command of the tree, in the order they are defined."""
    yield path, cmd
    if isinstance(cmd, click.Group):
        for name, sub in cmd.commands.items():
            yield from _walk(sub, (*path, name))


COMMANDS = list(_walk(wsmerge))


def _digits(name: str) -> str:
    return str(EXAMPLES / "digits" / name)
