"""Reading the TOML files that configure a workflow (learn, hpo): one reader, so that
every config names the file, the section and what to do in the same way."""

from __future__ import annotations

import os
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def read_sections(
    path: str | os.PathLike[str], what: str, sections: Sequence[str]
) -> dict[str, dict[str, Any]]:
    """Every one of ``sections`` of the TOML file ``path`` as a dict (empty where absent).

    ValueError naming the file for a file that cannot be read or parsed, a section not in
    ``sections`` and a section that is not a table; ``what`` names the file's kind in
    the message ("learn config")."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ValueError(f"{path}: cannot read the {what} ({exc})") from exc
    unknown = sorted(set(raw) - set(sections))
    if unknown:
        allowed = ", ".join(f"[{name}]" for name in sections)
        raise ValueError(f"{path}: unknown sections {unknown}; use {allowed}")
    tables = {}
    for name in sections:
        table = raw.get(name, {})
        if not isinstance(table, dict):
            raise ValueError(f"{path}: [{name}] must be a table")
        tables[name] = dict(table)
    return tables
