"""`wsmerge upload`: push a merge output folder to the Hugging Face Hub."""

from __future__ import annotations

from pathlib import Path

import click

from weightspace.cli.options import Command


@click.command(cls=Command)
@click.argument("out", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("repo_id")
@click.option("--private", is_flag=True, help="Create the repo as private (an existing repo keeps its visibility).")
@click.option("--revision", default=None, help="Branch to commit to (created from main if missing).")
@click.option("--create-pr", is_flag=True, help="Open a pull request instead of committing to the branch.")
@click.option("--commit-message", default=None, help="Defaults to one naming the merge method.")
def upload(out: Path, repo_id: str, private: bool, revision: str | None, create_pr: bool,
           commit_message: str | None) -> None:
    """Upload the merge output OUT to the Hub model repo REPO_ID (org/name).

    The token comes from HF_TOKEN or `hf auth login`; HF_ENDPOINT picks the Hub.
    The model card (README.md) is checked before anything is sent; OUT is never
    changed or deleted.

    \b
    Example (after `wsmerge run examples/ties.yaml runs/ties`):
      wsmerge upload runs/ties my-org/tiny-ties --create-pr
    """
    from weightspace.hub import push_to_hub

    url = push_to_hub(out, repo_id, private=private, revision=revision, create_pr=create_pr,
                      commit_message=commit_message)
    click.echo(f"{'opened pull request' if create_pr else 'pushed'} {out} to {repo_id}: {url}")
