"""The Hub without the internet: `tests/fake_hub.py` serves the API huggingface_hub uses.

End-to-end tests run `wsmerge` in a subprocess with HF_ENDPOINT pointing at the fake
server (huggingface_hub reads it at import), HF_HOME in tmp_path and xet disabled.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from tests.fake_hub import FakeHub
from weightspace.errors import InputError, SpecError
from weightspace.hub import push_to_hub, resolve_hub, scrub
from weightspace.zoo.tiny import write_tiny_llama

REPO = Path(__file__).resolve().parents[1]
GOOD = "hf_good_token"
SECRET = "hf_secret123SECRETsecret456"


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in d.iterdir() if p.is_file()}


@pytest.fixture
def hub(tmp_path: Path):
    models = tmp_path / "src"
    with FakeHub(tokens={GOOD}) as h:
        h.add_repo("org/base", _files(write_tiny_llama(models / "base", seed=0)))
        h.add_repo("org/ft", _files(write_tiny_llama(models / "ft0", seed=0, delta_seed=3)))
        h.add_repo("org/ft", _files(write_tiny_llama(models / "ft1", seed=0, delta_seed=1)), tag="v1")
        h.add_repo("org/ft", _files(write_tiny_llama(models / "ft2", seed=0, delta_seed=2)))
        h.add_repo("org/flax", {"config.json": b"{}", "flax_model.msgpack": b"x", "README.md": b"# f"})
        yield h


def wsm(hub: FakeHub, tmp: Path, *args: str, token: str | None = GOOD, **env: str) -> tuple[int, str, str]:
    e = {k: v for k, v in os.environ.items()
         if not k.startswith(("HF_", "HUGGING_FACE", "WSMERGE_DEBUG"))}
    e.update(HF_ENDPOINT=hub.url, HF_HOME=str(tmp / "hf"), HF_HUB_DISABLE_XET="1",
             HF_HUB_DISABLE_TELEMETRY="1", **env)
    # REPO first; what PYTHONPATH held stays (WSMERGE_TEST_HIDE's blocker, tests/conftest.py)
    e["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    if token:
        e["HF_TOKEN"] = token
    r = subprocess.run([sys.executable, "-m", "weightspace.cli.main", *args], cwd=REPO, env=e, capture_output=True,
                       text=True, timeout=180)
    return r.returncode, r.stdout, r.stderr


def spec(tmp: Path, *models: str) -> Path:
    p = tmp / "spec.yaml"
    lines = "".join(f"  - model: {m}\n    parameters: {{weight: 0.5}}\n" for m in models)
    p.write_text(f"merge_method: linear\nmodels:\n{lines}")
    return p


def front_matter(card: Path) -> dict:
    return yaml.safe_load(card.read_text().split("---")[1])


@pytest.mark.parametrize("ref", ["org/bad--name", "org/a/b", "org/name@", "-org/name", "org/name@a@b"])
def test_malformed_id_is_a_spec_error_before_any_request(ref):
    with pytest.raises(SpecError, match="not a valid Hub id"):
        resolve_hub(ref)


def test_scrub_masks_tokens(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "tok_plain_value")
    assert scrub("bad tok_plain_value and hf_abcdefgh123") == "bad *** and hf_***"


def test_download_by_id_and_revision_then_offline(hub, tmp_path):
    out = tmp_path / "out"
    code, stdout, err = wsm(hub, tmp_path, "run", spec(tmp_path, "org/base", "org/ft@v1"), out)
    assert code == 0, err
    assert ("GET", "/api/models/org/ft/revision/v1") in hub.requests
    fm = front_matter(out / "README.md")
    assert fm["base_model"] == ["org/base", "org/ft"] and "linear" in fm["tags"]
    snaps = list((tmp_path / "hf" / "hub" / "models--org--ft" / "snapshots").iterdir())
    assert len(snaps) == 1 and {p.name for p in snaps[0].iterdir()} == {"model.safetensors", "config.json"}
    # offline: the cached snapshot is used without a request; an uncached model gets a clear message
    n = len(hub.requests)
    code, _, err = wsm(hub, tmp_path, "run", spec(tmp_path, "org/base", "org/ft@v1"), tmp_path / "o2",
                       HF_HUB_OFFLINE="1")
    assert code == 0, err
    code, _, err = wsm(hub, tmp_path, "run", spec(tmp_path, "org/base", "org/ft"), tmp_path / "o3",
                       HF_HUB_OFFLINE="1")
    assert code == 1 and "org/ft: not a local path, and not in the Hub cache (HF_HUB_OFFLINE is set)" in err
    assert len(hub.requests) == n


def test_download_errors_are_clear_and_never_show_the_token(hub, tmp_path):
    cases = [
        (("org/base", "org/ft@nope"), GOOD, "revision 'nope' does not exist in org/ft", 1),
        (("org/base", "org/flax"), GOOD, "no safetensors (or pytorch_model.bin) weights; it has: "
                                         "README.md, config.json, flax_model.msgpack", 1),
        (("org/base", "org/missing"), GOOD, "org/missing: no such model on the Hub", 1),
        (("org/base", "org/ft"), SECRET, "authentication failed (HTTP 401)", 1),
        (("org/base", "org/x--y"), GOOD, "'org/x--y': not a valid Hub id", 2),
    ]
    for models, token, message, exit_code in cases:
        code, out, err = wsm(hub, tmp_path, "run", spec(tmp_path, *models), tmp_path / "out", token=token)
        assert code == exit_code and message in err, (models, err)
        assert SECRET not in out + err and "Traceback" not in err
    assert not any("x--y" in path for _, path in hub.requests)  # rejected before any request


def test_run_push_to_hub_and_upload(hub, tmp_path):
    out = tmp_path / "out"
    code, stdout, err = wsm(hub, tmp_path, "run", spec(tmp_path, "org/base", "org/ft"), out,
                            "--push-to-hub", "me/merged", "--private")
    assert code == 0, err
    assert "pushed" in stdout and f"{hub.url}/me/merged/commit/" in stdout
    stored = hub.files("me/merged")
    assert set(stored) == {"model.safetensors", "config.json", "README.md", "mergekit_config.yml"}
    assert stored["model.safetensors"] == (out / "model.safetensors").read_bytes()
    assert hub.repos["me/merged"]["private"] and hub.commits[-1]["message"] == \
        "Upload linear merge made with weightspace"
    fm = yaml.safe_load(stored["README.md"].decode().split("---")[1])
    assert fm["base_model"] == ["org/base", "org/ft"] and fm["library_name"] == "transformers"
    assert {"merge", "weightspace", "linear"} <= set(fm["tags"])
    # a pull request against the existing repo
    code, stdout, err = wsm(hub, tmp_path, "upload", out, "me/merged", "--create-pr", "--commit-message", "hi")
    assert code == 0, err
    assert f"{hub.url}/me/merged/discussions/1" in stdout
    assert hub.commits[-1]["pr"] and hub.commits[-1]["message"] == "hi"
    # a branch
    code, stdout, err = wsm(hub, tmp_path, "upload", out, "me/merged", "--revision", "dev")
    assert code == 0 and "dev" in hub.repos["me/merged"]["refs"], err


def test_push_failures(hub, tmp_path):
    out = tmp_path / "out"
    code, _, err = wsm(hub, tmp_path, "run", spec(tmp_path, "org/base", "org/ft"), out)
    assert code == 0, err
    before = sorted(p.name for p in out.iterdir())
    # no token: refused before any request
    n = len(hub.requests)
    code, _, err = wsm(hub, tmp_path, "upload", out, "me/m", token=None)
    assert code == 1 and "pushing to the Hub needs a token" in err and len(hub.requests) == n
    # a bad token: clear message, the token is never shown
    code, o, err = wsm(hub, tmp_path, "upload", out, "me/m", token=SECRET)
    assert code == 1 and "authentication failed (HTTP 401)" in err and SECRET not in o + err
    # transient errors on the commit are retried
    hub.fail("POST", "/commit/", 500, 503)
    code, o, err = wsm(hub, tmp_path, "upload", out, "me/m")
    assert code == 0 and "me/m/commit/" in o, err
    assert len(hub.commits) == 1
    # persistent errors: a clear message, the local output is kept
    hub.fail("POST", "/commit/", 500, 500, 500)
    code, o, err = wsm(hub, tmp_path, "upload", out, "me/m")
    assert code == 1 and "push to me/m failed after 3 tries" in err and "is kept" in err
    assert len(hub.commits) == 1 and sorted(p.name for p in out.iterdir()) == before
    assert SECRET not in (out / "README.md").read_text()


def test_bad_card_is_refused_before_upload(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", SECRET)
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "README.md").write_text(textwrap.dedent("""\
        ---
        base_model: not//valid
        tags: [merge]
        ---
        # card
    """))
    with pytest.raises(SpecError, match="base_model id in the model card"):
        push_to_hub(tmp_path / "m", "me/m")
    with pytest.raises(SpecError, match="not a valid Hub repo id"):
        push_to_hub(tmp_path / "m", "me/m/x")
    with pytest.raises(InputError, match="not a directory"):
        push_to_hub(tmp_path / "nothing", "me/m")


def test_unreachable_endpoint_retries_then_one_line(tmp_path, monkeypatch, run_cli):
    """The installed huggingface_hub's own error for a closed port (httpx2's ConnectError in 2.x)
    is transient: the push is tried PUSH_TRIES times, then fails in one line naming the endpoint."""
    import socket

    import weightspace.hub as hub_mod

    with socket.socket() as s:                  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    endpoint = f"http://127.0.0.1:{port}"
    out = write_tiny_llama(tmp_path / "out", seed=0)
    before = _files(out)
    sleeps: list[float] = []
    monkeypatch.setattr(hub_mod, "PUSH_BACKOFF", 0.01)
    monkeypatch.setattr(hub_mod.time, "sleep", lambda s: sleeps.append(s))
    env = {"HF_ENDPOINT": endpoint, "HF_TOKEN": SECRET, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_DISABLE_XET": "1"}
    code, _, err = run_cli("upload", out, "me/m", env=env)
    assert code == 1, err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert "push to me/m failed after 3 tries" in err and f"(Hub {endpoint})" in err and "is kept" in err
    assert "ModuleNotFoundError" not in err and "httpx" not in err and SECRET not in err
    assert len(sleeps) == hub_mod.PUSH_TRIES - 1
    assert _files(out) == before
