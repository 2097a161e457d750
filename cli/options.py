"""Click option types shared by the wsmerge commands."""

from __future__ import annotations

import click


class Interrupted(Exception):
    """Ctrl-C or SIGTERM stopped a command; `message` says what was kept (exit code 130)."""

    exit_code = 130

    def __init__(self, message: str = "interrupted; nothing was written"):
        super().__init__(message)
        self.message = message


class GreedyOption(click.Option):
    """An option that takes every value up to the next option: `--task-vectors A B C`."""

    def add_to_parser(self, parser, ctx):
        super().add_to_parser(parser, ctx)
        name = self.opts[0]
        opt = parser._long_opt.get(name) or parser._short_opt.get(name)
        previous = opt.process

        def process(value, state):
            values = [value]
            while state.rargs and not state.rargs[0].startswith("-"):
                values.append(state.rargs.pop(0))
            for v in values:
                previous(v, state)

        opt.process = process
