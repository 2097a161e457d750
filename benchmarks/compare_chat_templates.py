"""Our named chat templates against mergekit 0.1.5's files: the same rendering, conversation by
conversation, under transformers' Jinja settings (trim_blocks, lstrip_blocks).

    python benchmarks/compare_chat_templates.py \\
        --templates /tmp/mkvenv/lib/python3.11/site-packages/mergekit/_data/chat_templates

Not part of the test suite (mergekit lives in its own virtualenv); tests/test_chat_templates.py
pins the renderings it checks.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from weightspace.chat_templates import CHAT_TEMPLATES  # noqa: E402

CONVERSATIONS = [
    [{"role": "user", "content": "hi"}],
    [{"role": "system", "content": " be nice "}, {"role": "user", "content": " hi "},
     {"role": "assistant", "content": "hello "}],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}],
    [{"role": "system", "content": "S"}, {"role": "user", "content": "u1"},
     {"role": "user_context", "content": "ctx"}, {"role": "assistant", "content": "r"}],
    [{"role": "assistant", "content": "x"}],
    [{"role": "system", "content": "s1"}, {"role": "system", "content": "s2"}, {"role": "user", "content": "q"}],
]


def renderer(text: str):
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])

    def raise_exception(message: str):
        raise TemplateError(message)

    env.globals["raise_exception"] = raise_exception
    template = env.from_string(text)

    def render(**kw) -> str:
        try:
            return template.render(bos_token="<s>", eos_token="</s>", **kw)
        except TemplateError as e:
            return f"error: {e}"

    return render


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--templates", type=Path, required=True, help="mergekit's _data/chat_templates folder")
    args = ap.parse_args()
    differ = 0
    for name, text in sorted(CHAT_TEMPLATES.items()):
        ours, theirs = renderer(text), renderer((args.templates / f"{name}.jinja").read_text())
        cases = list(itertools.product(CONVERSATIONS, (False, True)))
        bad = [(c, g) for c, g in cases if ours(messages=c, add_generation_prompt=g)
               != theirs(messages=c, add_generation_prompt=g)]
        differ += len(bad)
        print(f"{name:8} {len(cases) - len(bad)}/{len(cases)} renderings identical")
        for c, g in bad:
            print(f"  differs: add_generation_prompt={g} {c}")
    sys.exit(1 if differ else 0)


if __name__ == "__main__":
    main()
