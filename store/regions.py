"""Classified regions from QuPath GeoJSON exports, and how much of each tile box they cover.

Geometries are shapely objects in level-0 slide pixels.
"""

from __future__ import annotations

import json
import unicodedata
import warnings
from pathlib import Path

import numpy as np
import shapely

from store.errors import PathloopError, PathloopWarning


def load_regions(geojson_path) -> list[tuple[str, shapely.Geometry]]:
    """Classified polygons from a QuPath GeoJSON export, as ``(class name, geometry)`` in level-0 px."""
    p = Path(geojson_path)
    if not p.is_file():
        raise PathloopError(f"regions file {p} does not exist")
    try:
        doc = json.loads(p.read_text(encoding="utf-8-sig"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PathloopError(f"{p} is not valid GeoJSON: {e}") from None
    if isinstance(doc, dict) and doc.get("type") == "FeatureCollection":
        features = doc.get("features")
    elif isinstance(doc, dict) and doc.get("type") == "Feature":
        features = [doc]
    else:
        features = doc
    if not isinstance(features, list):
        raise PathloopError(
            f"{p} is not valid GeoJSON: expected a FeatureCollection, a Feature or a list of features"
        )
    regions = []
    for i, feature in enumerate(features):
        if not isinstance(feature, dict):
            raise PathloopError(
                f"{p} is not valid GeoJSON: feature {i} is a {type(feature).__name__}, not an object"
            )
        properties = feature.get("properties")
        properties = properties if isinstance(properties, dict) else {}
        classification = properties.get("classification")
        name = classification.get("name") if isinstance(classification, dict) else classification
        if not isinstance(name, str) or not name.strip() or not feature.get("geometry"):
            continue
        # Class names compare NFC-normalised (macOS and some editors write decomposed accents).
        name = unicodedata.normalize("NFC", name.strip())
        try:
            geometry = shapely.geometry.shape(feature["geometry"])
        except (shapely.errors.ShapelyError, ValueError, TypeError, KeyError, AttributeError) as e:
            raise PathloopError(f"{p} is not valid GeoJSON: feature {i} has a bad geometry: {e}") from None
        if not any(g.geom_type in _AREAS for g in shapely.get_parts(geometry)):
            continue  # points and lines (cell marks, rulers) label no area
        if geometry.is_valid:
            polygonal = _polygonal(geometry)
        else:
            polygonal = _repaired(p, i, _feature_label(name, properties), geometry)
        if polygonal is not None:
            regions.append((name, polygonal))
    if not regions:
        raise PathloopError(
            f"{p} has no classified regions (expected features with properties.classification.name)"
        )
    return regions


def _feature_label(class_name: str, properties: dict) -> str:
    """How a message names a feature: its class, and its QuPath name when it has one."""
    label = f"class {class_name!r}"
    own = properties.get("name")
    return label + (f", name {own!r}" if isinstance(own, str) and own.strip() else "")


_AREAS = ("Polygon", "MultiPolygon")


def _polygonal(geometry) -> shapely.Geometry | None:
    """The areas of a valid geometry (a collection may also hold lines and points), or None."""
    if geometry.geom_type in _AREAS:
        return geometry if geometry.area > 0 else None
    parts = [g for g in shapely.get_parts(geometry) if g.geom_type in _AREAS and g.area > 0]
    return shapely.union_all(parts) if parts else None


def _repaired(path: Path, index: int, label: str, geometry) -> shapely.Geometry:
    """An invalid (e.g. self-intersecting) polygon made valid, with a warning; refused if no area is left."""
    reason = shapely.is_valid_reason(geometry)
    # make_valid can leave stray lines and points besides the areas; only areas label tiles.
    polygonal = _polygonal(shapely.make_valid(geometry))
    if polygonal is None:
        raise PathloopError(
            f"{path}: feature {index} ({label}) is not a valid polygon ({reason}) and has no area once "
            f"repaired; fix or delete it in QuPath"
        )
    warnings.warn(PathloopWarning(
        f"{path}: feature {index} ({label}) is not a valid polygon ({reason}); repaired with shapely "
        f"make_valid into {len(shapely.get_parts(polygonal))} part(s) of {polygonal.area:g} px^2 in all"
    ), stacklevel=3)
    return polygonal


def region_coverage(boxes: np.ndarray, regions: list) -> tuple[list[str], np.ndarray]:
    """Share of each of ``(n_boxes,)`` shapely boxes covered by each class of ``regions``.

    Returns the sorted class names and an ``(n_boxes, n_classes)`` array of shares in [0, 1].
    """
    names = sorted({name for name, _ in regions})
    parts, part_class = [], []
    for k, name in enumerate(names):
        # Union per class first so overlapping regions of one class are not counted twice.
        merged = shapely.union_all([g for n, g in regions if n == name])
        for part in shapely.get_parts(merged):
            parts.append(part)
            part_class.append(k)
    parts = np.array(parts, dtype=object)
    shapely.prepare(parts)
    part_class = np.array(part_class)
    tree = shapely.STRtree(parts)
    box_idx, part_idx = tree.query(boxes, predicate="intersects")
    inside = shapely.contains(parts[part_idx], boxes[box_idx])
    areas = shapely.area(boxes[box_idx])
    partial = ~inside
    areas[partial] = shapely.area(shapely.intersection(boxes[box_idx[partial]], parts[part_idx[partial]]))
    coverage = np.zeros((len(boxes), len(names)))
    np.add.at(coverage, (box_idx, part_class[part_idx]), areas)
    return names, coverage / shapely.area(boxes)[:, None]
