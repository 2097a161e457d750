"""The one place a `~` in a path is expanded.

    p = expand_user("~/models/base")      # Path("/home/me/models/base")

`Path.expanduser` raises a bare RuntimeError ("Could not determine home directory") for
`~nosuchuser/m` or a `~` without HOME; here that is a SpecError naming the path, which the
caller prefixes with the spec field or option it came from.
"""

from __future__ import annotations

from pathlib import Path

from weightspace.errors import SpecError


def expand_user(path: str | Path) -> Path:
    """`path` with a leading `~` or `~user` expanded; a SpecError when there is no such home."""
    p = Path(path)
    try:
        return p.expanduser()
    except RuntimeError:
        head = str(path).split("/", 1)[0]
        why = "no such user" if head != "~" else "no home directory is known (HOME is not set)"
        raise SpecError(f"{str(path)[:200]!r}: cannot expand {head[:100]!r}: {why}") from None


__all__ = ["expand_user"]
