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
    """A wsmerge command; its `GreedyOption`s also take a list after one flag."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        return super().parse_args(ctx, spread_greedy_values(self.get_params(ctx), args))


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
    """A repeatable option that also takes every value up to the next option.

        @tool.command()                                   # a wsmerge Command (any Group's command)
        @click.option("--task-vectors", cls=GreedyOption)
        def learn(task_vectors: tuple[str, ...]): ...

    `--task-vectors A B C` and `--task-vectors A --task-vectors B --task-vectors C`
    give the same tuple. Click has no such option (`nargs=-1` is for arguments
    only), so `Command.parse_args` spreads the list into repeated flags before
    click parses the command line (`spread_greedy_values`); the option itself
    is an ordinary `multiple=True` option.
    """

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("multiple", True)
        super().__init__(*args, **kwargs)
        if not self.multiple or self.nargs != 1 or self.is_flag:
            raise TypeError(f"GreedyOption {self.opts[0]}: must be a multiple=True option of one value each")

    def add_to_parser(self, parser, ctx: click.Context) -> None:
        if not isinstance(ctx.command, Command):
            raise TypeError(f"GreedyOption {self.opts[0]} needs a wsmerge Command "
                            f"(@click.command(cls=weightspace.cli.options.Command)) to take a list")
        super().add_to_parser(parser, ctx)


def spread_greedy_values(params: list[click.Parameter], args: list[str]) -> list[str]:
    """`--tasks A B --data D` -> `--tasks A --tasks B --data D` for every GreedyOption in `params`.

    A greedy flag takes the next token as its value (as click does), then every
    following token that does not start with "-". Values of the command's other
    options are passed over, so a value that reads like a greedy flag stays a
    value; after "--" nothing is touched.
    """
    greedy = {name for p in params if isinstance(p, GreedyOption) for name in p.opts}
    if not greedy:
        return args
    takes = {name: p.nargs for p in params if isinstance(p, click.Option) and not p.is_flag
             and not p.count for name in p.opts}
    out: list[str] = []
    i = 0
    while i < len(args):
        token = args[i]
        if token == "--":
            return out + args[i:]
        name = token.split("=", 1)[0] if token.startswith("--") else token
        if name in greedy:
            n = 1 if "=" in token else 2                    # the flag, and its value unless attached
            out += args[i:i + n]
            i += n
            while i < len(args) and not args[i].startswith("-"):
                out += [name, args[i]]
                i += 1
            continue
        n = 1 + takes.get(token, 0)                         # another option's values, verbatim
        out += args[i:i + n]
        i += n
    return out
