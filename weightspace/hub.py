"""Hub ids: `org/name[@revision]` resolved into the huggingface_hub cache."""

from __future__ import annotations

import os
from pathlib import Path

from weightspace.errors import InputError

_PATTERNS = [
    "*.safetensors", "*.safetensors.index.json", "config.json", "tokenizer*", "special_tokens_map.json",
    "added_tokens.json", "vocab*", "merges.txt", "*.model", "generation_config.json", "chat_template*",
]  # fmt: skip


def split_hub_id(ref: str) -> tuple[str, str | None]:
    repo, _, rev = ref.partition("@")
    return repo, (rev or None)


def resolve_hub(ref: str) -> Path:
    """Download (or find in the cache, honouring HF_HUB_OFFLINE) a model snapshot."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    repo, rev = split_hub_id(ref)
    # Read the environment now, not at huggingface_hub's import: a caller (or a
    # test) may set HF_HUB_OFFLINE / HF_HUB_CACHE after something imported it.
    kw = {
        "cache_dir": os.environ.get("HF_HUB_CACHE") or None,
        "local_files_only": os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"),
    }
    try:
        path = snapshot_download(repo_id=repo, revision=rev, allow_patterns=_PATTERNS, **kw)
        p = Path(path)
        if not any(p.glob("*.safetensors")):  # fall back to pickled weights, loaded safely
            path = snapshot_download(
                repo_id=repo, revision=rev, allow_patterns=_PATTERNS + ["pytorch_model*.bin*"], **kw
            )
        return Path(path)
    except LocalEntryNotFoundError:
        raise InputError(
            f"{ref}: not a local path, and not in the Hub cache (offline, or the Hub is unreachable)"
        ) from None
    except HfHubHTTPError as e:
        raise InputError(f"{ref}: Hub request failed: {e}") from None
    except Exception as e:  # network errors vary by backend
        raise InputError(f"{ref}: not a local path, and the Hub lookup failed: {e}") from None
