"""Argument parsers the subcommands share: ranks, ``NAME=VALUE`` lists, the output directory."""
from __future__ import annotations

import os
from pathlib import Path

from mass.tools.cli.errors import UserError


def parse_rank(text: str | None):
    """``--rank``: None, an int (k per matrix) or a float (a fraction of min(out, in))."""
    if text is None:
        return None
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            raise UserError(f"--rank must be an int or a fraction, got {text!r}") from None


def parse_pairs(items: list[str], flag: str = "--finetuned") -> dict[str, str]:
    """``NAME=VALUE`` items (``--finetuned``, ``--data``, ``--support``...) as a dict; a name given twice or an
    item without ``=`` is refused, naming ``flag``."""
    out = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise UserError(f"{flag} takes NAME=PATH, got {item!r}")
        if name in out:
            raise UserError(f"task {name!r} given twice")
        out[name] = path
    return out


def check_out(path: str) -> None:
    """Fail before the merge, not after it, when ``--out`` cannot become a directory we can write."""
    p = Path(path).absolute()
    if p.exists() and not p.is_dir():
        raise UserError(f"--out {path} exists and is not a directory")
    existing = next(a for a in [p, *p.parents] if a.exists())
    if not existing.is_dir():
        raise UserError(f"--out {path}: {existing} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"--out {path}: {existing} is not writable")
