"""Every command in the README runs as written, in order, in a fresh copy of the repository.

The README's ```bash and ```python blocks are run top to bottom in one folder: a copy of the
files a clone would have (git's tracked and unignored files), so a command that relies on a file
a clone lacks, or on an output an earlier command did not write, fails here. A block that cannot
run on this machine (it needs a Hub account, a Ray cluster, mergekit, or is the CI command itself)
is marked in the README with a comment right above it:

    <!-- readme-test: skip (the reason) -->

The whole walk takes a few minutes (it builds two zoos and trains generators), so it is marked
slow: `python -m pytest -m slow tests/test_readme.py`. The parsing rules are tested on the fast path.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SKIP_RE = re.compile(r"<!--\s*readme-test:\s*skip\s*\((?P<why>[^)]+)\)\s*-->")
FENCE_RE = re.compile(r"^```(?P<lang>[\w-]*)\s*$")


@dataclass(frozen=True)
class Block:
    lang: str
    line: int  # 1-based line of the opening fence
    code: str
    skip: str | None  # the reason, when marked to skip


def readme_blocks(text: str) -> list[Block]:
    """The fenced code blocks of a Markdown text, with a skip reason from the comment above."""
    lines = text.splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        m = FENCE_RE.match(lines[i])
        if not m:
            i += 1
            continue
        start, lang = i, m["lang"]
        j = i + 1
        while j < len(lines) and not lines[j].startswith("```"):
            j += 1
        prev = next((lines[k] for k in range(start - 1, -1, -1) if lines[k].strip()), "")
        skip = SKIP_RE.search(prev)
        blocks.append(Block(lang, start + 1, "\n".join(lines[start + 1 : j]), skip and skip["why"]))
        i = j + 1
    return blocks


def runnable(blocks: list[Block]) -> list[Block]:
    return [b for b in blocks if b.lang in ("bash", "python") and b.skip is None]


def test_block_parsing_and_skip_markers():
    text = ("intro\n```bash\necho a \\\n  b\n```\n\n<!-- readme-test: skip (needs the Hub) -->\n\n"
            "```bash\nwsmerge upload x org/y\n```\n```text\nnot code\n```\n```python\nprint(1)\n```\n")
    blocks = readme_blocks(text)
    assert [(b.lang, b.line, b.skip) for b in blocks] == [
        ("bash", 2, None), ("bash", 9, "needs the Hub"), ("text", 12, None), ("python", 15, None)]
    assert blocks[0].code == "echo a \\\n  b"
    assert [b.line for b in runnable(blocks)] == [2, 15]


def test_every_skipped_readme_block_says_why_and_the_rest_is_runnable():
    blocks = readme_blocks((ROOT / "README.md").read_text(encoding="utf-8"))
    marks = SKIP_RE.findall((ROOT / "README.md").read_text(encoding="utf-8"))
    assert len(marks) == sum(b.skip is not None for b in blocks), "a skip marker is not above a block"
    assert all(why.strip() for why in marks)
    bash = [b for b in runnable(blocks) if b.lang == "bash"]
    assert len(bash) >= 7, "the README's command walk-through went missing"
    for b in bash:  # placeholders a reader would have to fill in are not runnable as written
        code = "\n".join(line.split(" # ")[0] for line in b.code.splitlines())  # comments may list choices
        for bad in ("<id>", "ID_A", "[--", "SPEC ", " MODEL ", "|", "..."):
            assert bad not in code, f"README line {b.line}: {bad!r} in a runnable block"


def _fresh_copy(dest: Path) -> None:
    """The files a clone of the current tree would have (tracked or new, not ignored)."""
    names = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
                           cwd=ROOT, check=True, capture_output=True).stdout.decode().split("\0")
    for name in filter(None, names):
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)


@pytest.mark.slow
def test_every_readme_command_runs_as_written_in_order(tmp_path):
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs a git checkout to know what a clone holds")
    clone = tmp_path / "clone"
    _fresh_copy(clone)
    git = ["git", "-c", "user.name=readme", "-c", "user.email=readme@test", "-c", "init.defaultBranch=main"]
    for cmd in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "clone"]):
        subprocess.run([*git, *cmd], cwd=clone, check=True, capture_output=True)
    bindir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}",
           "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "MPLBACKEND": "Agg",
           "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    env.pop("WSMERGE_DEBUG", None)
    timings = []
    for b in runnable(readme_blocks((ROOT / "README.md").read_text(encoding="utf-8"))):
        argv = (["bash", "-euo", "pipefail", "-c", b.code] if b.lang == "bash"
                else [sys.executable, "-c", b.code])
        t0 = time.perf_counter()
        r = subprocess.run(argv, cwd=clone, env=env, capture_output=True, text=True, timeout=600)
        timings.append((b.line, round(time.perf_counter() - t0, 1)))
        assert r.returncode == 0, (f"README line {b.line} ({b.lang}) failed with exit {r.returncode}:\n"
                                   f"{b.code}\n--- stdout\n{r.stdout[-3000:]}\n--- stderr\n{r.stderr[-3000:]}")
    print("README blocks (line, seconds):", timings)
    # the walk-through changed no file of the repository and wrote only where .gitignore
    # expects outputs (never into a package such as zoo/)
    status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=clone,
                            check=True, capture_output=True, text=True).stdout
    assert status == "", f"README commands left files git would see:\n{status}"
