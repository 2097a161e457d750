"""wsmerge: merge, inspect and generate neural-network weights.

The command group and the entry point; each command lives in a module of its own
(weightspace.cli.run, .info, .demo, .zoo, ...), which never imports this one.

Exit codes: 0 ok, 1 runtime failure, 2 bad spec or usage. Tracebacks are
shown only with -v or WSMERGE_DEBUG=1.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import warnings

import click

from weightspace.cli.align import align
from weightspace.cli.atlas import atlas
from weightspace.cli.demo import demo
from weightspace.cli.eval import eval_
from weightspace.cli.evolve import evolve
from weightspace.cli.generate import generate
from weightspace.cli.hub import upload
from weightspace.cli.info import inspect, methods
from weightspace.cli.learngene import learngene
from weightspace.cli.lora import lora
from weightspace.cli.moe import moe
from weightspace.cli.options import DEBUG_ENV, Group, Interrupted
from weightspace.cli.run import run
from weightspace.cli.rws import rws
from weightspace.cli.stats import fisher, gram
from weightspace.cli.zoo import zoo
from weightspace.errors import WeightspaceError
from weightspace.memory import release_freed_buffers
from weightspace.threads import prefer_passive_waits


def _debug() -> bool:
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


@click.group(cls=Group)
@click.version_option(package_name="weightspace", prog_name="wsmerge")
def wsmerge() -> None:
    """Merge, inspect and generate neural-network weights.

    \b
    Start here (from the repository root; outputs go under runs/):
      wsmerge demo                                  tiny models merged 6 ways, in wsmerge-demo/
      wsmerge methods                               every merge method, its parameters and defaults
      wsmerge run examples/ties.yaml runs/ties      run a YAML merge spec (mergekit's schema)
      wsmerge run examples/ties.yaml --dry-run      the plan only: tensors, bytes, peak memory
      wsmerge inspect runs/ties --vs examples/models/base   structure, dtypes, cosine per tensor
      wsmerge upload runs/ties my-org/tiny-ties     push a result to the Hub (token: HF_TOKEN)

    More commands, each with examples in its --help: zoo (populations of small
    trained models), fisher and gram (statistics for data-aware merges), atlas
    (learned task-vector coefficients), align (permutation alignment), rws
    (robust weight signatures), learngene (genes that grow networks of any
    depth), generate (weight generators), lora (extract a LoRA adapter from a
    fine-tune, merge adapters in adapter space), moe (a mixture of experts
    from dense fine-tunes), eval (perplexity and accuracy of a merged LM) and
    evolve (evolutionary search over a merge spec's values, fanned out on Ray).

    Exit codes: 0 ok, 1 runtime failure, 2 bad spec or usage, 130 interrupted.
    Pass -v after any command (or set WSMERGE_DEBUG=1) to see tracebacks.
    """


for _command in (run, inspect, methods, demo, align, zoo, fisher, gram, atlas, rws, learngene, generate,
                 upload, lora, moe, eval_, evolve):
    wsmerge.add_command(_command)


def show_click_error(e: click.ClickException) -> None:
    """Click's own errors in our style: its usage line and hint, then `error: ...` like every other error."""
    if isinstance(e, click.exceptions.NoArgsIsHelpError):  # `wsmerge zoo` alone: the help, not an error
        e.show()
        return
    ctx = getattr(e, "ctx", None)
    if isinstance(e, click.UsageError) and ctx is not None:
        hint = ""
        if ctx.command.get_help_option(ctx) is not None:
            names = ctx.command.get_help_option_names(ctx)
            hint = f"Try '{ctx.command_path} {max(names, key=len)}' for help.\n"
        click.echo(f"{ctx.get_usage()}\n{hint}", err=True, color=ctx.color)
    click.echo(f"error: {e.format_message()}", err=True)


# a signal that ends a run the way Ctrl-C does: the temporary output removed, exit 130
_STOP_SIGNALS = tuple(getattr(signal, n) for n in ("SIGTERM", "SIGHUP") if hasattr(signal, n))


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Python warnings on the command line: one `warning: ...` line, without the source line."""
    with contextlib.suppress(OSError):
        click.echo(f"warning: {message}", err=True)


def main(argv: list[str] | None = None) -> int:
    """Entry point with our exit codes and error style."""

    def _term(signum, frame):  # SIGTERM, or SIGHUP (the terminal went away): a clean, atomic abort
        raise KeyboardInterrupt

    old_debug = os.environ.get(DEBUG_ENV)
    old_handlers = {}
    for sig in _STOP_SIGNALS:
        try:
            if signal.getsignal(sig) is signal.SIG_IGN:  # started under nohup: keep ignoring it
                continue
            old_handlers[sig] = signal.signal(sig, _term)
        except ValueError:  # not the main thread (tests)
            break
    old_showwarning = warnings.showwarning
    warnings.showwarning = _show_warning
    try:
        # standalone_mode=False: click returns the code of a `ctx.exit(code)` / Exit(code) instead of
        # exiting, and the command's return value (None) otherwise
        rv = wsmerge.main(args=argv, prog_name="wsmerge", standalone_mode=False)
        return rv if isinstance(rv, int) and not isinstance(rv, bool) else 0
    except click.exceptions.Exit as e:
        return e.exit_code
    except click.ClickException as e:
        show_click_error(e)
        return e.exit_code
    except Interrupted as e:
        click.echo(e.message, err=True)
        return e.exit_code
    except (click.exceptions.Abort, KeyboardInterrupt):
        with contextlib.suppress(OSError):  # after SIGHUP the terminal may be gone
            click.echo("interrupted; nothing was written", err=True)
        return Interrupted.exit_code
    except WeightspaceError as e:
        if _debug():
            import traceback

            traceback.print_exc()
        click.echo(f"error: {e}", err=True)
        return e.exit_code
    except Exception as e:  # noqa: BLE001 - last resort, keep the one-line style
        if _debug():
            import traceback

            traceback.print_exc()
        click.echo(f"error: {type(e).__name__}: {e} (set {DEBUG_ENV}=1 for a traceback)", err=True)
        return 1
    finally:
        for sig, old in old_handlers.items():
            signal.signal(sig, old)
        warnings.showwarning = old_showwarning
        if old_debug is None:
            os.environ.pop(DEBUG_ENV, None)
        else:
            os.environ[DEBUG_ENV] = old_debug


def entry() -> None:
    prefer_passive_waits()   # before torch loads: OpenMP workers that do not spin on a busy machine
    release_freed_buffers()  # the console script's process: peak memory flat in model size
    sys.exit(main())


if __name__ == "__main__":
    entry()
