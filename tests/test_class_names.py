"""Class names with non-ASCII letters (``nécrose``, ``Lymphozyten-ähnlich``) wherever a class name goes.

Names are compared NFC-normalised: macOS writes folder names decomposed (``e`` + U+0301), an
editor usually composed (U+00E9); both are the same class. Through the CLI where it is cheap:
init, pathloop.toml, import-tiles, status, generation, export (CSV/Parquet read back by pandas),
and the rating app's display.
"""

from __future__ import annotations

import json
import unicodedata
import uuid

import numpy as np
import pandas as pd
import pytest
from PIL import Image as PILImage
from sqlmodel import Session, select

from pathloop.cli import main
from store.db import make_engine
from store.errors import PathloopError
from store.models import Annotator, Judgment, Tile
from store.workspace import Settings, Workspace, load_settings

CLASSES = ["nécrose", "Lymphozyten-ähnlich"]
SIZE = 16


def nfd(name: str) -> str:
    return unicodedata.normalize("NFD", name)


def cli(capsys, *args) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def crops(root, names, n=6):
    """``root/<name>/*.png`` toy tiles, one colour per class."""
    rng = np.random.default_rng(0)
    for k, name in enumerate(names):
        (root / name).mkdir(parents=True)
        for i in range(n):
            base = np.array([200, 60, 60]) if k == 0 else np.array([60, 60, 200])
            img = np.clip(base + rng.normal(0, 25, (SIZE, SIZE, 3)), 0, 255).astype(np.uint8)
            PILImage.fromarray(img).save(root / name / f"{i}.png")
    return root


@pytest.mark.parametrize("name", ["nécrose", "Lymphozyten-ähnlich", "Ödem", "некроз", "壊死", "T2.grade-3_x",
                                  nfd("nécrose")])
def test_any_script_is_a_class_name(name):
    assert Settings(classes=[name]).classes == [unicodedata.normalize("NFC", name)]


@pytest.mark.parametrize("name", ["a b", "-a", ".hidden", "a/b", "a\\b", "", "🦠", "a,b", "tumour\n"])
def test_names_that_cannot_be_a_folder_or_a_list_item_are_still_refused(name):
    with pytest.raises(PathloopError, match="class name"):
        Settings(classes=[name])


def test_composed_and_decomposed_spellings_are_one_class(tmp_path):
    with pytest.raises(PathloopError, match="repeats a name"):
        Settings(classes=["nécrose", nfd("nécrose")])
    s = Settings(classes=CLASSES)
    assert s.class_index(nfd("nécrose")) == 0
    # pathloop.toml: written as UTF-8 whatever the locale, read back the same; a decomposed
    # spelling typed into it is normalised.
    ws = Workspace.create(tmp_path / "w", s)
    assert "nécrose" in (ws.root / "pathloop.toml").read_bytes().decode("utf-8")
    assert load_settings(ws.root / "pathloop.toml") == s
    (tmp_path / "v").mkdir()
    (tmp_path / "v" / "pathloop.toml").write_bytes(
        f'classes = ["{nfd("nécrose")}", "Lymphozyten-ähnlich"]\n'.encode())
    assert Workspace.open(tmp_path / "v").settings.classes == CLASSES


def test_init_import_status_and_export_through_the_cli(tmp_path, capsys):
    ws_dir = tmp_path / "ws"
    code, out, err = cli(capsys, "init", ws_dir, "--classes", ",".join(CLASSES), "--tile-size", SIZE)
    assert code == 0, err
    assert Workspace.open(ws_dir).settings.classes == CLASSES

    code, out, err = cli(capsys, "import-tiles", "-w", ws_dir, crops(tmp_path / "crops", CLASSES))
    assert code == 0, err
    assert "nécrose 6" in out and "Lymphozyten-ähnlich 6" in out

    code, out, err = cli(capsys, "status", "--json", "-w", ws_dir)
    tiles = json.loads(out)["tiles"]
    assert code == 0 and {c: sum(v.values()) for c, v in tiles.items()} == {c: 6 for c in CLASSES}

    engine = make_engine(Workspace.open(ws_dir).database_url)
    with Session(engine) as s:
        ann = Annotator(username="ada", role="admin")
        s.add(ann)
        s.flush()
        for t in s.exec(select(Tile)).all():
            s.add(Judgment(tile_id=t.id, annotator_id=ann.id, verdict="plausible", request_id=uuid.uuid4().hex,
                           comment="Zellkern vergrößert"))
        s.commit()
    engine.dispose()

    for fmt, read in [("csv", pd.read_csv), ("parquet", pd.read_parquet),
                      ("jsonl", lambda p: pd.read_json(p, lines=True))]:
        out_file = tmp_path / f"j.{fmt}"
        code, out, err = cli(capsys, "export", "judgments", "--format", fmt, "--out", out_file, "-w", ws_dir)
        assert code == 0, err
        df = read(out_file)
        assert sorted(df["class_name"].unique()) == sorted(CLASSES), fmt
        assert set(df["comment"]) == {"Zellkern vergrößert"}, fmt


def test_import_tiles_from_folders_named_on_a_mac(tmp_path, capsys):
    """Folder names in NFD (as macOS writes them) are the pathloop.toml classes.

    Needs store/ingest.py to NFC-normalise ``class_dir.name`` (store.workspace.class_key).
    """
    ws_dir = tmp_path / "ws"
    assert cli(capsys, "init", ws_dir, "--classes", ",".join(CLASSES), "--tile-size", SIZE)[0] == 0
    folder = crops(tmp_path / "crops", [nfd(c) for c in CLASSES])
    code, out, err = cli(capsys, "import-tiles", "-w", ws_dir, folder)
    assert code == 0, err
    engine = make_engine(Workspace.open(ws_dir).database_url)
    with Session(engine) as s:
        stored = set(s.exec(select(Tile.class_name)).all())
    engine.dispose()
    assert stored == set(CLASSES)  # stored composed, so they match pathloop.toml and each other


def test_generate_and_export_samples_with_accented_classes(tmp_path, capsys):
    from finetune.config import PretrainConfig
    from finetune.pretrain import pretrain
    from store.ingest import import_tiles

    ws = Workspace.create(tmp_path / "ws", Settings(classes=CLASSES, tile_size=SIZE))
    engine = make_engine(ws.database_url)
    from store.db import upgrade

    upgrade(engine)
    import_tiles(ws, engine, crops(tmp_path / "crops", CLASSES))
    pretrain(ws, engine, PretrainConfig(train_steps=1, train_batch_size=4, train_lr_warmup_steps=0,
                                        checkpoint_every=1), progress=False)
    engine.dispose()
    # --classes typed in the decomposed form still names the class
    code, out, err = cli(capsys, "generate", "-w", ws.root, "--model", "latest", "--per-class", 2, "--steps", 2,
                         "--classes", nfd("nécrose"))
    assert code == 0, err
    assert "2 samples generated" in out
    code, out, err = cli(capsys, "generate", "-w", ws.root, "--model", "latest", "--per-class", 1, "--steps", 2)
    assert code == 0, err
    shared = tmp_path / "shared"
    code, out, err = cli(capsys, "export", "samples", "-w", ws.root, "--out", shared)
    assert code == 0, err
    manifest = pd.read_csv(shared / "manifest.csv")
    assert manifest["class_name"].value_counts().to_dict() == {"nécrose": 2, "Lymphozyten-ähnlich": 1}
    assert {p.name for p in shared.iterdir() if p.is_dir()} == set(CLASSES)
    assert all((shared / f).is_file() for f in manifest["file"])


def test_the_rating_app_shows_accented_classes(tmp_path, monkeypatch):
    from rating_workspace import PASSWORDS, build_workspace
    from streamlit.testing.v1 import AppTest
    from test_app import APP, TIMEOUT, assert_no_errors, button, shown_class

    from store.models import Image, Sample

    ws, engine = build_workspace(tmp_path / "ws", n_samples=0, classes=CLASSES)
    rng = np.random.default_rng(3)
    with Session(engine) as s:
        from store.models import GeneratorVersion

        gv = GeneratorVersion(folder="models/generators/9", kind="imported")
        s.add(gv)
        s.flush()
        for i in range(4):
            enc, rel, _ = ws.images.put_array(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
            image = Image(sha256=enc.sha256, width=enc.width, height=enc.height, path=rel)
            s.add(image)
            s.flush()
            s.add(Sample(image_id=image.id, generator_id=gv.id, class_name=CLASSES[i % 2], seed=i, sampler="ddpm",
                         steps=2))
        s.commit()
    monkeypatch.setenv("PATHLOOP_WORKSPACE", str(ws.root))
    at = AppTest.from_file(str(APP), default_timeout=TIMEOUT).run()
    at.text_input(key="sign_in_username").input("alice")
    at.text_input(key="sign_in_password").input(PASSWORDS["alice"])
    at = button(at, "Sign in").click().run()
    assert_no_errors(at)
    assert shown_class(at) in CLASSES
    engine.dispose()
