"""The Real-or-synthetic page in a real headless Chromium, by keys alone; then the dashboard.

Set ``$PATHLOOP_TURING_SCREENSHOTS`` to a folder (``docs``) to also save the two screens there
as turing-test.png and turing-dashboard.png.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest
from rating_workspace import build_workspace
from sqlmodel import Session, select
from test_browser import (  # noqa: F401 (chromium: the fixture)
    WAIT_MS,
    add_train_tiles,
    blob_rgb,
    chromium,
    launch,
    new_page,
    press_until_done,
    serving,
    sign_in,
)

from store import accounts, turing
from store.models import GeneratorVersion, Image, Sample, TuringAnswer, TuringItem
from store.turing import CampaignConfig

SCREENSHOTS_ENV = "PATHLOOP_TURING_SCREENSHOTS"


def add_blob_samples(ws, engine, per_class: int) -> int:
    """Synthetic samples that look like the real tiles (a little noisier); returns their generator id."""
    rng = np.random.default_rng(5)
    with Session(engine) as s:
        gv = GeneratorVersion(folder="models/generators/blobs", kind="imported")
        s.add(gv)
        s.flush()
        for c in ws.settings.classes:
            for i in range(per_class):
                enc, rel, _ = ws.images.put_array(blob_rgb(rng, c, noise=9.0))
                image = Image(sha256=enc.sha256, width=enc.width, height=enc.height, path=rel)
                s.add(image)
                s.flush()
                s.add(Sample(image_id=image.id, generator_id=gv.id, class_name=c, seed=i, sampler="ddpm", steps=2))
        s.commit()
        return gv.id


@pytest.fixture
def turing_served(tmp_path, chromium):  # noqa: F811 (the imported fixture)
    ws, engine = build_workspace(tmp_path / "ws", n_samples=0)
    gid = add_blob_samples(ws, engine, 2)
    for i, c in enumerate(ws.settings.classes):
        add_train_tiles(ws, engine, 3, c, seed=40 + i, split="test")
    cid = turing.create_campaign(ws, engine, CampaignConfig(name="blind-1", model=str(gid), per_class=2,
                                                            real_share=0.5))
    turing.set_active(engine, cid, True)
    with serving(ws, engine, tmp_path) as url:
        yield url, ws, engine, cid, tmp_path


def answers(engine) -> list[TuringAnswer]:
    with Session(engine) as s:
        return list(s.exec(select(TuringAnswer).order_by(TuringAnswer.id)).all())


def test_real_or_synthetic_by_keys_alone(chromium, turing_served):  # noqa: F811
    from playwright import sync_api

    url, ws, engine, cid, tmp = turing_served
    shots = Path(os.environ[SCREENSHOTS_ENV]) if os.environ.get(SCREENSHOTS_ENV) else tmp
    with sync_api.sync_playwright() as p:
        browser = launch(p, chromium)
        try:
            page, idle = new_page(browser, 1000)
            expect = sync_api.expect
            heading = page.get_by_text(re.compile(r"^class: "))

            def press_until(key: str, n: int, what: str) -> None:
                press_until_done(page, heading, key, lambda: len(answers(engine)) >= n, what, idle)

            sign_in(page, f"{url}/turing", "alice")
            expect(heading).to_be_visible(timeout=WAIT_MS)
            idle()
            expect(page.get_by_text("0 of 8 answered")).to_be_visible()
            for name, key in (("Synthetic — certain", "1"), ("Real — certain", "0")):
                expect(page.get_by_role("button", name=f"{name} Shortcut {key}", exact=True)).to_be_visible()
            expect(page.get_by_role("img", name="tile")).to_have_count(1)

            press_until("2", 1, "a synthetic, fairly sure answer")
            expect(page.get_by_text("1 of 8 answered")).to_be_visible(timeout=WAIT_MS)
            press_until("9", 2, "a real, fairly sure answer")
            press_until("u", 3, "an undo")
            expect(page.get_by_text("1 of 8 answered")).to_be_visible(timeout=WAIT_MS)
            press_until("0", 4, "a real, certain answer")
            press_until("3", 5, "a synthetic guess")
            rows = answers(engine)
            expect(page.get_by_text(f"Saved {rows[-1].created_at:%H:%M:%S} UTC")).to_be_visible(timeout=WAIT_MS)
            # the badge names the last answer (two answers can share a second; the page may still show
            # the previous run's badge while it reruns)
            expect(page.get_by_text(re.compile(r"UTC · synthetic \(guess\)"))).to_be_visible(timeout=WAIT_MS)
            expect(page.get_by_text("3 of 8 answered")).to_be_visible(timeout=WAIT_MS)
            page.screenshot(path=str(shots / "turing-test.png"))

            # Carol answers everything (through the store); the admin reads the figures.
            carol = user_id(engine, "carol")
            while (tile := turing.next_tile(ws, engine, carol, cid)) is not None:
                with Session(engine) as s:
                    item = s.get(TuringItem, tile.item_id)
                turing.record_answer(engine, carol, item_id=tile.item_id, confidence=2, request_id=f"c{tile.item_id}",
                                     answer="synthetic" if item.sample_id and item.position % 2 else "real")
            admin, _ = new_page(browser, 1100)
            sign_in(admin, f"{url}/dashboard", "boss")
            section = admin.get_by_role("heading", name="Visual Turing test")
            expect(section).to_be_visible(timeout=WAIT_MS)
            expect(admin.get_by_text(re.compile(r"^Fleiss' kappa: 3 items answered by all 2 raters"))).to_be_visible()
            section.evaluate("e => e.scrollIntoView({block: 'start'})")
            admin.wait_for_timeout(500)
            admin.screenshot(path=str(shots / "turing-dashboard.png"))
        finally:
            browser.close()

    rows = answers(engine)
    alice = [r for r in rows if r.annotator_id == user_id(engine, "alice")]
    assert [(r.answer, r.confidence) for r in alice] == [
        ("synthetic", 2), ("real", 2), ("retracted", None), ("real", 3), ("synthetic", 1)]
    assert alice[2].supersedes_id == alice[1].id and alice[3].item_id == alice[1].item_id
    assert len({r.item_id for r in alice}) == 3 and all(r.seconds is not None for r in alice if r.confidence)


def user_id(engine, username: str) -> int:
    return next(u.id for u in accounts.list_users(engine) if u.username == username)
