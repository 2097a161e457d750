"""The named chat templates render what mergekit 0.1.5's templates of the same names render
(under transformers' Jinja settings), their whitespace included; the expected strings are
written out here. `benchmarks/compare_chat_templates.py` checks the same against mergekit's files."""

from __future__ import annotations

import pytest

from weightspace.chat_templates import CHAT_TEMPLATES

CONVERSATION = [{"role": "system", "content": " be nice "}, {"role": "user", "content": " hi "},
                {"role": "assistant", "content": "hello "}, {"role": "user", "content": "bye"}]

EXPECTED = {
    "chatml": "<|im_start|>system\n be nice <|im_end|>\n<|im_start|>user\n hi <|im_end|>\n"
              "<|im_start|>assistant\nhello <|im_end|>\n<|im_start|>user\nbye<|im_end|>\n"
              "<|im_start|>assistant\n",
    "llama3": "<s><|start_header_id|>system<|end_header_id|>\n\nbe nice<|eot_id|>\n"
              "<|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>\n"
              "<|start_header_id|>assistant<|end_header_id|>\n\nhello<|eot_id|>\n"
              "<|start_header_id|>user<|end_header_id|>\n\nbye<|eot_id|>\n"
              "<|start_header_id|>assistant<|end_header_id|>\n\n",
    "mistral": "<s> [INST]  be nice \n\n hi  [/INST] hello </s> [INST] bye [/INST]",
    "alpaca": "be nice\n\n### Instruction:\nhi\n\n### Response:\nhello\n\n### Instruction:\nbye### Response:\n",
    "exaone": "    [|system|] be nice \n        [|endofturn|]\n\n    [|user|] hi \n        \n\n"
              "    [|assistant|]hello \n        [|endofturn|]\n\n    [|user|]bye\n        \n\n    [|assistant|]\n",
}


def _render(text: str, messages: list[dict], **kw) -> str:
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])

    def raise_exception(message: str):
        raise TemplateError(message)

    env.globals["raise_exception"] = raise_exception
    return env.from_string(text).render(messages=messages, bos_token="<s>", eos_token="</s>", **kw)


@pytest.mark.requires("hf")  # jinja2 comes with transformers, which renders chat templates
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_named_templates_render_as_mergekits(name):
    assert sorted(CHAT_TEMPLATES) == sorted(EXPECTED)
    assert _render(CHAT_TEMPLATES[name], CONVERSATION, add_generation_prompt=True) == EXPECTED[name]


@pytest.mark.requires("hf")
def test_mistral_refuses_roles_out_of_turn_as_mergekits_does():
    from jinja2.exceptions import TemplateError

    with pytest.raises(TemplateError, match="conversation roles must alternate"):
        _render(CHAT_TEMPLATES["mistral"], [{"role": "assistant", "content": "x"}])
    with pytest.raises(TemplateError, match="Only user and assistant roles are supported"):
        _render(CHAT_TEMPLATES["mistral"], [{"role": "user", "content": "a"}, {"role": "tool", "content": "b"}])
    # without a generation prompt alpaca ends with the last message; the first user turn without
    # a system message has none before it
    assert _render(CHAT_TEMPLATES["alpaca"], CONVERSATION[1:2]) == "\n\n### Instruction:\nhi"
