"""The Hub: `org/name[@revision]` resolved into the huggingface_hub cache, and results pushed back.

huggingface_hub is the only client. Downloads honour HF_HOME / HF_HUB_CACHE,
HF_HUB_OFFLINE, HF_ENDPOINT and HF_TOKEN; only the files a merge needs are
fetched. Tokens come from HF_TOKEN or `hf auth login` and are scrubbed from every
message we raise.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

from weightspace.errors import InputError, SpecError
from weightspace.safetensors_io import read_header

_PATTERNS = [
    "*.safetensors", "*.safetensors.index.json", "config.json", "tokenizer*", "special_tokens_map.json",
    "added_tokens.json", "vocab*", "merges.txt", "*.model", "generation_config.json", "chat_template*",
]  # fmt: skip
_TOKEN_RE = re.compile(r"hf_[A-Za-z0-9_-]{6,}")
PUSH_TRIES = 3
PUSH_BACKOFF = 0.5          # seconds before the first retry; doubled for each further one
TRANSIENT_STATUS = (408, 429, 500, 502, 503, 504)   # what huggingface_hub's own http_backoff retries
_AUTH_HINT = "check HF_TOKEN or log in with `hf auth login`"


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def _token() -> str | None:
    from huggingface_hub import get_token

    return get_token()


def scrub(text: str, token: str | None = None) -> str:
    """`text` with every Hub token (the given one, HF_TOKEN, the login's, any `hf_...`) masked."""
    secrets = {t for t in (token, os.environ.get("HF_TOKEN"), os.environ.get("HUGGING_FACE_HUB_TOKEN")) if t}
    try:
        if t := _token():
            secrets.add(t)
    except Exception:  # noqa: BLE001 - a broken token file must not hide the real error
        pass
    for s in sorted(secrets, key=len, reverse=True):
        text = text.replace(s, "***")
    return _TOKEN_RE.sub("hf_***", text)


def split_hub_id(ref: str) -> tuple[str, str | None]:
    repo, _, rev = ref.partition("@")
    return repo, (rev or None)


def check_repo_id(repo: str, what: str = "Hub id") -> None:
    """SpecError unless `repo` is a valid `org/name` (checked locally, before any request)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        if repo.count("/") != 1:
            raise HFValidationError("expected exactly one '/' (org/name)")
        validate_repo_id(repo)
    except HFValidationError as e:
        reason = str(e).splitlines()[0]
        raise SpecError(f"{repo!r}: not a valid {what} ({reason})") from None


def _http_status(e: Exception) -> int | None:
    resp = getattr(e, "response", None)
    return getattr(resp, "status_code", None)


def _no_weights(ref: str, repo: str, rev: str | None, snapshot: Path) -> InputError:
    """The error for a repo without safetensors (or .bin) weights, naming the files it has."""
    try:
        if _offline():
            raise OSError
        from huggingface_hub import HfApi

        files = HfApi().list_repo_files(repo, revision=rev)
    except Exception:  # noqa: BLE001 - fall back to what the snapshot holds
        files = [str(p.relative_to(snapshot)) for p in snapshot.rglob("*") if p.is_file()]
    shown = ", ".join(sorted(files)[:20]) or "no files"
    more = f" (and {len(files) - 20} more)" if len(files) > 20 else ""
    return InputError(f"{ref}: the Hub repo has no safetensors (or pytorch_model.bin) weights; "
                      f"it has: {shown}{more}")


def resolve_hub(ref: str) -> Path:
    """Download (or find in the cache, honouring HF_HUB_OFFLINE) a model snapshot."""
    repo, rev = split_hub_id(ref)
    if ref.endswith("@") or "@" in (rev or ""):
        raise SpecError(f"{ref!r}: not a valid Hub id (expected org/name or org/name@revision)")
    check_repo_id(repo)
    try:
        return _resolve(ref, repo, rev)
    except InputError as e:
        raise InputError(scrub(str(e))) from None


def _resolve(ref: str, repo: str, rev: str | None) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    # Read the environment now, not at huggingface_hub's import: a caller (or a
    # test) may set HF_HUB_OFFLINE / HF_HUB_CACHE after something imported it.
    offline = _offline()
    kw = {"cache_dir": os.environ.get("HF_HUB_CACHE") or None, "local_files_only": offline}
    try:
        p = Path(snapshot_download(repo_id=repo, revision=rev, allow_patterns=_PATTERNS, **kw))
        if not any(p.glob("*.safetensors")):  # fall back to pickled weights, loaded safely
            p = Path(snapshot_download(repo_id=repo, revision=rev,
                                       allow_patterns=_PATTERNS + ["pytorch_model*.bin*"], **kw))
            if not any(p.glob("*.safetensors")) and not any(p.glob("pytorch_model*.bin")):
                raise _no_weights(ref, repo, rev, p)
        return p
    except LocalEntryNotFoundError as e:
        cause = e.__cause__
        if isinstance(cause, RevisionNotFoundError):
            raise InputError(f"{ref}: revision {rev!r} does not exist in {repo} on the Hub") from None
        if offline:
            raise InputError(
                f"{ref}: not a local path, and not in the Hub cache (HF_HUB_OFFLINE is set); download it once online "
                f"(unset HF_HUB_OFFLINE) or point HF_HOME/HF_HUB_CACHE at a cache that has it"
            ) from None
        raise InputError(f"{ref}: not a local path, not in the Hub cache, and the Hub is unreachable "
                         f"({type(cause or e).__name__})") from None
    except RevisionNotFoundError:
        raise InputError(f"{ref}: revision {rev!r} does not exist in {repo} on the Hub") from None
    except GatedRepoError:
        raise InputError(f"{ref}: {repo} is gated; accept its terms on the Hub and {_AUTH_HINT}") from None
    except RepositoryNotFoundError as e:
        if _http_status(e) == 401 and os.environ.get("HF_TOKEN"):
            raise InputError(f"{ref}: authentication failed (HTTP 401); {_AUTH_HINT}") from None
        raise InputError(f"{ref}: no such model on the Hub (or it is private and your token "
                         f"cannot see it; {_AUTH_HINT})") from None
    except HfHubHTTPError as e:
        status = _http_status(e)
        if status in (401, 403):
            raise InputError(f"{ref}: authentication failed (HTTP {status}); {_AUTH_HINT}") from None
        raise InputError(f"{ref}: Hub request failed: {str(e).splitlines()[0]}") from None
    except InputError:
        raise
    except Exception as e:  # network errors vary by backend
        raise InputError(f"{ref}: not a local path, and the Hub lookup failed: {e}") from None


# -- upload --------------------------------------------------------------------------------


def _check_card(card_path: Path) -> dict:
    """Validate README.md's YAML front matter locally; return it.

    `ModelCard.validate()` posts the card to the Hub's /api/validate-yaml, so we
    check locally instead: the front matter must parse (`ModelCard.load` on a
    local file, no request), load into `ModelCardData`, and carry well-formed
    `base_model` ids, `tags` and `library_name`.
    """
    from huggingface_hub import ModelCard
    from huggingface_hub.repocard import REGEX_YAML_BLOCK

    from weightspace.yaml_io import read_yaml_file, safe_load

    try:  # our reader first (size, UTF-8, duplicate keys, alias bombs); huggingface_hub's after
        match = REGEX_YAML_BLOCK.search(read_yaml_file(card_path, "model card"))
        if match:
            safe_load(match.group(2), f"{card_path}: front matter")
    except SpecError as e:
        raise InputError(str(e)) from None
    try:
        card = ModelCard.load(card_path)
        data = card.data.to_dict()
    except Exception as e:  # noqa: BLE001 - yaml and huggingface_hub raise various types
        raise InputError(f"{card_path}: model card front matter is not valid: {e}") from None
    base = data.get("base_model")
    for b in [base] if isinstance(base, str) else (base or []):
        check_repo_id(str(b), "base_model id in the model card")
    tags = data.get("tags")
    if tags is not None and not (isinstance(tags, list) and all(isinstance(t, str) for t in tags)):
        raise InputError(f"{card_path}: model card 'tags' must be a list of strings")
    lib = data.get("library_name")
    if lib is not None and not isinstance(lib, str):
        raise InputError(f"{card_path}: model card 'library_name' must be a string")
    return data


def merge_method(folder: Path, card: dict | None = None) -> str | None:
    """The merge method that made `folder`: the card's tags, else the shards' recorded spec."""
    tags = (card or {}).get("tags") or []
    if "weightspace" in tags and tags.index("weightspace") + 1 < len(tags):
        return tags[tags.index("weightspace") + 1]
    for shard in sorted(folder.glob("*.safetensors"))[:1]:
        try:
            from weightspace.yaml_io import safe_load

            spec = read_header(shard)[1].get("weightspace_spec")  # bounded, regular files only
            if spec and isinstance(m := (safe_load(spec, str(shard)) or {}).get("merge_method"), str):
                return m
        except Exception:  # noqa: BLE001 - the method is only for the commit message
            return None
    return None


def _transport_errors() -> tuple[type[BaseException], ...]:
    """The exception types of a request that never got an answer (refused, reset, timed out),
    from huggingface_hub's own HTTP backend: `huggingface_hub.utils.httpx`, the module it
    re-exports under that name across major versions (httpx, or httpx2 in huggingface_hub
    2.x), and requests' where an older huggingface_hub uses it. Never a hard import of one
    backend: the one installed is the one asked."""
    found: list[type[BaseException]] = [ConnectionError, TimeoutError]
    try:
        from huggingface_hub import utils as hf_utils

        backend = hf_utils.httpx
        found.append(backend.TransportError)
    except (ImportError, AttributeError):
        pass
    import sys

    requests = sys.modules.get("requests")      # only if something (an old huggingface_hub) uses it
    if requests is not None:
        found += [requests.exceptions.ConnectionError, requests.exceptions.Timeout]
    return tuple(found)


def _transient(e: BaseException) -> bool:
    """Worth retrying: a 408/429/5xx answer (huggingface_hub's HfHubHTTPError and its kin carry
    the response), or no answer at all (a transport error, anywhere in the cause chain)."""
    status = _http_status(e)  # type: ignore[arg-type]
    if status is not None:
        return status in TRANSIENT_STATUS or status >= 500
    transport = _transport_errors()
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, transport):
            return True
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return False


def _reason(e: BaseException) -> str:
    """One line for an error: its first line, and what it wraps when that says more (a bare
    'Connection refused' from a transport error)."""
    first = str(e).splitlines()[0] if str(e).strip() else type(e).__name__
    cause = e.__cause__ or e.__context__
    if cause is not None and str(cause).strip():
        inner = str(cause).splitlines()[0]
        if inner not in first:
            first = f"{first} ({inner})"
    return first


def hub_endpoint() -> str:
    """The Hub a request goes to: HF_ENDPOINT as it is now, else huggingface_hub's default."""
    from huggingface_hub import constants

    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def check_push(repo_id: str, *, revision: str | None = None, create_pr: bool = False,
               token: str | None = None) -> str:
    """What a push needs before any work: a valid repo id, compatible options, a token (returned)."""
    check_repo_id(repo_id, "Hub repo id")
    if create_pr and revision not in (None, "main"):
        raise SpecError("--create-pr opens a pull request against main; do not combine it with --revision")
    token = token or _token()
    if not token:
        raise InputError("pushing to the Hub needs a token: set HF_TOKEN or log in with `hf auth login`; "
                         "nothing was uploaded")
    return token


def push_to_hub(folder: str | Path, repo_id: str, *, private: bool = False, revision: str | None = None,
                create_pr: bool = False, commit_message: str | None = None, token: str | None = None) -> str:
    """Upload a merge output folder to the Hub model repo `repo_id`; return the commit (or PR) url.

    Creates the repo if needed (`create_repo(exist_ok=True)`), then commits the
    whole folder with `upload_folder` (one commit; for checkpoints with very
    many shards, `HfApi.upload_large_folder` resumes better). Everything is
    checked before the first request: the folder, the repo id, a token, the
    model card. Transient failures (429, 5xx, network) are retried, at most
    PUSH_TRIES times with backoff (PUSH_BACKOFF seconds, doubled each time); the last error
    is said in one line with the Hub's endpoint. The local folder is never modified or deleted.
    """
    from huggingface_hub import HfApi

    folder = Path(folder)
    if not folder.is_dir() or not any(folder.iterdir()):
        raise InputError(f"{folder}: not a directory with files to upload")
    token = check_push(repo_id, revision=revision, create_pr=create_pr, token=token)
    card = _check_card(folder / "README.md") if (folder / "README.md").is_file() else None
    if commit_message is None:
        method = merge_method(folder, card)
        commit_message = f"Upload {method} merge made with weightspace" if method else "Upload with weightspace"
    endpoint = hub_endpoint()       # read now: HF_ENDPOINT may be set after huggingface_hub's import
    api = HfApi(endpoint=endpoint, token=token)
    for attempt in range(1, PUSH_TRIES + 1):
        try:
            api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
            if revision not in (None, "main"):
                api.create_branch(repo_id, branch=revision, exist_ok=True)
            info = api.upload_folder(folder_path=folder, repo_id=repo_id, repo_type="model", revision=revision,
                                     create_pr=create_pr, commit_message=commit_message)
            return str(info.pr_url if create_pr and info.pr_url else info.commit_url)
        except Exception as e:  # noqa: BLE001 - classified below, re-raised as one clear sentence
            status = _http_status(e)
            if status in (401, 403):
                raise InputError(f"push to {repo_id} failed: authentication failed (HTTP {status}); "
                                 f"{_AUTH_HINT}. The local output {folder} is kept") from None
            if attempt < PUSH_TRIES and _transient(e):
                time.sleep(PUSH_BACKOFF * 2 ** (attempt - 1))
                continue
            reason = scrub(_reason(e), token)
            tries = f" after {attempt} tries" if attempt > 1 else ""
            raise InputError(f"push to {repo_id} failed{tries} (Hub {endpoint}): {reason}. The local output "
                             f"{folder} is kept; run `wsmerge upload {folder} {repo_id}` to retry") from None
    raise AssertionError("unreachable")
