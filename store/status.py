"""Counts of what a workspace holds, for ``pathloop status``."""

from __future__ import annotations

from sqlalchemy import func
from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from store.judgments import is_current
from store.models import (
    SPLITS,
    Annotator,
    GeneratorVersion,
    Judgment,
    RewardVersion,
    Round,
    Sample,
    Slide,
    Tile,
)


def workspace_status(engine: Engine, classes: list[str]) -> dict:
    """Slides, tiles per class and split, samples per class, judgments and versions."""
    with Session(engine) as s:
        def count(model) -> int:
            return s.exec(select(func.count()).select_from(model)).one()

        tiles = {c: {sp: 0 for sp in SPLITS} for c in classes}
        for cls, split, n in s.exec(select(Tile.class_name, Tile.split, func.count()).group_by(
                Tile.class_name, Tile.split)).all():
            tiles.setdefault(cls, {sp: 0 for sp in SPLITS})[split] = n
        samples = {c: 0 for c in classes}
        for cls, n in s.exec(select(Sample.class_name, func.count()).group_by(Sample.class_name)).all():
            samples[cls] = n
        current = s.exec(select(func.count()).select_from(Judgment).where(is_current())).one()
        return {
            "slides": count(Slide),
            "tiles": tiles,
            "tiles_total": sum(sum(v.values()) for v in tiles.values()),
            "samples": samples,
            "samples_total": sum(samples.values()),
            "judgments": count(Judgment),
            "judgments_current": current,
            "annotators": count(Annotator),
            "generator_versions": count(GeneratorVersion),
            "reward_versions": count(RewardVersion),
            "rounds": count(Round),
        }


def format_status(st: dict, workspace: str, database: str) -> str:
    """The status as an aligned console table."""
    lines = [f"workspace  {workspace}", f"database   {database}", ""]
    width = max([len("class")] + [len(c) for c in st["tiles"]])
    lines.append(f"{'class':<{width}}  {'train':>7} {'val':>7} {'test':>7} {'tiles':>7} {'samples':>8}")
    for cls, splits in st["tiles"].items():
        lines.append(
            f"{cls:<{width}}  {splits['train']:>7} {splits['val']:>7} {splits['test']:>7} "
            f"{sum(splits.values()):>7} {st['samples'].get(cls, 0):>8}"
        )
    lines.append(f"{'all':<{width}}  {'':>7} {'':>7} {'':>7} {st['tiles_total']:>7} {st['samples_total']:>8}")
    lines.append("")
    lines.append(
        f"slides {st['slides']}   judgments {st['judgments_current']} current ({st['judgments']} rows)   "
        f"annotators {st['annotators']}"
    )
    lines.append(
        f"generator versions {st['generator_versions']}   reward versions {st['reward_versions']}   "
        f"rounds {st['rounds']}"
    )
    return "\n".join(lines)
