"""Queue latency: "next item + lease" and "record judgment" at 1,000 to 100,000 samples.

Each size gets three judgments per sample (3N rows: 77% current, of them a few unsure; the
rest superseded history) from 60 annotators with an overlap target of 3: 60% of samples
are complete, 20% have two ratings, 10% one, 10% none. Ten of those annotators (each with
a history) then run ``next_item`` → ``record_judgment`` in turn; each call is timed, first
in the random order, then again after a reward version scored every sample (most
uncertain first). ``progress`` (the rate page calls it on every tile) is timed too. A last
table puts ``progress`` beside ``next_item`` (the peer that does not grow) at each size, with
the ratio of the largest size to the smallest.

Rows are bulk-loaded (executemany on SQLite, COPY on PostgreSQL; the sample and tile tallies
follow by trigger) and ``recount_ratings`` builds the per-annotator tallies; none of it is
timed. PostgreSQL:
``PATHLOOP_BENCH_POSTGRES_URL``, else ``PATHLOOP_TEST_POSTGRES_URL``, names a server; the
benchmark creates its own database there and drops it at the end. Unset: SQLite only.

Run: ``python benchmarks/queue.py [--sizes 1000,10000,100000] [--ops 300]``.
"""
# ruff: noqa: E402  (the import path is fixed before anything imports the stdlib's queue)

from __future__ import annotations

import sys
from pathlib import Path

# This file shares its name with the standard library's ``queue`` (psycopg imports that):
# keep this folder, which Python puts first on the path for a script, off the path.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse
import json
import os
import random
import statistics
import tempfile
import time
import uuid
from datetime import UTC, datetime

from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from store import queue
from store.db import make_engine, upgrade
from store.judgments import recount_ratings
from store.workspace import Settings, Workspace

ANNOTATORS = 60
RUNNERS = 10
OVERLAP = 3
CONTROLS = 500


def rows_for(n: int, seed: int = 0) -> dict[str, list[tuple]]:
    """Every row of a workspace with ``n`` samples and 3n judgments, ids assigned here."""
    rng = random.Random(seed)
    now = datetime(2026, 1, 1, tzinfo=UTC)
    images = [(i, f"{i:064x}", 32, 32, f"images/{i}.png") for i in range(1, n + CONTROLS + 1)]
    tiles = [(t, n + t, "dab_positive" if t % 2 else "dab_negative", "test", now) for t in range(1, CONTROLS + 1)]
    annotators = [(a, f"rater{a}", "annotator", True, now, 0) for a in range(1, ANNOTATORS + 1)]
    judgments, ratings = [], []
    history_left = 3 * n - int(2.3 * n)
    for sid in range(1, n + 1):
        u = rng.random()
        k = 3 if u < 0.6 else 2 if u < 0.8 else 1 if u < 0.9 else 0
        decisive = 0
        for a in rng.sample(range(1, ANNOTATORS + 1), k):
            verdict = "unsure" if rng.random() < 0.03 else rng.choice(("plausible", "implausible"))
            decisive += verdict != "unsure"
            prior = None
            if history_left and rng.random() < 0.31:
                prior = len(judgments) + 1
                judgments.append((prior, sid, a, rng.choice(("plausible", "implausible")), "[]", "", 4.0,
                                  uuid.uuid4().hex, None, now))
                history_left -= 1
            judgments.append((len(judgments) + 1, sid, a, verdict, "[]", "", 5.0, uuid.uuid4().hex, prior, now))
        ratings.append(decisive)
    controls = []  # the rest: judgments of control tiles, each (annotator, tile) once
    for i in range(3 * n - len(judgments)):
        controls.append((len(judgments) + len(controls) + 1, 1 + (i // ANNOTATORS) % CONTROLS, 1 + i % ANNOTATORS,
                         "plausible", "[]", "", 3.0, uuid.uuid4().hex, None, now))
    samples = [(sid, sid, 1, "dab_positive" if sid % 2 else "dab_negative", sid, "ddpm", 50, 0.0, 1, now,
                ratings[sid - 1], rng.randrange(2**31)) for sid in range(1, n + 1)]
    scores = [(sid, sid, 1, rng.random(), now) for sid in range(1, n + 1)]
    return {"image": images, "tile": tiles, "annotator": annotators, "sample": samples,
            "judgment": judgments, "control_judgment": controls, "reward_score": scores}


COLUMNS = {
    "image": "id, sha256, width, height, path",
    "tile": "id, image_id, class_name, split, created_at",
    "annotator": "id, username, role, active, created_at, failed_logins",
    "sample": ("id, image_id, generator_id, class_name, seed, sampler, steps, guidance, round_number, created_at, "
               "current_ratings, queue_key"),
    "judgment": "id, sample_id, annotator_id, verdict, reasons, comment, seconds, request_id, supersedes_id, created_at",
    "reward_score": "id, sample_id, reward_id, probability, created_at",
}


def _tables(rows: dict, with_scores: bool) -> list[tuple[str, str, list[tuple]]]:
    """(table, columns, rows) to load: the workspace, or only the reward scores."""
    if with_scores:
        return [("reward_score", COLUMNS["reward_score"], rows["reward_score"])]
    out = [(t, COLUMNS[t], rows[t]) for t in ("image", "tile", "annotator", "sample", "judgment")]
    return out + [("judgment", COLUMNS["judgment"].replace("sample_id", "tile_id"), rows["control_judgment"])]


def load_sqlite(engine, rows: dict, with_scores: bool = False) -> None:
    raw = engine.raw_connection()
    try:
        cur = raw.cursor()
        cur.execute("BEGIN")
        if not with_scores:
            cur.execute("INSERT INTO generator_version (id, folder, kind, config, created_at) "
                        "VALUES (1, 'g', 'pretrained', '{}', '2026-01-01')")
        else:
            cur.execute("INSERT INTO reward_version (id, backbone, folder, metrics, config, data_manifest, created_at) "
                        "VALUES (1, 'test_resnet', 'r', '{}', '{}', '{}', '2026-01-01')")
        for table, cols, data in _tables(rows, with_scores):
            marks = ", ".join("?" * len(cols.split(",")))
            cur.executemany(f"INSERT INTO {table} ({cols}) VALUES ({marks})",
                            [tuple(v.isoformat(" ") if isinstance(v, datetime) else v for v in r) for r in data])
        cur.execute("COMMIT")
        cur.execute("ANALYZE")
    finally:
        raw.close()


def load_postgres(engine, rows: dict, with_scores: bool = False) -> None:
    raw = engine.raw_connection()
    try:
        cur = raw.cursor()
        if not with_scores:
            cur.execute("INSERT INTO generator_version (id, folder, kind, config, created_at) "
                        "VALUES (1, 'g', 'pretrained', '{}', now())")
        else:
            cur.execute("INSERT INTO reward_version (id, backbone, folder, metrics, config, data_manifest, created_at) "
                        "VALUES (1, 'test_resnet', 'r', '{}', '{}', '{}', now())")
        for table, cols, data in _tables(rows, with_scores):
            with cur.copy(f"COPY {table} ({cols}) FROM STDIN") as cp:
                for r in data:
                    cp.write_row(r)
        for table in ("image", "tile", "annotator", "sample", "judgment", "reward_score", "generator_version",
                      "reward_version"):
            cur.execute(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), "
                        f"COALESCE((SELECT max(id) FROM {table}), 1))")
        raw.commit()
    finally:
        raw.close()
    # A database in use gets autovacuumed; freshly COPYed rows are not yet (no visibility map).
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.exec_driver_sql("VACUUM ANALYZE")


def time_ops(ws: Workspace, engine, ops: int, seed: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {"next_item": [], "record_judgment": [], "progress": []}
    rng = random.Random(seed)
    for i in range(ops):
        annotator = 1 + i % RUNNERS
        t0 = time.perf_counter()
        item = queue.next_item(ws, engine, annotator)
        t1 = time.perf_counter()
        if item is None:
            raise SystemExit(f"queue ran dry after {i} operations")
        queue.record_judgment(ws, engine, annotator, kind=item.kind, item_id=item.item_id,
                              verdict=rng.choice(("plausible", "implausible")), seconds=4.0,
                              request_id=f"bench-{seed}-{i}")
        t2 = time.perf_counter()
        queue.progress(ws, engine, annotator)
        t3 = time.perf_counter()
        times["next_item"].append(t1 - t0)
        times["record_judgment"].append(t2 - t1)
        times["progress"].append(t3 - t2)
    return times


def summary(xs: list[float]) -> tuple[float, float]:
    xs = sorted(xs)
    return statistics.median(xs) * 1e3, xs[min(len(xs) - 1, int(round(0.95 * (len(xs) - 1))))] * 1e3


def run_backend(backend: str, url: str, sizes: list[int], ops: int, workdir: Path, pg_admin=None) -> list[dict]:
    results = []
    for n in sizes:
        if backend == "sqlite":
            db_url = f"sqlite:///{workdir / f'queue-{n}.db'}"
        else:
            name = f"pathloop_bench_{uuid.uuid4().hex[:8]}"
            with pg_admin.connect() as c:
                c.execute(text(f'CREATE DATABASE "{name}"'))
            db_url = make_url(url).set(database=name).render_as_string(hide_password=False)
        engine = make_engine(db_url)
        try:
            upgrade(engine)
            ws = Workspace(workdir, Settings(classes=["dab_negative", "dab_positive"], tile_size=32, overlap=OVERLAP,
                                             database_url=db_url))
            rows = rows_for(n)
            load = load_sqlite if backend == "sqlite" else load_postgres
            start = time.perf_counter()
            load(engine, rows)
            recount_ratings(engine)  # the per-annotator tallies of the loaded judgments
            loaded = time.perf_counter() - start
            for order in ("random", "uncertainty"):
                if order == "uncertainty":
                    load(engine, rows, with_scores=True)
                queue.next_item(ws, engine, 1)  # warm the connection pool and caches
                times = time_ops(ws, engine, ops, seed=len(results))
                row = {"backend": backend, "samples": n, "order": order,
                       "judgments": len(rows["judgment"]) + len(rows["control_judgment"]),
                       "load_s": round(loaded, 1)}
                for k, v in times.items():
                    med, p95 = summary(v)
                    row[f"{k}_median_ms"], row[f"{k}_p95_ms"] = round(med, 2), round(p95, 2)
                results.append(row)
                print_row(row)
        finally:
            engine.dispose()
            if backend == "postgresql":
                with pg_admin.connect() as c:
                    c.execute(text(f'DROP DATABASE IF EXISTS "{make_url(db_url).database}" WITH (FORCE)'))
    return results


HEADER = (f"{'backend':<10} {'samples':>8} {'judgments':>9} {'order':<11} "
          f"{'next med':>8} {'next p95':>8} {'rec med':>8} {'rec p95':>8} {'prog med':>8} {'prog p95':>8}  (ms)")


def print_row(r: dict) -> None:
    print(f"{r['backend']:<10} {r['samples']:>8} {r['judgments']:>9} {r['order']:<11} "
          f"{r['next_item_median_ms']:>8.2f} {r['next_item_p95_ms']:>8.2f} "
          f"{r['record_judgment_median_ms']:>8.2f} {r['record_judgment_p95_ms']:>8.2f} "
          f"{r['progress_median_ms']:>8.2f} {r['progress_p95_ms']:>8.2f}", flush=True)


def print_summary(results: list[dict]) -> None:
    """Median ms of ``progress`` and of ``next_item`` per size, side by side, and largest/smallest."""
    sizes = sorted({r["samples"] for r in results})
    print(f"\n{'backend':<10} {'order':<11} {'call':<9} " + " ".join(f"{n:>8}" for n in sizes)
          + f" {f'{sizes[-1]}/{sizes[0]}':>14}  (median ms)")
    for backend in dict.fromkeys(r["backend"] for r in results):
        for order in ("random", "uncertainty"):
            by_size = {r["samples"]: r for r in results if r["backend"] == backend and r["order"] == order}
            if not by_size:
                continue
            for call in ("next_item", "progress"):
                ms = [by_size[n][f"{call}_median_ms"] if n in by_size else float("nan") for n in sizes]
                print(f"{backend:<10} {order:<11} {call:<9} " + " ".join(f"{m:>8.2f}" for m in ms)
                      + f" {ms[-1] / ms[0]:>14.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1000,10000,100000", help="sample counts, comma-separated")
    ap.add_argument("--ops", type=int, default=300, help="timed next_item + record_judgment pairs per size")
    ap.add_argument("--backends", default="sqlite,postgresql", help="which databases, comma-separated")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    sizes = [int(x) for x in args.sizes.split(",")]
    pg_url = os.environ.get("PATHLOOP_BENCH_POSTGRES_URL") or os.environ.get("PATHLOOP_TEST_POSTGRES_URL")
    print(HEADER)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        if "sqlite" in args.backends:
            results += run_backend("sqlite", "", sizes, args.ops, Path(tmp))
        if "postgresql" not in args.backends:
            pass
        elif pg_url:
            admin_url = make_url(pg_url)
            if admin_url.drivername in ("postgresql", "postgres"):
                admin_url = admin_url.set(drivername="postgresql+psycopg")
            admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
            try:
                results += run_backend("postgresql", admin_url.render_as_string(hide_password=False), sizes,
                                       args.ops, Path(tmp), pg_admin=admin)
            finally:
                admin.dispose()
        else:
            print("(PostgreSQL skipped: set PATHLOOP_BENCH_POSTGRES_URL)")
    if results:
        print_summary(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
