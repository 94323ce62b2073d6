"""The workspace folder and its settings: ``pathloop.toml`` → one ``Settings`` dataclass.

A workspace holds everything a lab owns: ``pathloop.toml``, the SQLite database (unless
``database_url`` points at PostgreSQL), ``images/`` (content-addressed PNGs), ``models/``
(generator and reward versions) and ``runs/`` (logs and checkpoints).
"""

from __future__ import annotations

import contextlib
import os
import tomllib
import unicodedata
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
MAX_REFERENCE_TILES = 12


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
    reference_tiles: int = 4
    database_url: str = ""

    def __post_init__(self) -> None:
        check_classes(self.classes)
        self.classes = [class_key(c) for c in self.classes]
        if not _whole(self.tile_size) or not 8 <= self.tile_size <= 4096 or self.tile_size % 8:
            raise PathloopError(f"tile_size = {self.tile_size!r}; expected a multiple of 8 from 8 to 4096")
        if not _whole(self.overlap) or self.overlap < 1:
            raise PathloopError(f"overlap = {self.overlap!r}; expected a whole number of ratings >= 1")
        if not _number(self.control_share) or not 0 <= self.control_share < 1:
            raise PathloopError(f"control_share = {self.control_share!r}; expected a share from 0 to below 1")
        if not _number(self.lease_minutes) or not 0 < self.lease_minutes < float("inf"):
            raise PathloopError(f"lease_minutes = {self.lease_minutes!r}; expected minutes > 0")
        if not _whole(self.round_min_judgments) or self.round_min_judgments < 1:
            raise PathloopError(
                f"round_min_judgments = {self.round_min_judgments!r}; expected a whole number >= 1"
            )
        if not _whole(self.reference_tiles) or not 0 <= self.reference_tiles <= MAX_REFERENCE_TILES:
            raise PathloopError(
                f"reference_tiles = {self.reference_tiles!r}; expected a whole number from 0 (off) to {MAX_REFERENCE_TILES}"
            )
        if not isinstance(self.criteria, list) or not all(isinstance(c, str) and c for c in self.criteria):
            raise PathloopError("criteria: expected a list of non-empty strings")
        if not isinstance(self.database_url, str):
            raise PathloopError(f"database_url = {self.database_url!r}; expected a URL in quotes, or \"\" for SQLite")

    def class_index(self, name: str) -> int:
        """Position of a class in ``classes``; a clear error for an unknown one."""
        key = class_key(name) if isinstance(name, str) else name
        if key not in self.classes:
            raise PathloopError(f"unknown class {name!r}; expected one of: {', '.join(self.classes)}")
        return self.classes.index(key)


def _whole(v) -> bool:
    """An int in the TOML sense: ``true`` is not 1."""
    return isinstance(v, int) and not isinstance(v, bool)


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def class_key(name: str) -> str:
    """A class name as pathloop stores and compares it: NFC-normalised Unicode.

    The same accented name can arrive composed (``é``, most editors) or decomposed (``e`` plus
    a combining accent: folder names written on macOS); both mean one class.
    """
    return unicodedata.normalize("NFC", name)


def _class_name_ok(name: str) -> bool:
    """Letters and digits of any script, then also '_', '-', '.' and combining marks."""
    if not name or unicodedata.category(name[0])[0] not in "LN":
        return False
    return all(unicodedata.category(ch)[0] in "LNM" or ch in "_-." for ch in name)


def check_classes(classes) -> None:
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        raise PathloopError(f"classes = {classes!r}; expected a list of class names")
    for c in classes:
        if not _class_name_ok(class_key(c)):
            raise PathloopError(f"class name {c!r}: expected a letter or digit, then letters, digits, '_', '-' or '.'")
    keys = [class_key(c) for c in classes]
    if len(set(keys)) != len(keys):
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

# Real train-split tiles of the shown class beside the tile being rated, for calibration
# (the same ones every time for a class; 0 turns the strip off).
reference_tiles = {s.reference_tiles}

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
        if root.exists() and not root.is_dir():
            raise PathloopError(f"workspace {root} is a file, not a folder; pass the workspace folder")
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
        above = next((a for a in root.parents if a.exists()), None)
        if above is not None and not above.is_dir():
            raise PathloopError(f"cannot create workspace {root}: {above} is a file, not a folder")
        made: list[Path] = []  # folders this call created, removed again if it fails
        tmp = root / (SETTINGS_FILE + ".tmp")
        try:
            for folder in [*reversed([a for a in root.parents if not a.exists()]), root, *(root / n for n in FOLDERS)]:
                if not folder.is_dir():
                    folder.mkdir()
                    made.append(folder)
            tmp.write_text(settings_text(settings), encoding="utf-8")
            os.replace(tmp, root / SETTINGS_FILE)
        except OSError as e:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
                for folder in reversed(made):
                    folder.rmdir()
            raise PathloopError(f"cannot create workspace {root}: {e.strerror or e}") from None
        return cls(root, settings)


def load_settings(toml: Path) -> Settings:
    try:
        raw = tomllib.loads(toml.read_text(encoding="utf-8-sig"))
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
