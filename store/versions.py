"""Model folders registered with their database row, all or nothing.

A version (generator or reward model) is exported into ``models/<kind>/.incoming-*`` first,
then renamed to ``models/<kind>/<id>`` in the same transaction that inserts its row: a crash
never leaves a registered version without its folder, nor a half-written folder under a
real name.
"""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path

from sqlmodel import Session, SQLModel

from store.workspace import Workspace


def incoming_folder(parent: Path) -> Path:
    """A fresh folder under ``parent`` to export a model into before it is registered."""
    d = parent / f".incoming-{uuid.uuid4().hex[:12]}"
    d.mkdir(parents=True)
    return d


def commit_with_folder(ws: Workspace, s: Session, row: SQLModel, folder: Path, parent: Path) -> None:
    """Insert ``row`` (which has ``id`` and ``folder``), move ``folder`` to ``parent/<id>``, commit."""
    s.add(row)
    s.flush()
    final = parent / str(row.id)
    if final.exists():  # left by a transaction that rolled back after its rename
        shutil.rmtree(final)
    folder.rename(final)
    row.folder = str(final.relative_to(ws.root))
    try:
        s.commit()
    except BaseException:
        shutil.rmtree(final, ignore_errors=True)
        raise
