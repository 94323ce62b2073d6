"""`pathloop export pairs|binary`: feedback as Parquet in the layouts Diffusion-DPO / Diffusion-KTO code reads.

Read back with pandas and with ``datasets`` the way diffusers' train_diffusion_dpo.py does
(``Image.open(io.BytesIO(example["jpg_0"]))``, ``example["label_0"]``, ``example["caption"]``).
"""

from __future__ import annotations

import io
import itertools

import numpy as np
import pandas as pd
import pytest
from PIL import Image as PILImage
from rating_workspace import add_samples, build_workspace
from sqlmodel import Session, select

from pathloop.cli import main
from store.export import BINARY_COLUMNS, PAIR_COLUMNS
from store.models import Annotator, Image, Judgment, Sample

_ids = itertools.count()


def _judge(s, sample_id, annotator_id, verdict, supersedes=None):
    j = Judgment(sample_id=sample_id, annotator_id=annotator_id, verdict=verdict, request_id=f"r{next(_ids)}",
                 supersedes_id=supersedes)
    s.add(j)
    s.flush()
    return j.id


@pytest.fixture(scope="module")
def place(tmp_path_factory):
    """Generator A: 8 samples (classes alternate: even dab_negative, odd dab_positive); generator B: 3.

    Current majority verdicts with 2+ ratings — A/negative: a0, a6 plausible, a2 implausible (an
    edit flipped it), a4 a tie; A/positive: a3 plausible, a1 implausible, a5 plausible on one
    rating only, a7 only unsure. B/negative: b0 plausible, b2 implausible; B/positive: b1 implausible.
    """
    root = tmp_path_factory.mktemp("feedback")
    ws, engine = build_workspace(root / "ws", n_samples=8)
    b = add_samples(ws, engine, 3)
    with Session(engine) as s:
        users = {u.username: u.id for u in s.exec(select(Annotator)).all()}
        al, ca, bo = users["alice"], users["carol"], users["boss"]
        a = [x.id for x in s.exec(select(Sample).where(Sample.id.not_in(b)).order_by(Sample.id)).all()]
        votes = {a[0]: "PP", a[1]: "II", a[3]: "PP", a[4]: "PI", a[5]: "P", a[6]: "PPI", a[7]: "UU",
                 b[0]: "PP", b[1]: "II", b[2]: "II"}
        for sid, vs in votes.items():
            for who, v in zip((al, ca, bo), vs, strict=False):
                _judge(s, sid, who, {"P": "plausible", "I": "implausible", "U": "unsure"}[v])
        first = _judge(s, a[2], al, "plausible")
        _judge(s, a[2], al, "implausible", supersedes=first)
        _judge(s, a[2], ca, "implausible")
        paths = dict(s.exec(select(Sample.id, Image.path).join(Image, Image.id == Sample.image_id)).all())
        gens = dict(s.exec(select(Sample.id, Sample.generator_id)).all())
        classes = dict(s.exec(select(Sample.id, Sample.class_name)).all())
        s.commit()
    engine.dispose()
    pixels = {sid: np.asarray(PILImage.open(ws.root / p).convert("RGB")) for sid, p in paths.items()}
    return {"root": ws.root, "a": a, "b": b, "pixels": pixels, "gens": gens, "classes": classes}


def _run(capsys, *args):
    code = main([str(x) for x in args])
    out, err = capsys.readouterr()
    return code, out, err


def _nearest(pixels, data: bytes) -> int:
    """The sample whose stored pixels a decoded (lossy) image is closest to."""
    with PILImage.open(io.BytesIO(data)) as im:
        assert im.format == "JPEG" and im.size == (32, 32)
        rgb = np.asarray(im.convert("RGB")).astype(float)
    return min(pixels, key=lambda sid: np.abs(pixels[sid] - rgb).mean())


def test_pairs_round_trip_in_the_pick_a_pic_layout(place, tmp_path, capsys):
    a, b = place["a"], place["b"]
    out = tmp_path / "pairs.parquet"
    code, stdout, err = _run(capsys, "export", "pairs", "-w", place["root"], "--out", out)
    assert code == 0, err
    assert stdout.strip() == f"wrote 4 preference pairs to {out}"
    assert [p.name for p in tmp_path.iterdir()] == ["pairs.parquet"]  # no temporary file left

    df = pd.read_parquet(out)
    assert list(df.columns) == PAIR_COLUMNS and len(df) == 4
    assert df["label_0"].dtype == np.float64 and df["caption"].map(type).eq(str).all()
    assert df["jpg_0"].map(type).eq(bytes).all() and df["jpg_1"].map(type).eq(bytes).all()
    assert set(df["label_0"]) <= {0.0, 1.0} and (df["label_0"] + df["label_1"] == 1.0).all()
    want = {(a[0], a[2]), (a[6], a[2]), (a[3], a[1]), (b[0], b[2])}  # (plausible, implausible), per class+version
    got = set()
    for r in df.itertuples():
        good, bad = (r.sample_id_0, r.sample_id_1) if r.label_0 == 1.0 else (r.sample_id_1, r.sample_id_0)
        got.add((good, bad))
        assert r.caption == place["classes"][good] == place["classes"][bad]
        assert place["gens"][good] == place["gens"][bad] == r.generator_id_0 == r.generator_id_1
        assert _nearest(place["pixels"], r.jpg_0) == r.sample_id_0
        assert _nearest(place["pixels"], r.jpg_1) == r.sample_id_1
        assert (r.plausible_0 > r.implausible_0) == (r.label_0 == 1.0)
    assert got == want

    # the same file through `datasets`, as train_diffusion_dpo.py reads it
    datasets = pytest.importorskip("datasets")
    # train_diffusion_dpo.py calls load_dataset(--dataset_name, split=--dataset_split_name): a folder holding
    # the file, split "train"
    ds = datasets.load_dataset(str(tmp_path), split="train", cache_dir=str(tmp_path.parent / f"{tmp_path.name}-hf"))
    assert ds.num_rows == 4 and set(PAIR_COLUMNS) <= set(ds.column_names)
    assert ds.features["jpg_0"].dtype == "binary" and ds.features["label_0"].dtype == "float64"
    ex = ds[0]
    im0 = PILImage.open(io.BytesIO(ex["jpg_0"])).convert("RGB")
    im1 = PILImage.open(io.BytesIO(ex["jpg_1"])).convert("RGB")
    assert im0.size == im1.size == (32, 32) and ex["label_0"] in (0.0, 1.0) and ex["caption"] in place["classes"].values()
    assert ds.filter(lambda x: x["label_0"] not in (0.5,)).num_rows == 4  # the script's tie filter keeps them all


def test_pairs_options_change_the_set_and_the_draw_is_seeded(place, tmp_path, capsys):
    a, b = place["a"], place["b"]
    root = place["root"]
    code, stdout, _ = _run(capsys, "export", "pairs", "-w", root, "--out", tmp_path / "m1.parquet", "--min-ratings", 1)
    assert code == 0 and stdout.startswith("wrote 5 preference pairs")  # a5 (one rating) now pairs with a1
    code, stdout, _ = _run(capsys, "export", "pairs", "-w", root, "--out", tmp_path / "c.parquet", "--pair-by", "class")
    assert code == 0 and stdout.startswith("wrote 8 preference pairs")  # 3x2 negative + 1x2 positive
    full = pd.read_parquet(tmp_path / "c.parquet")
    assert set(full["label_0"]) == {0.0, 1.0}  # order randomised, not always the plausible one first

    def pairs(df):
        return {frozenset((r.sample_id_0, r.sample_id_1)) for r in df.itertuples()}

    drawn = []
    for name, seed in (("s1", 7), ("s2", 7), ("s3", 8)):
        out = tmp_path / f"{name}.parquet"
        code, stdout, _ = _run(capsys, "export", "pairs", "-w", root, "--out", out, "--pair-by", "class",
                               "--max-pairs", 3, "--seed", seed)
        assert code == 0 and stdout.startswith("wrote 3 preference pairs")
        drawn.append(pd.read_parquet(out))
    assert pairs(drawn[0]) <= pairs(full) and len(pairs(drawn[0])) == 3
    assert drawn[0].drop(columns=["jpg_0", "jpg_1"]).equals(drawn[1].drop(columns=["jpg_0", "jpg_1"]))
    code, stdout, _ = _run(capsys, "export", "pairs", "-w", root, "--out", tmp_path / "all.parquet",
                           "--pair-by", "class", "--max-pairs", 0)
    assert code == 0 and stdout.startswith("wrote 8 preference pairs")
    used = set(full["sample_id_0"]) | set(full["sample_id_1"])
    assert b[0] in used and a[4] not in used and a[7] not in used  # the tie and the unsure-only sample are out


def test_binary_round_trip(place, tmp_path, capsys):
    a, b = place["a"], place["b"]
    out = tmp_path / "binary.parquet"
    code, stdout, err = _run(capsys, "export", "binary", "-w", place["root"], "--out", out, "--image-format", "png")
    assert code == 0, err
    assert stdout.strip() == f"wrote 8 rated samples to {out}; left out 1 tied"
    df = pd.read_parquet(out)
    assert list(df.columns) == BINARY_COLUMNS
    assert df["label"].dtype == np.int64 and df["image"].map(type).eq(bytes).all()
    labels = dict(zip(df["sample_id"], df["label"], strict=True))
    assert labels == {a[0]: 1, a[1]: 0, a[2]: 0, a[3]: 1, a[6]: 1, b[0]: 1, b[1]: 0, b[2]: 0}
    for r in df.itertuples():
        with PILImage.open(io.BytesIO(r.image)) as im:
            assert im.format == "PNG"
            assert np.array_equal(np.asarray(im.convert("RGB")), place["pixels"][r.sample_id])  # lossless
        assert r.caption == place["classes"][r.sample_id] and r.generator_id == place["gens"][r.sample_id]
    assert df.loc[df["sample_id"] == a[6], ["plausible", "implausible"]].values.tolist() == [[2, 1]]

    jpeg = tmp_path / "binary-jpeg.parquet"
    code, stdout, _ = _run(capsys, "export", "binary", "-w", place["root"], "--out", jpeg, "--min-ratings", 1)
    assert code == 0 and stdout.startswith("wrote 9 rated samples")  # a5 with its single rating
    datasets = pytest.importorskip("datasets")
    ds = datasets.load_dataset("parquet", data_files=str(jpeg), split="train", cache_dir=str(tmp_path / "hf"))
    assert ds.num_rows == 9 and ds.features["label"].dtype == "int64" and ds.features["image"].dtype == "binary"
    for ex in ds:
        assert _nearest(place["pixels"], ex["image"]) == ex["sample_id"]
        assert ex["caption"] == place["classes"][ex["sample_id"]]


def test_nothing_to_export_is_one_line_and_writes_nothing(tmp_path, capsys):
    ws, engine = build_workspace(tmp_path / "ws", n_samples=4)
    with Session(engine) as s:
        alice = s.exec(select(Annotator).where(Annotator.username == "alice")).one().id
        for sid in s.exec(select(Sample.id)).all():
            _judge(s, sid, alice, "plausible")  # one rating each, all plausible: no pair at any threshold
        s.commit()
    engine.dispose()
    out = tmp_path / "out"
    out.mkdir()
    for what, extra, needle in (("pairs", [], "no preference pairs to export"),
                                ("pairs", ["--min-ratings", 1], "no preference pairs to export"),
                                ("binary", [], "no rated samples to export")):
        code, stdout, err = _run(capsys, "export", what, "-w", ws.root, "--out", out / f"{what}.parquet", *extra)
        assert code == 1 and stdout == "" and needle in err and len(err.strip().splitlines()) == 1
    code, stdout, err = _run(capsys, "export", "binary", "-w", ws.root, "--out", out / "b.parquet", "--min-ratings", 1)
    assert code == 0 and stdout.startswith("wrote 4 rated samples")
    (out / "b.parquet").unlink()
    for args, needle in (((out / "missing" / "p.parquet",), "does not exist"), ((out,), "it is a folder"),
                         ((out / "p.parquet", "--format", "csv"), "writes Parquet only"),
                         ((out / "p.parquet", "--image-format", "png"), "--image-format"),
                         ((out / "p.parquet", "--max-pairs", -1), "--max-pairs -1")):
        code, stdout, err = _run(capsys, "export", "pairs", "-w", ws.root, "--out", *args)
        assert code == 1 and needle in err and len(err.strip().splitlines()) == 1, err
    (tmp_path / "afile").write_text("not a folder\n")
    for target, needle in ((tmp_path / "afile" / "b.parquet", "is a file, not a folder"),
                           ("/proc/pathloop-b.parquet", "cannot write /proc/pathloop-b.parquet")):
        code, _, err = _run(capsys, "export", "binary", "-w", ws.root, "--out", target, "--min-ratings", 1)
        assert code == 1 and needle in err and len(err.strip().splitlines()) == 1, err
    code, _, err = _run(capsys, "export", "judgments", "-w", ws.root, "--out", out / "j.csv", "--min-ratings", 2)
    assert code == 1 and "--min-ratings apply to `export pairs` and `export binary`" in err
    assert list(out.iterdir()) == []
    assert not (ws.root / "exports").exists() or list((ws.root / "exports").iterdir()) == []
