"""The workspace folder and its settings: ``pathloop.toml`` → one ``Settings`` dataclass.

A workspace holds everything a lab owns: ``pathloop.toml``, the SQLite database (unless
``database_url`` points at PostgreSQL), ``images/`` (content-addressed PNGs), ``models/``
(generator and reward versions) and ``runs/`` (logs and checkpoints).
"""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path

from store.errors import PathloopError
from store.images import ImageStore

SETTINGS_FILE = "pathloop.toml"
SQLITE_FILE = "pathloop.db"
FOLDERS = ("images", "models", "runs")
ENV_WORKSPACE = "PATHLOOP_WORKSPACE"
ENV_DATABASE_URL = "PATHLOOP_DATABASE_URL"

# The checklist of Sun et al. (NeurIPS 2023) for judging a synthetic tile implausible.
DEFAULT_CRITERIA = [
    "cell/structure size",
    "nuclear shape",
    "chromatin pattern",
    "cytoplasm colour",
    "granules",
    "inclusions",
    "staining",
    "artefact",
    "wrong class",
]

_CLASS_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")


@dataclass
class Settings:
    """What ``pathloop.toml`` holds; every field has a default but ``classes``."""

    classes: list[str] = field(default_factory=list)
    tile_size: int = 256
    criteria: list[str] = field(default_factory=lambda: list(DEFAULT_CRITERIA))
    overlap: int = 2
    control_share: float = 0.1
    lease_minutes: float = 10.0
    round_min_judgments: int = 200
    database_url: str = ""

    def __post_init__(self) -> None:
        check_classes(self.classes)
        if not isinstance(self.tile_size, int) or not 8 <= self.tile_size <= 4096 or self.tile_size % 8:
            raise PathloopError(f"tile_size = {self.tile_size!r}; expected a multiple of 8 from 8 to 4096")
        if not isinstance(self.overlap, int) or self.overlap < 1:
            raise PathloopError(f"overlap = {self.overlap!r}; expected a whole number of ratings >= 1")
        if not isinstance(self.control_share, (int, float)) or not 0 <= self.control_share < 1:
            raise PathloopError(f"control_share = {self.control_share!r}; expected a share from 0 to below 1")
        if not isinstance(self.lease_minutes, (int, float)) or self.lease_minutes <= 0:
            raise PathloopError(f"lease_minutes = {self.lease_minutes!r}; expected minutes > 0")
        if not isinstance(self.round_min_judgments, int) or self.round_min_judgments < 1:
            raise PathloopError(
                f"round_min_judgments = {self.round_min_judgments!r}; expected a whole number >= 1"
            )
        if not isinstance(self.criteria, list) or not all(isinstance(c, str) and c for c in self.criteria):
            raise PathloopError("criteria: expected a list of non-empty strings")

    def class_index(self, name: str) -> int:
        """Position of a class in ``classes``; a clear error for an unknown one."""
        if name not in self.classes:
            raise PathloopError(f"unknown class {name!r}; expected one of: {', '.join(self.classes)}")
        return self.classes.index(name)


def check_classes(classes) -> None:
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        raise PathloopError(f"classes = {classes!r}; expected a list of class names")
    for c in classes:
        if not _CLASS_NAME.match(c):
            raise PathloopError(f"class name {c!r}: expected letters, digits, '_', '-' or '.'")
    if len(set(classes)) != len(classes):
        raise PathloopError(f"classes = {classes!r} repeats a name")


def settings_text(s: Settings) -> str:
    """A ``pathloop.toml`` with every setting written out and commented."""
    def q(v: str) -> str:
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'

    classes = ", ".join(q(c) for c in s.classes)
    criteria = "".join(f"    {q(c)},\n" for c in s.criteria)
    db = f"database_url = {q(s.database_url)}" if s.database_url else '# database_url = "postgresql+psycopg://user@host:5432/pathloop"'
    return f"""# pathloop workspace settings. Edit and rerun; every command reads this file.

# Tile classes, in the order models see them. Ingest refuses a class not listed here.
classes = [{classes}]

# Edge of every stored tile in pixels (real and synthetic); generators are sized from it.
tile_size = {s.tile_size}

# The checklist raters tick when they call a tile implausible (Sun et al., NeurIPS 2023).
criteria = [
{criteria}]

# Ratings wanted per synthetic tile before it leaves the queue.
overlap = {s.overlap}

# Share of real control tiles mixed blind into each rater's queue (0 to turn off).
control_share = {s.control_share}

# How long a tile stays reserved for the rater it was shown to.
lease_minutes = {s.lease_minutes}

# New judgments since the last reward model that make the next round due.
round_min_judgments = {s.round_min_judgments}

# Database. Empty: SQLite in this folder ({SQLITE_FILE}). $PATHLOOP_DATABASE_URL overrides.
{db}
"""


class Workspace:
    """An opened workspace folder: its settings, database URL and file areas."""

    def __init__(self, root: Path, settings: Settings):
        self.root = root
        self.settings = settings
        self.images = ImageStore(root)

    @property
    def database_url(self) -> str:
        env = os.environ.get(ENV_DATABASE_URL, "").strip()
        if env:
            return env
        if self.settings.database_url:
            return self.settings.database_url
        return f"sqlite:///{self.root / SQLITE_FILE}"

    @property
    def models_dir(self) -> Path:
        return self.root / "models"

    @property
    def runs_dir(self) -> Path:
        return self.root / "runs"

    @classmethod
    def open(cls, path: str | os.PathLike | None = None) -> Workspace:
        """Open the workspace at ``path``, else ``$PATHLOOP_WORKSPACE``, else the current folder."""
        root = Path(path or os.environ.get(ENV_WORKSPACE) or ".").expanduser().resolve()
        if not root.is_dir():
            raise PathloopError(f"workspace {root} does not exist; create it with `pathloop init {root}`")
        toml = root / SETTINGS_FILE
        if not toml.is_file():
            raise PathloopError(
                f"{root} is not a pathloop workspace (no {SETTINGS_FILE}); "
                f"create one with `pathloop init DIR` or pass --workspace"
            )
        return cls(root, load_settings(toml))

    @classmethod
    def create(cls, path: str | os.PathLike, settings: Settings) -> Workspace:
        """Write ``pathloop.toml`` and the folders; refuse to overwrite an existing workspace."""
        root = Path(path).expanduser().resolve()
        if (root / SETTINGS_FILE).exists():
            raise PathloopError(f"{root} is already a pathloop workspace ({SETTINGS_FILE} exists)")
        if root.exists() and not root.is_dir():
            raise PathloopError(f"{root} exists and is not a folder")
        root.mkdir(parents=True, exist_ok=True)
        for name in FOLDERS:
            (root / name).mkdir(exist_ok=True)
        tmp = root / (SETTINGS_FILE + ".tmp")
        tmp.write_text(settings_text(settings))
        os.replace(tmp, root / SETTINGS_FILE)
        return cls(root, settings)


def load_settings(toml: Path) -> Settings:
    try:
        raw = tomllib.loads(toml.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise PathloopError(f"{toml} is not valid TOML: {e}") from None
    known = {f.name for f in fields(Settings)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise PathloopError(
            f"{toml}: unknown setting {unknown[0]!r}; expected one of: {', '.join(sorted(known))}"
        )
    try:
        return Settings(**raw)
    except PathloopError as e:
        raise PathloopError(f"{toml}: {e}") from None
