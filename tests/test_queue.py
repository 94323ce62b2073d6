"""The annotation queue and judgments on SQLite and PostgreSQL: overlap, leases, controls,
order, idempotent submits, edits, undo history, bad input, many annotators at once, and the
progress numbers (read from tallies) against a count of the rows."""

from __future__ import annotations

import dataclasses
import threading
import time
import uuid
import warnings
from collections import Counter
from datetime import UTC, datetime, timedelta

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import delete, func, text, update
from sqlmodel import Session, select
from store_rows import add_annotators, add_samples, add_tiles

from store.db import _alembic_config, make_engine, upgrade
from store.errors import PathloopError
from store.judgments import DECISIVE, current_judgments, recount_ratings
from store.models import (
    Annotator,
    Judgment,
    Lease,
    RaterControlTally,
    RaterHourTally,
    RaterRatingTally,
    RewardScore,
    RewardVersion,
    Round,
    Sample,
    SampleTally,
    Tile,
    TileTally,
    metadata,
    utcnow,
)
from store.queue import (
    KEY_SPACE,
    _mix,
    _with_controls,
    is_control_position,
    next_item,
    progress,
    record_judgment,
    undo_last,
)
from store.workspace import Workspace

from conftest import BACKENDS, database_url


@pytest.fixture
def ws_of(make_workspace, db_url):
    """A workspace on this test's database with the given settings (controls off by default)."""
    def make(**settings):
        settings.setdefault("control_share", 0.0)
        return make_workspace(db_url, **settings)
    return make


def rate(ws, engine, annotator_id, item, verdict="plausible", **kw):
    kw.setdefault("request_id", uuid.uuid4().hex)
    return record_judgment(ws, engine, annotator_id, kind=item.kind, item_id=item.item_id, verdict=verdict, **kw)


def rate_all(ws, engine, annotator_id, verdict="plausible") -> list:
    items = []
    while (item := next_item(ws, engine, annotator_id)) is not None:
        items.append(item)
        rate(ws, engine, annotator_id, item, verdict)
    return items


def rows(engine) -> list[Judgment]:
    with Session(engine) as s:
        return list(s.exec(select(Judgment).order_by(Judgment.id)).all())


def decisive_counts(engine) -> Counter:
    return Counter(j.sample_id for j in current_judgments(engine) if j.verdict in DECISIVE and j.sample_id)


def counted_progress(ws, engine, annotator_id, now) -> dict:
    """What ``progress`` must say, counted in Python from every row (no cached count is read)."""
    with Session(engine) as s:
        history = list(s.exec(select(Judgment)).all())
        sample_ids = list(s.exec(select(Sample.id)).all())
        tiles = list(s.exec(select(Tile)).all())
        latest = s.exec(select(Round).order_by(Round.number.desc())).first()
    at = {j.id: j.created_at.replace(tzinfo=UTC) if j.created_at.tzinfo is None else j.created_at for j in history}
    superseded = {j.supersedes_id for j in history}
    current = [j for j in history if j.id not in superseded and j.verdict != "retracted"]
    ratings = Counter(j.sample_id for j in current if j.sample_id is not None and j.verdict in DECISIVE)
    open_samples = {sid for sid in sample_ids if ratings[sid] < ws.settings.overlap}
    mine = [j for j in current if j.annotator_id == annotator_id]
    today = now.replace(hour=0, minute=0, second=0, microsecond=0)
    since = None if latest is None else latest.created_at.replace(tzinfo=latest.created_at.tzinfo or UTC)
    judged_tiles = {j.tile_id for j in history if j.annotator_id == annotator_id and j.tile_id is not None}
    controls = sum(t.split in ("val", "test") and t.class_name in ws.settings.classes and t.id not in judged_tiles
                   for t in tiles)
    position = sum(j.annotator_id == annotator_id and j.supersedes_id is None for j in history)
    samples_left = len(open_samples) - sum(j.sample_id in open_samples for j in mine)
    return {"rated_today": sum(at[j.id] >= today for j in mine), "rated_total": len(mine),
            "rated_this_round": len(mine) if since is None else sum(at[j.id] >= since for j in mine),
            "remaining": _with_controls(samples_left, controls, ws.settings.control_share, 0, annotator_id,
                                        position)}


def test_overlap_target_no_repeats_then_nothing_left(engine, ws_of):
    ws = ws_of(overlap=2)
    samples = add_samples(engine, 6)
    a, b, c = add_annotators(engine, "ada", "bob", "cy")
    got_a = rate_all(ws, engine, a)
    assert sorted(i.item_id for i in got_a) == samples  # each sample once for ada
    got_b = rate_all(ws, engine, b)
    assert sorted(i.item_id for i in got_b) == samples
    assert next_item(ws, engine, c) is None  # every sample has its two ratings
    assert decisive_counts(engine) == {s: 2 for s in samples}
    assert recount_ratings(engine) == 0  # the cached counts agree with the rows
    item = got_a[0]
    assert item.kind == "sample" and item.image_path.is_absolute() and item.shown_class in ("dab_negative",
                                                                                           "dab_positive")
    assert item.lease_expires_at.tzinfo is not None


def test_a_reload_returns_the_leased_item_and_leases_block_the_last_slot(engine, ws_of):
    ws = ws_of(overlap=1, lease_minutes=10)
    [x] = add_samples(engine, 1)
    a, b = add_annotators(engine, "ada", "bob")
    t0 = utcnow()
    first = next_item(ws, engine, a, now=t0)
    assert next_item(ws, engine, a, now=t0 + timedelta(minutes=1)) == first  # a reload skips nothing
    assert next_item(ws, engine, b, now=t0 + timedelta(minutes=1)) is None  # the only slot is leased
    # The lease expires on its own: bob gets the sample, and ada cannot take it back.
    late = t0 + timedelta(minutes=11)
    assert next_item(ws, engine, b, now=late).item_id == x
    assert next_item(ws, engine, a, now=late) is None
    with pytest.raises(PathloopError, match=f"sample {x} was never given to ada"):
        rate(ws, engine, a, first)


def test_an_expired_lease_is_renewed_when_the_slot_is_still_free(engine, ws_of):
    ws = ws_of(overlap=1)
    add_samples(engine, 3)
    [a] = add_annotators(engine, "ada")
    t0 = utcnow()
    first = next_item(ws, engine, a, now=t0)
    again = next_item(ws, engine, a, now=t0 + timedelta(hours=2))
    assert again.item_id == first.item_id and again.lease_expires_at > first.lease_expires_at
    # A slow rating on a lease that lapsed is still stored, not lost.
    rate(ws, engine, a, first, now=t0 + timedelta(hours=3))
    assert decisive_counts(engine)[first.item_id] == 1


def test_unsure_excludes_the_item_for_that_annotator_only(engine, ws_of):
    ws = ws_of(overlap=1)
    [x] = add_samples(engine, 1)
    a, b = add_annotators(engine, "ada", "bob")
    rate(ws, engine, a, next_item(ws, engine, a), "unsure")
    assert next_item(ws, engine, a) is None
    item = next_item(ws, engine, b)  # unsure is not a rating: the sample is still open
    assert item.item_id == x
    rate(ws, engine, b, item, "implausible")
    assert next_item(ws, engine, b) is None and decisive_counts(engine) == {x: 1}


def test_controls_are_mixed_in_blind_at_the_configured_share(engine, ws_of):
    ws = ws_of(overlap=1, control_share=0.25)
    add_samples(engine, 60)
    controls = add_tiles(engine, 12, split="test") + add_tiles(engine, 12, split="val", tag="v")
    train = set(add_tiles(engine, 10, split="train", tag="tr"))
    a, b = add_annotators(engine, "ada", "bob")
    got = [next_item(ws, engine, a) for _ in range(1)]
    for _ in range(39):
        rate(ws, engine, a, got[-1])
        got.append(next_item(ws, engine, a))
    kinds = [i.kind for i in got]
    assert kinds.count("control") == 10  # exactly one in each block of four
    shown = [i.item_id for i in got if i.kind == "control"]
    assert len(set(shown)) == len(shown) and set(shown) <= set(controls) and not set(shown) & train
    tile_class = {t: ("dab_negative", "dab_positive")[k % 2] for k, t in enumerate(controls[:12])}
    assert all(i.shown_class == tile_class[i.item_id] for i in got if i.item_id in tile_class and i.kind == "control")
    # Positions differ between annotators, so nobody can learn "every fourth tile is real".
    slots_a = [p for p in range(200) if is_control_position(0.25, 0, a, p)]
    slots_b = [p for p in range(200) if is_control_position(0.25, 0, b, p)]
    assert len(slots_a) == len(slots_b) == 50 and slots_a != slots_b


@pytest.mark.parametrize("share", [0.1, 0.15, 0.3, 0.5])
def test_control_positions_have_the_exact_share(share):
    for annotator in (1, 2, 3):
        hits = sum(is_control_position(share, 7, annotator, p) for p in range(1000))
        assert hits == round(1000 * share)
    assert not any(is_control_position(0.0, 0, 1, p) for p in range(100))


def test_no_controls_once_the_samples_are_done(engine, ws_of):
    ws = ws_of(overlap=1, control_share=0.5)
    add_samples(engine, 4)
    add_tiles(engine, 20)
    [a] = add_annotators(engine, "ada")
    got = rate_all(ws, engine, a)
    assert sum(i.kind == "sample" for i in got) == 4 and next_item(ws, engine, a) is None


def test_random_order_is_stable_per_annotator_and_differs_between_them(engine, ws_of):
    ws = ws_of(overlap=2)
    add_samples(engine, 30)
    a, b = add_annotators(engine, "ada", "bob")
    # Keys are random per sample; spaced evenly here so that the outcome does not depend on
    # whether both annotators' start points happen to fall between the same two keys.
    with Session(engine) as s:
        for i, sample in enumerate(s.exec(select(Sample).order_by(Sample.id)).all()):
            sample.queue_key = (i * 7919 % 30) * (KEY_SPACE // 30)
            s.add(sample)
        s.commit()
        keys = dict(s.exec(select(Sample.id, Sample.queue_key)).all())
    orders = []
    for annotator in (a, b):
        order = [i.item_id for i in rate_all(ws, engine, annotator)]
        start = _mix("order", 0, annotator) % KEY_SPACE
        assert order == sorted(keys, key=lambda sid: ((keys[sid] - start) % KEY_SPACE, sid))  # stable per annotator
        orders.append(order)
    assert sorted(orders[1]) == sorted(orders[0]) and orders[1] != orders[0]


def test_most_uncertain_first_under_the_newest_scored_reward_version(engine, ws_of):
    ws = ws_of(overlap=1)
    samples = add_samples(engine, 8)
    a, b = add_annotators(engine, "ada", "bob")
    with Session(engine) as s:
        old, new, unscored = RewardVersion(backbone="x", folder="r1"), RewardVersion(backbone="x", folder="r2"), \
            RewardVersion(backbone="x", folder="r3")
        s.add_all([old, new, unscored])
        s.flush()
        # The old version would order samples 0..4; the newest scored version decides.
        s.add_all([RewardScore(sample_id=sid, reward_id=old.id, probability=0.5) for sid in samples])
        probs = {samples[0]: 0.99, samples[1]: 0.45, samples[2]: 0.7, samples[3]: 0.05, samples[4]: 0.52}
        s.add_all([RewardScore(sample_id=sid, reward_id=new.id, probability=p) for sid, p in probs.items()])
        s.commit()
    order = [i.item_id for i in rate_all(ws, engine, a)]
    assert order[:5] == [samples[4], samples[1], samples[2], samples[3], samples[0]]
    assert sorted(order[5:]) == samples[5:]  # unscored samples follow
    assert next_item(ws, engine, b) is None


def test_a_double_submit_stores_one_judgment(engine, ws_of):
    ws = ws_of()
    add_samples(engine, 2)
    [a] = add_annotators(engine, "ada")
    item = next_item(ws, engine, a)
    first = rate(ws, engine, a, item, "implausible", reasons=["staining"], request_id="req-1", seconds=3.5)
    again = rate(ws, engine, a, item, "implausible", reasons=["staining"], request_id="req-1", seconds=3.5)
    assert again.id == first.id and len(rows(engine)) == 1
    assert first.reasons == ["staining"] and first.seconds == 3.5 and first.created_at.tzinfo is not None
    other = next_item(ws, engine, a)
    with pytest.raises(PathloopError, match="request id 'req-1' was already used for another item"):
        rate(ws, engine, a, other, request_id="req-1")


def test_an_edit_supersedes_and_nothing_is_overwritten(engine, ws_of):
    ws = ws_of(overlap=1)
    [x] = add_samples(engine, 1)
    a, b = add_annotators(engine, "ada", "bob")
    item = next_item(ws, engine, a)
    first = rate(ws, engine, a, item, "plausible")
    edit = rate(ws, engine, a, item, "implausible", reasons=["nuclear shape"], comment="on second look")
    assert edit.supersedes_id == first.id
    assert [j.id for j in current_judgments(engine)] == [edit.id] and decisive_counts(engine) == {x: 1}
    # Changed to unsure: no longer a rating, so the sample opens for others.
    rate(ws, engine, a, item, "unsure")
    assert next_item(ws, engine, b).item_id == x
    assert [j.verdict for j in rows(engine)] == ["plausible", "implausible", "unsure"]
    assert recount_ratings(engine) == 0


def test_undo_appends_a_retraction_and_offers_the_item_again(engine, ws_of):
    ws = ws_of(overlap=1)
    add_samples(engine, 3)
    [a] = add_annotators(engine, "ada")
    first = next_item(ws, engine, a)
    j1 = rate(ws, engine, a, first)
    second = next_item(ws, engine, a)
    j2 = rate(ws, engine, a, second)
    third = next_item(ws, engine, a)  # on screen when ada presses undo
    undone = undo_last(ws, engine, a, request_id="undo-1")
    assert undone.id == j2.id
    assert undo_last(ws, engine, a, request_id="undo-1").id == j2.id  # idempotent
    history = rows(engine)
    assert [j.verdict for j in history] == ["plausible", "plausible", "retracted"]
    assert history[2].supersedes_id == j2.id
    assert next_item(ws, engine, a).item_id == second.item_id  # the undone tile comes back first
    redo = rate(ws, engine, a, second, "implausible")
    assert redo.supersedes_id == history[2].id
    assert next_item(ws, engine, a).item_id == third.item_id  # then the tile that was on screen
    assert undo_last(ws, engine, a, request_id="undo-2").id == redo.id
    assert undo_last(ws, engine, a, request_id="undo-3").id == j1.id
    assert undo_last(ws, engine, a, request_id="undo-4") is None
    assert len(rows(engine)) == 6 and current_judgments(engine) == []  # rows only ever appended
    assert recount_ratings(engine) == 0
    with pytest.raises(PathloopError, match="already used for a rating"):
        undo_last(ws, engine, a, request_id=j1.request_id)


def test_a_rating_for_an_item_never_given_or_unknown_is_refused(engine, ws_of):
    ws = ws_of()
    x, y = add_samples(engine, 2)
    [tile] = add_tiles(engine, 1)
    a, b = add_annotators(engine, "ada", "bob")
    given = next_item(ws, engine, a)
    other = y if given.item_id == x else x
    with pytest.raises(PathloopError, match=f"sample {other} was never given to ada"):
        record_judgment(ws, engine, a, kind="sample", item_id=other, verdict="plausible", request_id="r1")
    with pytest.raises(PathloopError, match=f"sample {given.item_id} was never given to bob"):
        record_judgment(ws, engine, b, kind="sample", item_id=given.item_id, verdict="plausible", request_id="r2")
    with pytest.raises(PathloopError, match=f"control {tile} was never given to ada"):
        record_judgment(ws, engine, a, kind="control", item_id=tile, verdict="plausible", request_id="r3")
    with pytest.raises(PathloopError, match="sample 9999 does not exist"):
        record_judgment(ws, engine, a, kind="sample", item_id=9999, verdict="plausible", request_id="r4")
    with pytest.raises(PathloopError, match="control tile 9999 does not exist"):
        record_judgment(ws, engine, a, kind="control", item_id=9999, verdict="plausible", request_id="r5")
    assert rows(engine) == []


@pytest.mark.parametrize(("change", "message"), [
    ({"verdict": "retracted"}, "verdict 'retracted'; expected one of: plausible, implausible, unsure"),
    ({"reasons": ["looks fake"]}, "reason 'looks fake' is not a criterion"),
    ({"seconds": -1}, r"seconds = -1; expected a time of 0 or more seconds"),
    ({"kind": "tile"}, "item kind 'tile'; expected one of: sample, control"),
    ({"request_id": ""}, "request id ''; expected a non-empty string"),
])
def test_bad_judgment_input_is_one_clear_line(engine, ws_of, change, message):
    ws = ws_of()
    add_samples(engine, 1)
    [a] = add_annotators(engine, "ada")
    item = next_item(ws, engine, a)
    args = {"kind": item.kind, "item_id": item.item_id, "verdict": "implausible", "request_id": "r", **change}
    with pytest.raises(PathloopError, match=message):
        record_judgment(ws, engine, a, **args)


def test_a_disabled_or_unknown_annotator_gets_nothing(engine, ws_of):
    ws = ws_of()
    add_samples(engine, 1)
    [a] = add_annotators(engine, "ada")
    with Session(engine) as s:
        ann = s.get(Annotator, a)
        ann.active = False
        s.add(ann)
        s.commit()
    with pytest.raises(PathloopError, match="account ada is disabled"):
        next_item(ws, engine, a)
    with pytest.raises(PathloopError, match="annotator id 999 does not exist"):
        next_item(ws, engine, 999)


def test_progress_counts_today_this_round_and_what_is_left(engine, ws_of):
    ws = ws_of(overlap=1, control_share=0.2)
    add_samples(engine, 10)
    add_tiles(engine, 10)
    [a] = add_annotators(engine, "ada")
    yesterday = utcnow() - timedelta(days=1)
    start = progress(ws, engine, a)
    assert start["rated_total"] == 0 and 12 <= start["remaining"] <= 13  # 10 samples, controls among them
    rate(ws, engine, a, next_item(ws, engine, a), now=yesterday)
    with Session(engine) as s:
        s.add(Round(number=1, created_at=utcnow() - timedelta(hours=1)))
        s.commit()
    seen = [progress(ws, engine, a)["remaining"]]
    while (item := next_item(ws, engine, a)) is not None:
        rate(ws, engine, a, item)
        seen.append(progress(ws, engine, a)["remaining"])
    # Exactly what was then served, one less after every tile, control or not.
    assert seen == list(range(start["remaining"] - 1, -1, -1))
    n = start["remaining"]
    assert progress(ws, engine, a) == {"rated_today": n - 1, "rated_total": n, "rated_this_round": n - 1,
                                       "remaining": 0}


@pytest.mark.parametrize("backend", BACKENDS)
def test_migration_0002_backfills_ratings_and_keys(backend, request, tmp_path):
    engine = make_engine(database_url(backend, request, tmp_path, migrated=False))
    upgrade(engine, "0001")
    with engine.begin() as c:
        c.execute(text("INSERT INTO image (id, sha256, width, height, path) VALUES (1, 'a', 1, 1, 'p')"))
        c.execute(text("INSERT INTO generator_version (id, folder, kind, config, created_at) "
                       "VALUES (1, 'g', 'pretrained', '{}', CURRENT_TIMESTAMP)"))
        c.execute(text("INSERT INTO annotator (id, username, role, active, created_at) "
                       "VALUES (1, 'ada', 'annotator', true, CURRENT_TIMESTAMP)"))
        for sid in (1, 2):
            c.execute(text("INSERT INTO sample (id, image_id, generator_id, class_name, seed, sampler, steps, guidance,"
                           " created_at) VALUES (:i, 1, 1, 'x', :i, 'ddpm', 2, 0, CURRENT_TIMESTAMP)"), {"i": sid})
        for jid, sid, verdict, sup in [(1, 1, "plausible", None), (2, 1, "retracted", 1), (3, 2, "implausible", None)]:
            c.execute(text("INSERT INTO judgment (id, sample_id, annotator_id, verdict, reasons, comment, request_id,"
                           " supersedes_id, created_at) VALUES (:j, :s, 1, :v, '[]', '', :r, :p, CURRENT_TIMESTAMP)"),
                      {"j": jid, "s": sid, "v": verdict, "r": f"r{jid}", "p": sup})
    upgrade(engine)
    with Session(engine) as s:
        got = s.exec(select(Sample.id, Sample.current_ratings, Sample.queue_key).order_by(Sample.id)).all()
        assert [(i, r) for i, r, _ in got] == [(1, 0), (2, 1)]
        assert all(0 <= k < KEY_SPACE for _, _, k in got)
        assert s.exec(select(Annotator.failed_logins)).one() == 0
    engine.dispose()


@pytest.mark.parametrize("backend", BACKENDS)
def test_many_annotators_at_once_lose_and_duplicate_nothing(backend, request, tmp_path, make_workspace):
    url = database_url(backend, request, tmp_path)
    ws = make_workspace(url, overlap=2, control_share=0.1)
    setup = make_engine(url)
    samples = add_samples(setup, 50)
    add_tiles(setup, 8)
    annotators = add_annotators(setup, *(f"rater{i}" for i in range(24)))
    submitted: dict[int, list[str]] = {a: [] for a in annotators}
    errors: list[BaseException] = []
    start = threading.Barrier(len(annotators))

    def work(annotator_id: int) -> None:
        engine = make_engine(url)  # one engine per thread: like separate app processes
        try:
            start.wait()
            while True:
                item = next_item(ws, engine, annotator_id)
                if item is None:
                    with Session(engine) as s:  # others still hold leases: their items may reopen
                        live = s.exec(select(func.count()).select_from(Lease).where(Lease.expires_at > utcnow())).one()
                    if not live:
                        return
                    time.sleep(0.01)
                    continue
                verdict = ("unsure" if _mix(annotator_id, item.item_id) % 8 == 0
                           else DECISIVE[_mix(item.item_id) % 2])
                rid = uuid.uuid4().hex
                j = rate(ws, engine, annotator_id, item, verdict, request_id=rid)
                if len(submitted[annotator_id]) % 3 == 0:  # a double click
                    assert rate(ws, engine, annotator_id, item, verdict, request_id=rid).id == j.id
                submitted[annotator_id].append(rid)
        except BaseException as e:  # reported below; a thread's exception is otherwise lost
            errors.append(e)
        finally:
            engine.dispose()

    threads = [threading.Thread(target=work, args=(a,)) for a in annotators]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads)
    assert errors == []
    assert decisive_counts(setup) == {s: 2 for s in samples}  # exactly the overlap target
    history = rows(setup)
    per_item = Counter((j.annotator_id, j.sample_id, j.tile_id) for j in history)
    assert max(per_item.values()) == 1  # nobody judged an item twice
    sent = sorted(r for rids in submitted.values() for r in rids)
    assert sorted(j.request_id for j in history) == sent  # every submitted judgment stored, once
    assert sum(j.tile_id is not None for j in history) > 0  # controls were mixed in
    assert recount_ratings(setup) == 0  # the cached counts and every tally agree with the rows
    now = utcnow()
    assert all(progress(ws, setup, a, now=now) == counted_progress(ws, setup, a, now) for a in annotators)
    setup.dispose()


def _history_of_three_raters(ws, engine, t0: datetime) -> list[int]:
    """Three raters over three days, across hour and day boundaries: ratings, unsure, edits,
    undos and ratings after an undo, with controls mixed in; a fourth account never rates."""
    raters = add_annotators(engine, "ada", "bob", "cy", "dee")
    verdicts = ("plausible", "implausible", "unsure", "plausible", "implausible")
    for step in range(90):
        a = raters[step % 3]
        now = t0 + timedelta(minutes=47 * step)
        item = next_item(ws, engine, a, now=now)
        if item is None:
            continue
        rate(ws, engine, a, item, verdicts[step % 5], now=now)
        if step % 6 == 0:  # an edit: another verdict on the same item, a few minutes later
            rate(ws, engine, a, item, verdicts[(step + 2) % 5], now=now + timedelta(minutes=4))
        if step % 7 == 3:
            undo_last(ws, engine, a, request_id=uuid.uuid4().hex, now=now + timedelta(minutes=5))
            if step % 14 == 3:  # rated again after the undo
                again = next_item(ws, engine, a, now=now + timedelta(minutes=6))
                rate(ws, engine, a, again, "implausible", now=now + timedelta(minutes=6))
    return raters


def test_progress_numbers_equal_a_count_of_the_rows(engine, ws_of):
    """Exactness of the tallies progress reads: against a count of the rows in Python, for
    several raters, at several times, before and after rounds began (mid-hour and on the
    hour), under other overlap targets and class lists, and after a rebuild of broken tallies."""
    ws = ws_of(overlap=2, control_share=0.25)
    add_samples(engine, 24)
    add_tiles(engine, 6, split="test")
    add_tiles(engine, 4, split="val", tag="v")
    add_tiles(engine, 3, split="train", tag="tr")  # never controls
    add_tiles(engine, 2, split="test", classes=("other",), tag="o")  # not a workspace class
    t0 = datetime(2026, 3, 1, 22, 13, 7, 250000, tzinfo=UTC)
    raters = _history_of_three_raters(ws, engine, t0)
    with Session(engine) as s:
        assert s.exec(select(func.count()).where(Judgment.verdict == "retracted")).one() >= 5
        assert s.exec(select(func.count()).where(Judgment.tile_id.is_not(None))).one() >= 3
        full = s.exec(select(func.count()).select_from(Sample).where(Sample.current_ratings >= 2)).one()
        assert full > 0  # some samples reached the overlap target: they leave the open count
    variants = [ws] + [Workspace(ws.root, dataclasses.replace(ws.settings, **change)) for change in
                       ({"overlap": 1}, {"overlap": 3, "control_share": 0.1}, {"classes": ["dab_positive"]})]

    def check(*times):
        for w in variants:
            for now in times:
                for a in raters:
                    assert progress(w, engine, a, now=now) == counted_progress(w, engine, a, now), (w.settings, now, a)

    end = t0 + timedelta(days=3)
    check(t0 + timedelta(hours=20), t0 + timedelta(days=2), end)
    with Session(engine) as s:
        s.add(Round(number=1, created_at=t0 + timedelta(hours=26, minutes=31, seconds=5)))  # mid-hour
        s.commit()
    check(t0 + timedelta(days=2), end)
    with Session(engine) as s:
        s.add(Round(number=2, created_at=datetime(2026, 3, 3, 9, tzinfo=UTC)))  # on the hour
        s.commit()
    check(end)
    assert progress(ws, engine, raters[0], now=end)["rated_this_round"] > 0
    assert recount_ratings(engine) == 0

    # A rebuild repairs every tally, whatever went wrong with it.
    with Session(engine) as s:
        s.exec(delete(RaterHourTally).where(RaterHourTally.annotator_id == raters[0]))
        s.exec(update(RaterRatingTally).values(judgments=RaterRatingTally.judgments + 1))
        s.exec(update(RaterControlTally).values(tiles=0))
        s.exec(update(SampleTally).values(samples=SampleTally.samples + 5))
        s.exec(delete(TileTally).where(TileTally.split == "val"))
        s.exec(update(Annotator).values(judged_items=0, current_judgments=99))
        s.commit()
    assert recount_ratings(engine) > 0
    assert recount_ratings(engine) == 0
    check(end)


@pytest.mark.parametrize("backend", BACKENDS)
def test_migration_0004_backfills_the_tallies(backend, request, tmp_path, make_workspace):
    url = database_url(backend, request, tmp_path, migrated=False)
    engine = make_engine(url)
    upgrade(engine, ScriptDirectory.from_config(_alembic_config(None)).get_revision("0004").down_revision)
    stamp = "2026-03-01 10:30:00"
    with engine.begin() as c:
        c.execute(text("INSERT INTO image (id, sha256, width, height, path) VALUES (1, 'a', 1, 1, 'p')"))
        c.execute(text("INSERT INTO generator_version (id, folder, kind, config, created_at) "
                       "VALUES (1, 'g', 'pretrained', '{}', CURRENT_TIMESTAMP)"))
        for aid in (1, 2):
            c.execute(text("INSERT INTO annotator (id, username, role, active, created_at, failed_logins) "
                           "VALUES (:a, :u, 'annotator', true, CURRENT_TIMESTAMP, 0)"), {"a": aid, "u": f"r{aid}"})
        for sid, ratings in ((1, 1), (2, 2), (3, 0)):
            c.execute(text("INSERT INTO sample (id, image_id, generator_id, class_name, seed, sampler, steps, guidance,"
                           " created_at, current_ratings, queue_key) VALUES (:i, 1, 1, 'dab_negative', :i, 'ddpm', 2,"
                           " 0, CURRENT_TIMESTAMP, :r, :i)"), {"i": sid, "r": ratings})
        for tid, split in ((1, "test"), (2, "val"), (3, "train")):
            c.execute(text("INSERT INTO tile (id, image_id, class_name, split, created_at) "
                           "VALUES (:t, 1, 'dab_positive', :s, CURRENT_TIMESTAMP)"), {"t": tid, "s": split})
        for jid, sid, tid, aid, verdict, sup in [(1, 1, None, 1, "plausible", None), (2, 2, None, 1, "implausible", None),
                                                 (3, 2, None, 2, "plausible", None), (4, 1, None, 2, "plausible", None),
                                                 (5, 1, None, 2, "retracted", 4), (6, None, 1, 1, "plausible", None),
                                                 (7, None, 1, 1, "retracted", 6), (8, 3, None, 2, "unsure", None)]:
            c.execute(text("INSERT INTO judgment (id, sample_id, tile_id, annotator_id, verdict, reasons, comment,"
                           " request_id, supersedes_id, created_at) VALUES (:j, :s, :t, :a, :v, '[]', '', :r, :p,"
                           f" '{stamp}')"),
                      {"j": jid, "s": sid, "t": tid, "a": aid, "v": verdict, "r": f"r{jid}", "p": sup})
    upgrade(engine)
    assert recount_ratings(engine) == 0  # the backfill built every tally the rebuild would
    ws = make_workspace(url, overlap=2, control_share=0.5)
    for now in (datetime(2026, 3, 1, 23, tzinfo=UTC), datetime(2026, 3, 2, 1, tzinfo=UTC)):
        for a in (1, 2):
            assert progress(ws, engine, a, now=now) == counted_progress(ws, engine, a, now)
    assert progress(ws, engine, 1, now=datetime(2026, 3, 1, 23, tzinfo=UTC))["rated_total"] == 2
    # The triggers keep the sample and tile tallies from here on, however rows are added.
    with engine.begin() as c:
        c.execute(text("INSERT INTO tile (id, image_id, class_name, split, created_at) "
                       "VALUES (4, 1, 'dab_positive', 'test', CURRENT_TIMESTAMP)"))
        c.execute(text("UPDATE sample SET current_ratings = 2 WHERE id = 1"))
        c.execute(text("DELETE FROM judgment WHERE sample_id = 3"))
        c.execute(text("DELETE FROM sample WHERE id = 3"))
    with Session(engine) as s:
        assert dict(s.exec(select(SampleTally.current_ratings, SampleTally.samples)).all()) == {0: 0, 1: 0, 2: 2}
        assert s.exec(select(TileTally.tiles).where(TileTally.split == "test")).one() == 2
    engine.dispose()


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_migrated_schema_matches_the_models(backend, request, tmp_path):
    engine = make_engine(database_url(backend, request, tmp_path))
    with engine.connect() as c, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # SQLite cannot reflect the expression index: it is skipped
        diff = compare_metadata(MigrationContext.configure(c, opts={"compare_type": True}), metadata)
    assert diff == []
    engine.dispose()
