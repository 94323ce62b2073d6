"""QuPath GeoJSON regions a lab really exports: self-intersecting polygons, points, accents, non-JSON.

A self-intersecting polygon (a bow-tie, a ring drawn across itself) is repaired with shapely's
``make_valid`` and named in one warning line; one with no area left is refused in one line.
Nothing is used silently.
"""

from __future__ import annotations

import json
import unicodedata
import warnings

import pytest

from pathloop.cli import main
from pathloop.demo import write_demo_slide
from store.errors import PathloopError, PathloopWarning
from store.regions import load_regions

BOWTIE = [[[0, 0], [10, 0], [0, 10], [10, 10], [0, 0]]]  # crosses itself at (5, 5)
SQUARE = [[[20, 20], [30, 20], [30, 30], [20, 30], [20, 20]]]
FLAT = [[[0, 0], [5, 5], [10, 10], [0, 0]]]  # every corner on one line: no area at all


def feature(cls, coordinates, kind="Polygon", name=None):
    props = {"objectType": "annotation", "classification": {"name": cls, "color": [255, 0, 0]}}
    if name:
        props["name"] = name
    return {"type": "Feature", "geometry": {"type": kind, "coordinates": coordinates}, "properties": props}


def write(path, *features):
    path.write_text(json.dumps({"type": "FeatureCollection", "features": list(features)}, ensure_ascii=False),
                    encoding="utf-8")
    return path


def test_a_bowtie_is_repaired_with_one_warning_naming_the_feature(tmp_path):
    path = write(tmp_path / "r.geojson", feature("stroma", SQUARE), feature("tumour", BOWTIE, name="Annotation 7"))
    with pytest.warns(PathloopWarning) as caught:
        regions = load_regions(path)
    [w] = caught
    message = str(w.message)
    assert "\n" not in message
    for needle in ("r.geojson", "feature 1", "class 'tumour'", "name 'Annotation 7'", "Self-intersection",
                   "make_valid"):
        assert needle in message, (needle, message)
    assert [n for n, _ in regions] == ["stroma", "tumour"]
    bowtie = regions[1][1]
    assert bowtie.is_valid and bowtie.area == pytest.approx(50)  # both triangles kept


def test_valid_regions_load_without_a_warning(tmp_path):
    path = write(tmp_path / "r.geojson", feature("stroma", SQUARE))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        [(name, geometry)] = load_regions(path)
    assert name == "stroma" and geometry.area == 100


def test_a_polygon_with_no_area_once_repaired_is_refused(tmp_path):
    path = write(tmp_path / "r.geojson", feature("stroma", SQUARE), feature("tumour", FLAT, name="slip"))
    with pytest.raises(PathloopError) as e:
        load_regions(path)
    message = str(e.value)
    assert "\n" not in message
    for needle in ("r.geojson", "feature 1", "class 'tumour'", "name 'slip'", "no area once repaired"):
        assert needle in message, (needle, message)


def test_points_and_lines_label_no_area_and_are_skipped(tmp_path):
    path = write(tmp_path / "r.geojson", feature("cell", [5, 5], kind="Point"),
                 feature("ruler", [[0, 0], [9, 9]], kind="LineString"), feature("stroma", SQUARE))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert [n for n, _ in load_regions(path)] == ["stroma"]


def test_region_class_names_with_accents_are_nfc(tmp_path):
    nfd = unicodedata.normalize("NFD", "nécrose")
    assert nfd != "nécrose"
    path = write(tmp_path / "r.geojson", feature(nfd, SQUARE), feature("Lymphozyten-ähnlich", BOWTIE))
    with pytest.warns(PathloopWarning, match="Lymphozyten-ähnlich"):
        names = [n for n, _ in load_regions(path)]
    assert names == ["nécrose", "Lymphozyten-ähnlich"]


def test_a_geojson_with_a_byte_order_mark_loads(tmp_path):
    path = tmp_path / "bom.geojson"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(feature("stroma", SQUARE)).encode())
    assert [n for n, _ in load_regions(path)] == ["stroma"]


def test_cli_ingest_prints_the_repair_as_one_warning_line(tmp_path, capsys):
    tiff, _ = write_demo_slide(tmp_path / "demo.tiff")
    whole = [[[0, 0], [512, 512], [512, 0], [0, 512], [0, 0]]]  # a bow-tie over the whole 512 px slide
    regions = write(tmp_path / "bowtie.geojson", feature("nécrose", whole, name="Bow"))
    assert main(["init", str(tmp_path / "ws"), "--classes", "nécrose", "--tile-size", "64"]) == 0
    capsys.readouterr()
    assert main(["ingest", "-w", str(tmp_path / "ws"), str(tiff), "--regions", str(regions), "--tile-size", "64",
                 "--workers", "1", "--min-tissue", "0"]) == 0
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pathloop: warning: "), err
    assert "feature 0 (class 'nécrose', name 'Bow')" in lines[0]
    assert "tiles added" in out and "nécrose" in out


def test_cli_refuses_an_unrepairable_region_in_one_line(tmp_path, capsys):
    tiff, _ = write_demo_slide(tmp_path / "demo.tiff")
    regions = write(tmp_path / "flat.geojson", feature("a", SQUARE), feature("a", FLAT))
    assert main(["init", str(tmp_path / "ws"), "--classes", "a", "--tile-size", "64"]) == 0
    capsys.readouterr()
    assert main(["ingest", "-w", str(tmp_path / "ws"), str(tiff), "--regions", str(regions)]) == 1
    _, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pathloop: error: ") and "feature 1" in lines[0], err
    assert "Traceback" not in err
