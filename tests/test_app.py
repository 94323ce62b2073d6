"""The annotation app through Streamlit's AppTest: sign-in, rating, undo, roles, admin pages.

Runs on SQLite; the queue and judgment logic behind it is tested on both backends in the
store tests. Keyboard shortcuts need a browser: see test_browser.py.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from rating_workspace import PASSWORDS, add_controls, build_workspace, judgments
from sqlalchemy.exc import OperationalError
from sqlmodel import Session, select
from streamlit.testing.v1 import AppTest

from annotate_app import launch
from store import accounts, agreement, queue
from store.errors import PathloopError
from store.models import Annotator, Evaluation
from store.workspace import DEFAULT_CRITERIA, Settings, Workspace

APP = Path(__file__).resolve().parents[1] / "annotate_app" / "app.py"
TIMEOUT = 120  # first runs import pandas and friends on a shared 2-core machine


@pytest.fixture
def rating_ws(tmp_path, monkeypatch):
    ws, engine = build_workspace(tmp_path / "ws")
    monkeypatch.setenv("PATHLOOP_WORKSPACE", str(ws.root))
    yield ws, engine
    engine.dispose()


def start() -> AppTest:
    at = AppTest.from_file(str(APP), default_timeout=TIMEOUT)
    return at.run()


def sign_in(at: AppTest, username: str, password: str | None = None) -> AppTest:
    at.text_input(key="sign_in_username").input(username)
    at.text_input(key="sign_in_password").input(PASSWORDS[username] if password is None else password)
    return button(at, "Sign in").click().run()


def button(at: AppTest, label: str):
    found = [b for b in at.button if b.label == label]
    assert found, f"no button {label!r}; have {[b.label for b in at.button]}"
    return found[0]


def texts(at: AppTest) -> str:
    """Everything the run rendered (markdown, widgets, tables as Arrow bytes), as one string."""
    return "\n".join(str(getattr(node, "proto", "")) for node in at._tree)


def shown_class(at: AppTest) -> str:
    heads = [h.value for h in at.subheader if h.value.startswith("generated as: ")]
    assert len(heads) == 1, heads
    return heads[0].removeprefix("generated as: ")


def annotator_id(engine, name: str) -> int:
    return next(u.id for u in accounts.list_users(engine) if u.username == name)


def assert_no_errors(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]


def test_sign_in_wrong_password_disabled_and_right(rating_ws):
    _, engine = rating_ws
    at = start()
    assert_no_errors(at)
    sign_in(at, "alice", "not-her-password")
    assert "wrong username or password" in at.error[0].value
    assert not at.subheader  # still the sign-in page
    sign_in(at, "nobody", "whatever")
    assert "wrong username or password" in at.error[0].value

    accounts.set_active(engine, "carol", False)
    sign_in(at, "carol")
    assert "disabled" in at.error[0].value

    sign_in(at, "alice")
    assert_no_errors(at)
    assert shown_class(at) in ("dab_negative", "dab_positive")
    state = at.session_state.to_dict()
    assert state["username"] == "alice" and state["role"] == "annotator"
    for value in state.values():  # the typed password is gone from the session
        assert PASSWORDS["alice"] not in str(value)
    assert "scrypt$" not in texts(at) and PASSWORDS["alice"] not in texts(at)


def test_rating_stores_one_judgment_with_time_and_request_id(rating_ws):
    ws, engine = rating_ws
    at = sign_in(start(), "alice")
    uid = annotator_id(engine, "alice")
    leased = queue.next_item(ws, engine, uid)  # the tile on screen (the lease is live)
    first_class = shown_class(at)
    assert first_class == leased.shown_class

    button(at, "Plausible").click().run()
    assert_no_errors(at)
    rows = judgments(engine)
    assert len(rows) == 1
    j = rows[0]
    assert (j.annotator_id, j.sample_id, j.verdict) == (uid, leased.item_id, "plausible")
    assert j.seconds is not None and j.seconds >= 0 and j.request_id
    assert "1 rated today" in texts(at)
    assert queue.next_item(ws, engine, uid).item_id != leased.item_id  # the next tile is on screen

    button(at, "Unsure / skip").click().run()
    assert [r.verdict for r in judgments(engine)] == ["plausible", "unsure"]
    assert len({r.request_id for r in judgments(engine)}) == 2


def test_implausible_with_reasons_and_comment(rating_ws):
    _, engine = rating_ws
    at = sign_in(start(), "alice")
    button(at, "Implausible…").click().run()
    assert [c.label for c in at.checkbox] == DEFAULT_CRITERIA
    assert not judgments(engine)  # opening the checklist saves nothing
    at.checkbox[1].check()
    at.checkbox[6].check()
    at.text_area[0].input("nuclei look smeared")
    button(at, "Submit implausible").click().run()
    assert_no_errors(at)
    (j,) = judgments(engine)
    assert j.verdict == "implausible"
    assert j.reasons == [DEFAULT_CRITERIA[1], DEFAULT_CRITERIA[6]]
    assert j.comment == "nuclei look smeared"
    assert not at.checkbox  # next tile, checklist closed


def test_cancel_closes_checklist_without_saving(rating_ws):
    _, engine = rating_ws
    at = sign_in(start(), "alice")
    before = shown_class(at)
    button(at, "Implausible…").click().run()
    button(at, "Cancel").click().run()
    assert not at.checkbox and not judgments(engine) and shown_class(at) == before


def test_undo_appends_a_retraction(rating_ws):
    _, engine = rating_ws
    at = sign_in(start(), "alice")
    button(at, "Plausible").click().run()
    (first,) = judgments(engine)
    button(at, "Undo last rating").click().run()
    assert_no_errors(at)
    rows = judgments(engine)
    assert len(rows) == 2 and rows[0].id == first.id and rows[0].verdict == "plausible"
    assert rows[1].verdict == "retracted" and rows[1].supersedes_id == first.id


def test_database_failure_is_not_shown_as_saved(rating_ws, monkeypatch):
    _, engine = rating_ws
    at = sign_in(start(), "alice")
    before = shown_class(at)

    def gone(*args, **kwargs):
        raise OperationalError("INSERT ...", {}, Exception("disk I/O error"))

    with monkeypatch.context() as m:
        m.setattr(queue, "record_judgment", gone)
        button(at, "Plausible").click().run()
    assert "NOT saved" in at.error[0].value and "disk I/O error" in at.error[0].value
    assert not at.toast and not judgments(engine)
    assert shown_class(at) == before
    button(at, "Plausible").click().run()  # the retry stores it
    assert [j.verdict for j in judgments(engine)] == ["plausible"]


def test_query_parameter_cannot_choose_the_item(rating_ws):
    ws, engine = rating_ws
    at = sign_in(start(), "alice")
    uid = annotator_id(engine, "alice")
    leased = queue.next_item(ws, engine, uid)
    other = leased.item_id + 1 if leased.item_id == 1 else 1
    at.query_params.update({"item": str(other), "sample_id": str(other), "kind": "control"})
    button(at, "Plausible").click().run()
    (j,) = judgments(engine)
    assert j.sample_id == leased.item_id and j.tile_id is None


def test_empty_queue_says_nothing_left(tmp_path, monkeypatch):
    ws, engine = build_workspace(tmp_path / "ws", n_samples=0)
    monkeypatch.setenv("PATHLOOP_WORKSPACE", str(ws.root))
    at = sign_in(start(), "alice")
    assert_no_errors(at)
    assert at.header[0].value == "Nothing left to rate"
    assert not [b for b in at.button if b.label == "Plausible"]
    engine.dispose()


def test_rating_until_the_queue_is_empty(tmp_path, monkeypatch):
    ws, engine = build_workspace(tmp_path / "ws", n_samples=2)
    monkeypatch.setenv("PATHLOOP_WORKSPACE", str(ws.root))
    at = sign_in(start(), "alice")
    button(at, "Plausible").click().run()
    button(at, "Plausible").click().run()
    assert at.header[0].value == "Nothing left to rate"
    button(at, "Undo last rating").click().run()  # undo still works from the empty page
    assert judgments(engine)[-1].verdict == "retracted"
    engine.dispose()


def test_annotator_has_no_admin_pages(rating_ws):
    at = sign_in(start(), "alice")
    at.switch_page("views/my_progress.py").run()
    assert_no_errors(at)
    assert at.title[0].value == "My progress"
    for page in ("dashboard", "accounts", "export"):
        with pytest.raises(ValueError, match="Could not find a navigation page"):
            at.switch_page(f"views/{page}.py")


def test_admin_loses_admin_pages_when_demoted(rating_ws):
    _, engine = rating_ws
    at = sign_in(start(), "boss")
    at.switch_page("views/dashboard.py").run()
    assert at.title[0].value == "Dashboard"
    accounts.set_role(engine, "carol", "admin")  # the store keeps at least one admin
    accounts.set_role(engine, "boss", "annotator")
    at.run()
    assert not [t for t in at.title if t.value == "Dashboard"]
    assert at.session_state["role"] == "annotator"


def test_disabled_mid_session_is_signed_out(rating_ws):
    _, engine = rating_ws
    at = sign_in(start(), "alice")
    accounts.set_active(engine, "alice", False)
    at.run()
    assert "annotator_id" not in at.session_state
    assert any("disabled" in w.value for w in at.warning)


def test_admin_pages_render_and_never_show_a_hash(rating_ws):
    ws, engine = rating_ws
    at = sign_in(start(), "alice")
    button(at, "Plausible").click().run()
    button(at, "Implausible…").click().run()
    at.checkbox[0].check()
    button(at, "Submit implausible").click().run()

    admin = sign_in(start(), "boss")
    seen = texts(admin)
    for page in ("dashboard", "accounts", "export", "my_progress", "rate"):
        admin.switch_page(f"views/{page}.py").run()
        assert_no_errors(admin)
        seen += texts(admin)
    assert "scrypt$" not in seen
    for u in accounts.list_users(engine):
        assert u.password_hash and u.password_hash not in seen


def test_admin_adds_an_account_and_sees_its_password_once(rating_ws):
    _, engine = rating_ws
    at = sign_in(start(), "boss")
    at.switch_page("views/accounts.py").run()
    name_box = next(t for t in at.text_input if t.label == "Username")
    name_box.input("dora")
    button(at, "Add account").click().run()
    assert_no_errors(at)
    (code,) = at.code
    password = code.value.strip()
    assert accounts.authenticate(engine, "dora", password).username == "dora"
    assert "scrypt$" not in texts(at)
    at.run()
    assert not at.code  # shown once
    assert "dora" in at.dataframe[0].value["username"].tolist()
    assert "password_hash" not in at.dataframe[0].value.columns


def test_admin_disables_an_account(rating_ws):
    _, engine = rating_ws
    at = sign_in(start(), "boss")
    at.switch_page("views/accounts.py").run()
    at.selectbox(key="accounts_pick").select("carol").run()
    button(at, "Disable carol").click().run()
    assert_no_errors(at)
    assert not next(u for u in accounts.list_users(engine) if u.username == "carol").active
    assert "boss" not in at.selectbox(key="accounts_pick").options  # admins cannot lock themselves out


def test_sign_in_through_identity_provider(rating_ws):
    _, engine = rating_ws
    assert not [b for b in start().button if b.label == "Sign in with your institution"]  # not configured
    at = AppTest.from_file(str(APP), default_timeout=TIMEOUT)
    at.secrets = {"auth": {"redirect_uri": "http://localhost:8501/oauth2callback", "cookie_secret": "x" * 32}}
    at.user = {"is_logged_in": False}
    button(at.run(), "Sign in with your institution")
    accounts.add_user(engine, "erin", email="erin@lab.example", password="erin-pass-1234")
    at = AppTest.from_file(str(APP), default_timeout=TIMEOUT)
    at.user = {"is_logged_in": True, "email": "erin@lab.example"}
    at.run()
    assert_no_errors(at)
    assert at.session_state["username"] == "erin"
    at = AppTest.from_file(str(APP), default_timeout=TIMEOUT)
    at.user = {"is_logged_in": True, "email": "stranger@elsewhere.example"}
    at.run()
    assert "annotator_id" not in at.session_state
    assert any("no pathloop account" in w.value for w in at.warning)


def test_sign_in_slows_down_after_repeated_failures(rating_ws):
    _, engine = rating_ws
    for _ in range(accounts.FREE_FAILURES):
        with pytest.raises(PathloopError, match="wrong"):
            accounts.authenticate(engine, "alice", "guess-1234", sleep=lambda _s: None)
    with pytest.raises(PathloopError, match="too many failed sign-ins for alice"):
        accounts.authenticate(engine, "alice", "guess-1234", sleep=lambda _s: None)
    # eight more failures, each after its wait: the next wait is 2**8 s, longer than any slow start below
    with Session(engine) as s:
        alice = s.exec(select(Annotator).where(Annotator.username == "alice")).one()
        alice.failed_logins += 8
        s.add(alice)
        s.commit()
    at = sign_in(start(), "alice")  # even the right password waits now
    assert "too many failed sign-ins for alice" in at.error[0].value
    assert "annotator_id" not in at.session_state


def test_controls_are_shown_like_samples(tmp_path, monkeypatch):
    ws, engine = build_workspace(tmp_path / "ws", n_samples=6, control_share=0.5)
    add_controls(ws, engine, 4)
    monkeypatch.setenv("PATHLOOP_WORKSPACE", str(ws.root))
    at = sign_in(start(), "alice")
    uid = annotator_id(engine, "alice")
    kinds = []
    for _ in range(6):
        item = queue.next_item(ws, engine, uid)  # what the page shows (the live lease)
        assert shown_class(at) == item.shown_class
        kinds.append(item.kind)
        button(at, "Plausible").click().run()
        assert_no_errors(at)
    assert "control" in kinds and "sample" in kinds
    rows = judgments(engine)
    assert sum(j.tile_id is not None for j in rows) == kinds.count("control")
    engine.dispose()


def rate_as(ws, engine, name: str, verdicts: list[str]) -> None:
    """Rate through the store, as another browser session would."""
    uid = annotator_id(engine, name)
    for v in verdicts:
        item = queue.next_item(ws, engine, uid)
        reasons = [DEFAULT_CRITERIA[0]] if v == "implausible" else []
        queue.record_judgment(ws, engine, uid, kind=item.kind, item_id=item.item_id, verdict=v, reasons=reasons,
                              seconds=3.0, request_id=uuid.uuid4().hex)


def test_dashboard_shows_figures_from_the_store(rating_ws):
    ws, engine = rating_ws
    rate_as(ws, engine, "alice", ["plausible", "implausible", "plausible"])
    rate_as(ws, engine, "carol", ["plausible", "implausible", "implausible"])
    with Session(engine) as s:
        s.add(Evaluation(generator_id=1, metrics={"fid": 12.5, "expert": {"rate": 0.5}}))
        s.commit()
    at = sign_in(start(), "boss")
    at.switch_page("views/dashboard.py").run()
    assert_no_errors(at)
    summary = agreement.agreement_summary(engine, ws.settings.overlap)
    metrics = {m.label: m.value for m in at.metric}
    kappa = summary["fleiss"]["kappa"]  # the queue's order is random, so kappa may be undefined
    assert metrics["Fleiss' kappa"] == ("–" if kappa is None else f"{kappa:.3f}")
    assert metrics["Decisive ratings"] == "6"
    tables = [d.value for d in at.dataframe]
    plaus = next(t for t in tables if "low" in t.columns and "high" in t.columns)
    assert plaus["n"].sum() == 6
    people = next(t for t in tables if "median_seconds" in t.columns)
    assert sorted(people["annotator"]) == ["alice", "carol"]
    evals = next(t for t in tables if "fid" in t.columns)
    assert evals["fid"].tolist() == [12.5] and evals["expert.rate"].tolist() == [0.5]
    reasons = next(t for t in tables if "reason" in t.columns)
    assert reasons["reason"].tolist() == [DEFAULT_CRITERIA[0]] and reasons["count"].tolist() == [3]


def test_export_page_offers_each_format(rating_ws):
    ws, engine = rating_ws
    at = sign_in(start(), "boss")
    at.switch_page("views/export.py").run()
    assert_no_errors(at)
    assert not at.download_button  # nothing to export yet
    rate_as(ws, engine, "alice", ["plausible", "unsure"])
    at.run()
    for fmt in ("csv", "parquet", "jsonl"):
        at.radio(key="export_format").set_value(fmt).run()
        assert_no_errors(at)
        assert at.download_button[0].label == f"Download {fmt.upper()}"


def test_launch_command_and_checks(tmp_path, rating_ws):
    ws, _ = rating_ws
    argv = launch.command(ws.root, "0.0.0.0", 8600)
    assert argv[1:5] == ["-m", "streamlit", "run", str(APP)]
    opts = dict(zip(argv[5::2], argv[6::2]))
    assert opts["--server.address"] == "0.0.0.0" and opts["--server.port"] == "8600"
    assert opts["--server.headless"] == "true" and opts["--browser.gatherUsageStats"] == "false"
    assert opts["--server.fileWatcherType"] == "none"
    assert launch.environment(ws.root)["PATHLOOP_WORKSPACE"] == str(ws.root)
    with pytest.raises(PathloopError, match="not a pathloop workspace"):
        launch.serve(tmp_path, "127.0.0.1", 8600)
    bare = Workspace.create(tmp_path / "bare", Settings(classes=["a"], tile_size=32))
    with pytest.raises(PathloopError, match="no pathloop schema"):
        launch.serve(bare.root, "127.0.0.1", 8600)


# -- keyboard checklist, saved state, retry of an unsaved rating, reference strip ------------

def add_train_tiles(ws, engine, n: int, class_name: str, seed: int = 7) -> list[int]:
    """Insert ``n`` real train-split tiles of one class (what the reference strip draws from)."""
    import numpy as np

    from store.models import Image, Tile

    rng = np.random.default_rng(seed)
    with Session(engine, expire_on_commit=False) as s:
        tiles = []
        for _ in range(n):
            enc, rel, _ = ws.images.put_array(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
            image = Image(sha256=enc.sha256, width=enc.width, height=enc.height, path=rel)
            s.add(image)
            s.flush()
            tile = Tile(image_id=image.id, class_name=class_name, split="train")
            s.add(tile)
            tiles.append(tile)
        s.commit()
        return [t.id for t in tiles]


def criterion_keys(at: AppTest) -> dict[str, object]:
    """The checklist's key buttons by their shortcut (Streamlit shows it on the button)."""
    return {b.proto.shortcut: b for b in at.button if b.key and b.key.startswith("key-")}


def test_every_criterion_has_a_key_that_toggles_it(rating_ws):
    _, engine = rating_ws
    at = sign_in(start(), "alice")
    button(at, "Implausible…").click().run()
    keys = criterion_keys(at)
    assert list(keys) == [str(i) for i in range(1, 10)]
    assert [b.label for b in keys.values()] == DEFAULT_CRITERIA  # each key sits on its criterion
    assert [c.label for c in at.checkbox] == DEFAULT_CRITERIA
    for k in ("3", "9", "1", "1"):  # a second press unticks
        criterion_keys(at)[k].click().run()
    assert [c.value for c in at.checkbox] == [i in (2, 8) for i in range(9)]
    assert not judgments(engine)
    button(at, "Submit implausible").click().run()
    assert_no_errors(at)
    (j,) = judgments(engine)
    assert j.verdict == "implausible" and j.reasons == [DEFAULT_CRITERIA[2], DEFAULT_CRITERIA[8]]


def test_long_checklists_get_letter_keys_that_the_page_does_not_use(tmp_path, monkeypatch):
    criteria = [f"criterion {i}" for i in range(14)]
    ws, engine = build_workspace(tmp_path / "ws", criteria=criteria)
    monkeypatch.setenv("PATHLOOP_WORKSPACE", str(ws.root))
    at = sign_in(start(), "alice")
    button(at, "Implausible…").click().run()
    assert list(criterion_keys(at)) == [*"1234567890", "a", "b", "d", "e"]  # never P I S U (verdicts), T (retry), C R (Streamlit)
    engine.dispose()


def saved_line(at: AppTest) -> str:
    return next((m.value for m in at.markdown if "Saved " in m.value), "")


def locked_until_told(real):
    """``real`` wrapped to fail with "database is locked" while ``calls["fail"]``: (wrapper, calls)."""
    calls = {"n": 0, "fail": True}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["fail"]:
            raise OperationalError("INSERT ...", {}, Exception("database is locked"))
        return real(*args, **kwargs)

    return flaky, calls


def test_unsaved_rating_is_retried_and_lands_once(rating_ws, monkeypatch):
    ws, engine = rating_ws
    at = sign_in(start(), "alice")
    assert any("Nothing saved yet" in c.value for c in at.caption)
    uid = annotator_id(engine, "alice")
    leased = queue.next_item(ws, engine, uid)
    flaky, calls = locked_until_told(queue.record_judgment)
    monkeypatch.setattr(queue, "record_judgment", flaky)
    button(at, "Implausible…").click().run()
    criterion_keys(at)["2"].click().run()
    button(at, "Submit implausible").click().run()
    assert_no_errors_but_banner = [e.value for e in at.error]
    assert len(assert_no_errors_but_banner) == 1 and "Not saved — retrying" in assert_no_errors_but_banner[0]
    assert "database is locked" in assert_no_errors_but_banner[0] and not at.toast
    assert at.session_state["pending"]["verdict"] == "implausible" and not judgments(engine)
    attempts = calls["n"]
    at.run()  # every run retries while the store refuses
    assert calls["n"] > attempts and "pending" in at.session_state and not judgments(engine)

    calls["fail"] = False
    at.run()
    assert_no_errors(at)
    (j,) = judgments(engine)
    assert (j.sample_id, j.verdict, j.reasons) == (leased.item_id, "implausible", [DEFAULT_CRITERIA[1]])
    assert "pending" not in at.session_state
    assert f"Saved {j.created_at:%H:%M:%S} UTC" in saved_line(at)
    assert queue.next_item(ws, engine, uid).item_id != leased.item_id  # on to the next tile
    at.run()
    assert len(judgments(engine)) == 1


def test_rating_whose_reply_was_lost_is_stored_once(rating_ws, monkeypatch):
    _, engine = rating_ws
    at = sign_in(start(), "alice")
    real = queue.record_judgment
    calls = {"n": 0}

    def commits_then_fails(*args, **kwargs):
        calls["n"] += 1
        j = real(*args, **kwargs)
        if calls["n"] == 1:
            raise OperationalError("COMMIT", {}, Exception("connection reset"))
        return j

    monkeypatch.setattr(queue, "record_judgment", commits_then_fails)
    button(at, "Plausible").click().run()  # stored, but the app was told it failed: it retries
    assert_no_errors(at)
    assert calls["n"] >= 2
    (j,) = judgments(engine)
    assert j.verdict == "plausible" and f"Saved {j.created_at:%H:%M:%S} UTC" in saved_line(at)


def test_reference_strip_shows_train_tiles_of_the_class(tmp_path, monkeypatch):
    ws, engine = build_workspace(tmp_path / "ws", n_samples=4, reference_tiles=3)
    for i, c in enumerate(ws.settings.classes):
        add_train_tiles(ws, engine, 5, c, seed=10 + i)
    monkeypatch.setenv("PATHLOOP_WORKSPACE", str(ws.root))
    at = sign_in(start(), "alice")
    assert_no_errors(at)
    cls = shown_class(at)
    assert any(f"real **{cls}** tiles" in c.value for c in at.caption)
    assert len(at.get("image")) == 1 + 3 + 1  # the tile, the strip, and "Actual pixels"

    first = queue.reference_tiles(ws, engine, cls, 3)
    assert len(first) == 3 and first == queue.reference_tiles(ws, engine, cls, 3)  # stable per class
    from store.models import Image, Tile

    with Session(engine) as s:
        train = {ws.root / im.path for t in s.exec(select_train(Tile)).all()
                 if t.class_name == cls for im in [s.get(Image, t.image_id)]}
    assert set(first) <= train
    engine.dispose()


def select_train(Tile):
    from sqlmodel import select

    return select(Tile).where(Tile.split == "train")


def test_reference_strip_never_shows_the_control_itself(tmp_path, monkeypatch):
    from sqlmodel import select

    from store.models import Image, Tile

    ws, engine = build_workspace(tmp_path / "ws", n_samples=4, control_share=0.5, reference_tiles=4)
    (control_id,) = add_controls(ws, engine, 1)
    add_train_tiles(ws, engine, 2, "dab_negative")
    with Session(engine) as s:  # the control's very image also filed (wrongly) under train
        control = s.get(Tile, control_id)
        s.add(Tile(image_id=control.image_id, class_name=control.class_name, split="train"))
        s.commit()
        control_png = ws.root / s.get(Image, control.image_id).path
        n_train = len(s.exec(select(Tile).where(Tile.split == "train", Tile.class_name == "dab_negative")).all())
    assert n_train == 3
    shown = queue.reference_tiles(ws, engine, "dab_negative", 4, exclude_kind="control", exclude_id=control_id)
    assert len(shown) == 2 and control_png not in shown
    assert control_png in queue.reference_tiles(ws, engine, "dab_negative", 4)  # only excluded when shown

    monkeypatch.setenv("PATHLOOP_WORKSPACE", str(ws.root))
    at = sign_in(start(), "alice")
    uid = annotator_id(engine, "alice")
    for _ in range(4):  # controls get the same strip as samples
        item = queue.next_item(ws, engine, uid)
        if item.shown_class == "dab_negative":
            assert any("real **dab_negative** tiles" in c.value for c in at.caption)
        button(at, "Plausible").click().run()
        assert_no_errors(at)
    engine.dispose()


def test_reference_strip_off_and_setting_checked(tmp_path, monkeypatch):
    ws, engine = build_workspace(tmp_path / "ws", n_samples=2, reference_tiles=0)
    add_train_tiles(ws, engine, 3, "dab_negative")
    add_train_tiles(ws, engine, 3, "dab_positive", seed=8)
    monkeypatch.setenv("PATHLOOP_WORKSPACE", str(ws.root))
    at = sign_in(start(), "alice")
    assert not [c for c in at.caption if "For comparison" in c.value]
    assert len(at.get("image")) == 2
    assert Workspace.open(ws.root).settings.reference_tiles == 0  # the template writes it
    for bad in (-1, 13, True, 2.5):
        with pytest.raises(PathloopError, match="reference_tiles"):
            Settings(classes=["a"], reference_tiles=bad)
    assert Settings(classes=["a"]).reference_tiles == 4
    engine.dispose()
