"""Click classes and options shared by every wsmerge command.

    @click.group(cls=Group)              # subcommands become Commands, subgroups Groups
    def tool(): ...

    @tool.command()
    @device_option                       # --device auto|cpu|cuda|cuda:N, resolved once
    def train(device: str): ...          # device is "cpu", "cuda" or "cuda:N"

Every Command and Group takes -v/--verbose wherever its own options go
(`wsmerge -v run ...` and `wsmerge run ... -v` alike), so no command declares it.
"""

from __future__ import annotations

import os

import click

DEBUG_ENV = "WSMERGE_DEBUG"
CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


class Interrupted(Exception):
    """Ctrl-C or SIGTERM stopped a command; `message` says what was kept (exit code 130)."""

    exit_code = 130

    def __init__(self, message: str = "interrupted; nothing was written"):
        super().__init__(message)
        self.message = message


def _set_verbose(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    if value:
        os.environ[DEBUG_ENV] = "1"


def _verbose_option() -> click.Option:
    return click.Option(["-v", "--verbose"], is_flag=True, expose_value=False, is_eager=True,
                        callback=_set_verbose,
                        help=f"Show tracebacks and per-tensor detail (or set {DEBUG_ENV}=1).")


class _Verbose:
    """Adds -v/--verbose to a command's own options."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.params.append(_verbose_option())


class Command(_Verbose, click.Command):
    """A wsmerge command."""


class Group(_Verbose, click.Group):
    """A wsmerge command group: its commands are `Command`s and its groups `Group`s."""

    command_class = Command
    group_class = type

    def __init__(self, *args, context_settings: dict | None = None, **kwargs):
        super().__init__(*args, context_settings={**CONTEXT_SETTINGS, **(context_settings or {})}, **kwargs)


def _resolve_device(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value is None or ctx.resilient_parsing:
        return value
    from weightspace.executor import resolve_device

    return str(resolve_device(value))


DEVICE_HELP = "Where the math runs: auto (cuda when available, else cpu), cpu, cuda or cuda:N."
device_option = click.option("--device", default="auto", show_default=True, callback=_resolve_device,
                             help=DEVICE_HELP)


def check_plot(plot: object) -> None:
    """Before any work: a --plot needs matplotlib (the plot extra)."""
    if plot is not None:
        from weightspace.extras import pyplot

        pyplot()


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
