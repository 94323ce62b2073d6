"""Agreement statistics against hand-worked examples, the dashboard loaders, and the export."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from sqlmodel import Session
from store_rows import add_annotators, add_samples, add_tiles

from store.agreement import (
    agreement_summary,
    cohen_kappa,
    fleiss_kappa,
    krippendorff_alpha,
    plausibility_table,
    top_reasons,
    wilson_interval,
)
from store.errors import PathloopError
from store.export import COLUMNS, export_judgments, judgments_frame
from store.models import Image, Judgment, Sample

NAN = float("nan")


def test_wilson_interval_known_values():
    assert wilson_interval(8, 10) == pytest.approx((0.4902, 0.9433), abs=1e-4)
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson_interval(10, 10)[1] == 1.0 and wilson_interval(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError):
        wilson_interval(3, 2)


def test_cohen_kappa_two_raters_fifty_items():
    # 20 yes/yes, 5 yes/no, 10 no/yes, 15 no/no: p_o = 0.7, p_e = 0.5, kappa = 0.4.
    a = ["yes"] * 25 + ["no"] * 25
    b = ["yes"] * 20 + ["no"] * 5 + ["yes"] * 10 + ["no"] * 15
    assert cohen_kappa(a, b) == pytest.approx(0.4)
    assert math.isnan(cohen_kappa(["yes"] * 3, ["yes"] * 3))  # no variation: undefined


def test_fleiss_kappa_fourteen_raters_ten_subjects():
    # Fleiss (1971) as worked on Wikipedia: P-bar = 0.378, P-bar_e = 0.213, kappa = 0.210.
    table = [[0, 0, 0, 0, 14], [0, 2, 6, 4, 2], [0, 0, 3, 5, 6], [0, 3, 9, 2, 0], [2, 2, 8, 1, 1],
             [7, 7, 0, 0, 0], [3, 2, 6, 3, 0], [2, 5, 3, 2, 2], [6, 5, 2, 1, 0], [0, 2, 2, 3, 7]]
    assert fleiss_kappa(table) == pytest.approx(0.2099, abs=1e-4)


def test_krippendorff_alpha_with_missing_values():
    # Krippendorff's four observers, twelve units, values missing: nominal 0.743, interval 0.849.
    data = [[1, 2, 3, 3, 2, 1, 4, 1, 2, NAN, NAN, NAN],
            [1, 2, 3, 3, 2, 2, 4, 1, 2, 5, NAN, 3],
            [NAN, 3, 3, 3, 2, 3, 4, 2, 2, 5, 1, NAN],
            [1, 2, 3, 3, 2, 4, 4, 1, 2, 5, 1, NAN]]
    assert krippendorff_alpha(data) == pytest.approx(0.743, abs=1e-3)
    assert krippendorff_alpha(data, level="interval") == pytest.approx(0.849, abs=1e-3)
    assert math.isnan(krippendorff_alpha([[1, 1], [1, 1]]))


def _judge(s: Session, annotator: int, verdict: str, *, sample=None, tile=None, reasons=(), supersedes=None,
           seconds=None) -> int:
    j = Judgment(annotator_id=annotator, verdict=verdict, sample_id=sample, tile_id=tile, reasons=list(reasons),
                 supersedes_id=supersedes, seconds=seconds, request_id=f"r{s.info.setdefault('n', 0)}")
    s.info["n"] += 1
    s.add(j)
    s.flush()
    return j.id


@pytest.fixture
def rated(engine):
    """Two raters on four samples (one disagreement), history that must not count, controls."""
    s1, s2, s3, s4 = add_samples(engine, 4, round_number=2)
    add_samples(engine, 2, tag="g2")  # a second version nobody rated yet
    t1, t2 = add_tiles(engine, 2)
    a, b, c = add_annotators(engine, "ada", "bob", "cy")
    with Session(engine) as s:
        old = _judge(s, a, "implausible", sample=s1)
        _judge(s, a, "plausible", sample=s1, supersedes=old, seconds=2)
        _judge(s, a, "plausible", sample=s2, seconds=4)
        _judge(s, a, "implausible", sample=s3, reasons=["staining", "nuclear shape"], seconds=6)
        _judge(s, a, "implausible", sample=s4, reasons=["staining"], seconds=8)
        _judge(s, b, "plausible", sample=s1, seconds=1)
        _judge(s, b, "implausible", sample=s2, reasons=["staining"], seconds=1)
        _judge(s, b, "implausible", sample=s3, reasons=["artefact"], seconds=3)
        first = _judge(s, b, "plausible", sample=s4)
        undo = _judge(s, b, "retracted", sample=s4, supersedes=first)
        _judge(s, b, "implausible", sample=s4, supersedes=undo, seconds=5)
        _judge(s, c, "unsure", sample=s1, seconds=9)
        _judge(s, a, "implausible", tile=t1, seconds=2)
        _judge(s, a, "plausible", tile=t2, seconds=2)
        _judge(s, b, "plausible", tile=t1, seconds=2)
        s.commit()
    return {"samples": (s1, s2, s3, s4), "tiles": (t1, t2)}


def test_agreement_summary_by_hand(engine, rated):
    got = agreement_summary(engine)
    assert got["n_samples_rated"] == 4
    # ada P P I I, bob P I I I: p_o = 3/4, p_e = 1/2 * 1/4 + 1/2 * 3/4 = 1/2, kappa = 1/2.
    assert got["pairs"] == [{"a": "ada", "b": "bob", "n": 4, "kappa": 0.5, "agreement": 0.75}]
    # Fleiss: P-bar = 3/4, p = (3/8, 5/8), P-bar_e = 34/64, kappa = (3/4 - 34/64) / (1 - 34/64) = 7/15.
    assert got["fleiss"] == {"kappa": pytest.approx(7 / 15, abs=1e-6), "n_items": 4, "raters_per_item": 2}
    # Krippendorff nominal: n = 8, n_P = 3, n_I = 5, disagreeing pairs 2: 1 - 7 * 2 / (2 * 3 * 5) = 8/15.
    assert got["krippendorff"] == {"alpha": pytest.approx(8 / 15, abs=1e-6), "n_items": 4}
    people = {p["annotator"]: p for p in got["annotators"]}
    assert people["ada"] == {"annotator": "ada", "count": 6, "unsure": 0, "median_seconds": 3.0,  # 2 2 2 4 6 8
                             "majority_agreement": 0.75, "majority_n": 4, "controls": 2,
                             "controls_implausible": 0.5}
    assert people["bob"]["controls_implausible"] == 0.0 and people["bob"]["count"] == 5
    assert people["cy"]["unsure"] == 1 and people["cy"]["majority_agreement"] is None


def test_agreement_summary_of_nothing(engine):
    got = agreement_summary(engine)
    assert got["pairs"] == [] and got["fleiss"]["kappa"] is None and got["krippendorff"]["alpha"] is None


def test_plausibility_per_version_and_class(engine, rated):
    table = plausibility_table(engine)
    assert list(table.columns) == ["generator_id", "class_name", "samples", "n", "plausible", "rate", "low", "high"]
    first = table[table["generator_id"] == table["generator_id"].min()].set_index("class_name")
    assert first.loc["dab_negative", ["n", "plausible", "rate"]].tolist() == [4, 2, 0.5]
    assert first.loc["dab_positive", ["n", "plausible", "rate"]].tolist() == [4, 1, 0.25]
    assert (first.loc["dab_positive", "low"], first.loc["dab_positive", "high"]) == pytest.approx(wilson_interval(1, 4))
    unrated = table[table["generator_id"] == table["generator_id"].max()]
    assert unrated["n"].tolist() == [0, 0] and unrated["rate"].isna().all() and unrated["samples"].tolist() == [1, 1]


def test_top_reasons(engine, rated):
    top = top_reasons(engine)
    assert top.to_dict("records")[0] == {"reason": "staining", "count": 3, "share": 0.6}
    assert set(top["reason"]) == {"staining", "nuclear shape", "artefact"}
    assert len(top_reasons(engine, n=1)) == 1


def test_judgments_frame_has_every_row_and_its_provenance(engine, rated):
    df = judgments_frame(engine)
    assert list(df.columns) == COLUMNS and len(df) == 15
    assert df["current"].sum() == 12  # not: ada's first verdict on s1, bob's first on s4 and its retraction
    assert str(df["created_at"].dtype) == "datetime64[us, UTC]" or str(df["created_at"].dt.tz) == "UTC"
    s1 = rated["samples"][0]
    old, new = df[(df["sample_id"] == s1) & (df["annotator"] == "ada")].itertuples()
    assert (old.current, old.superseded_by, new.supersedes_id, new.current) == (False, new.judgment_id, old.judgment_id,
                                                                                True)
    with Session(engine) as s:
        sample = s.get(Sample, s1)
        sha = s.get(Image, sample.image_id).sha256
    assert (new.item_kind, new.generator_id, new.class_name, new.seed, new.sampler, new.steps, new.round_number,
            new.image_sha256) == ("sample", sample.generator_id, "dab_negative", 0, "ddpm", 2, 2, sha)
    control = df[df["item_kind"] == "control"].iloc[0]
    assert control["tile_split"] == "test" and control["slide_path"] == "/slides/t.tiff"
    assert pd.isna(control["sample_id"]) and pd.isna(control["generator_id"])
    assert df.loc[df["verdict"] == "implausible", "reasons"].iloc[1] == "staining; nuclear shape"


@pytest.mark.parametrize("fmt", ["csv", "parquet", "jsonl"])
def test_export_round_trips_through_pandas(engine, rated, tmp_path, fmt):
    (tmp_path / "out").mkdir()
    out = tmp_path / "out" / f"judgments.{fmt}"
    assert export_judgments(engine, out, fmt) == 15
    back = {"csv": pd.read_csv, "parquet": pd.read_parquet,
            "jsonl": lambda p: pd.read_json(p, lines=True)}[fmt](out)
    want = judgments_frame(engine)
    assert list(back.columns) == COLUMNS and len(back) == len(want)
    for col in ("judgment_id", "annotator", "verdict", "reasons", "request_id", "item_kind", "class_name"):
        assert back[col].fillna("").astype(str).tolist() == want[col].fillna("").astype(str).tolist()
    assert back["current"].astype(bool).tolist() == want["current"].tolist()
    assert np.allclose(back["seed"].astype(float).fillna(-1), want["seed"].astype(float).fillna(-1))
    assert pd.to_datetime(back["created_at"], utc=True).tolist() == want["created_at"].tolist()
    assert [p.name for p in out.parent.iterdir()] == [out.name]  # no temporary file left


def test_export_refuses_bad_requests(engine, tmp_path):
    tmp_path = tmp_path / "out"
    tmp_path.mkdir()
    with pytest.raises(PathloopError, match="export format 'xlsx'; expected one of: csv, parquet, jsonl"):
        export_judgments(engine, tmp_path / "j.xlsx", "xlsx")
    with pytest.raises(PathloopError, match="no judgments to export yet"):
        export_judgments(engine, tmp_path / "j.csv", "csv")
    with pytest.raises(PathloopError, match="folder .* does not exist"):
        export_judgments(engine, tmp_path / "missing" / "j.csv", "csv")
    assert list(tmp_path.iterdir()) == []
