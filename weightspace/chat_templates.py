"""Chat templates by name, and the rule that tells a name from an inline Jinja template.

    resolve_chat_template("chatml")        # the bundled text
    check_chat_template(value)             # raises ValueError naming the fix; spec validation uses it

A spec's `chat_template` is `auto` (the most common template among the input models, read when
the tokenizer is built), one of the names below, or an inline Jinja template. The rule is
mergekit 0.1.5's: a value under 256 characters with no newline and no `{` is a name; anything
else must contain `{` and be at least 20 characters long. The texts are our own, written so that
each renders exactly what the template of the same name bundled with mergekit 0.1.5 renders
under transformers' settings (trim_blocks, lstrip_blocks), its whitespace included:
benchmarks/compare_chat_templates.py checks that against mergekit's files, and
tests/test_chat_templates.py pins the renderings.
"""

from __future__ import annotations

CHAT_TEMPLATES: dict[str, str] = {
    'alpaca': (
        "{%- set system = messages | selectattr('role', 'equalto', 'system') | list -%}\n"
        "{{- ((system | last).content | trim if system else '') ~ '\\n\\n' -}}\n"
        '{%- for message in messages -%}\n'
        "{%- set heading = {'user': '### Instruction:', 'assistant': '### Response:', 'user_context': '### Input:'}.get(message['role']) -%}\n"
        '{%- if heading -%}\n'
        "{{- heading ~ '\\n' ~ (message['content'] | trim) ~ ('' if loop.last else '\\n\\n') -}}\n"
        '{%- endif -%}\n'
        '{%- endfor -%}\n'
        "{%- if add_generation_prompt and messages[-1]['role'] != 'assistant' -%}\n"
        "{{- '### Response:\\n' -}}\n"
        '{%- endif -%}\n'
    ),
    'chatml': (
        '{%- for message in messages -%}\n'
        "{{- '<|im_start|>' ~ message['role'] ~ '\\n' ~ message['content'] ~ '<|im_end|>\\n' -}}\n"
        '{%- endfor -%}\n'
        '{%- if add_generation_prompt -%}\n'
        "{{- '<|im_start|>assistant\\n' -}}\n"
        '{%- endif -%}\n'
    ),
    'exaone': (
        '{%- for message in messages -%}\n'
        "{%- if loop.first and message['role'] != 'system' -%}\n"
        "{{- '        [|system|][|endofturn|]\\n\\n' -}}\n"
        '{%- endif -%}\n'
        "{{- '    [|' ~ message['role'] ~ '|]' ~ message['content'] ~ '\\n' -}}\n"
        "{{- '        \\n\\n' if message['role'] == 'user' else '        [|endofturn|]\\n\\n' -}}\n"
        '{%- endfor -%}\n'
        '{%- if add_generation_prompt -%}\n'
        "{{- '    [|assistant|]\\n' -}}\n"
        '{%- endif -%}\n'
    ),
    'llama3': (
        '{%- for message in messages -%}\n'
        '{%- if loop.first -%}{{- bos_token -}}{%- endif -%}\n'
        "{{- '<|start_header_id|>' ~ message['role'] ~ '<|end_header_id|>\\n\\n' ~ (message['content'] | trim) ~ '<|eot_id|>\\n' -}}\n"
        '{%- endfor -%}\n'
        '{%- if add_generation_prompt -%}\n'
        "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}\n"
        '{%- endif -%}\n'
    ),
    'mistral': (
        "{%- set has_system = messages | length > 0 and messages[0]['role'] == 'system' -%}\n"
        '{%- set turns = messages[1:] if has_system else messages -%}\n'
        '{{- bos_token -}}\n'
        '{%- for message in turns -%}\n'
        '{%- set user_turn = loop.index0 % 2 == 0 -%}\n'
        "{%- if (message['role'] == 'user') != user_turn -%}\n"
        "{{- raise_exception('After the optional system message, conversation roles must alternate user/assistant/user/assistant/...') -}}\n"
        "{%- elif message['role'] == 'user' -%}\n"
        "{{- ' [INST] ' ~ (messages[0]['content'] ~ '\\n\\n' if loop.first and has_system else '') ~ message['content'] ~ ' [/INST]' -}}\n"
        "{%- elif message['role'] == 'assistant' -%}\n"
        "{{- ' ' ~ message['content'] ~ eos_token -}}\n"
        '{%- else -%}\n'
        "{{- raise_exception('Only user and assistant roles are supported, with the exception of an initial optional system message!') -}}\n"
        '{%- endif -%}\n'
        '{%- endfor -%}\n'
    ),
}  # fmt: skip


def is_template_name(value: str) -> bool:
    """mergekit's rule: short, one line, no Jinja braces."""
    return len(value) < 256 and "\n" not in value and "{" not in value


def check_chat_template(value: str) -> str:
    """`value` if it is `auto`, a known name or a plausible inline template; else ValueError."""
    if value == "auto":
        return value
    names = ", ".join(sorted(CHAT_TEMPLATES))
    if is_template_name(value):
        if value not in CHAT_TEMPLATES:
            import difflib

            close = difflib.get_close_matches(value, list(CHAT_TEMPLATES), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"unknown chat template {value!r}{hint}; use auto, one of {names}, "
                             f"or an inline Jinja template")
        return value
    if len(value) < 20 or "{" not in value:
        raise ValueError(f"not a chat template: {value[:40]!r}; use auto, one of {names}, or an "
                         f"inline Jinja template (at least 20 characters, with {{% ... %}} or "
                         f"{{{{ ... }}}})")
    syntax_error = _jinja_syntax_error(value)
    if syntax_error:
        raise ValueError(f"the inline chat template is not valid Jinja: {syntax_error}")
    return value


def resolve_chat_template(value: str) -> str:
    """The template text for a name or an inline template (not `auto`: that needs the models)."""
    return CHAT_TEMPLATES[value] if is_template_name(value) else value


def _jinja_syntax_error(text: str) -> str | None:
    """Jinja's parse error for `text` (as transformers compiles templates), or None; None too
    where jinja2 is not installed (transformers, which renders templates, brings it)."""
    try:
        from jinja2 import TemplateSyntaxError
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        return None
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    try:
        env.parse(text)
    except TemplateSyntaxError as e:
        return f"line {e.lineno}: {e.message}"
    return None


__all__ = ["CHAT_TEMPLATES", "check_chat_template", "is_template_name", "resolve_chat_template"]
