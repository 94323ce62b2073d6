"""The generator: presets, pretraining (resume, export), import, and generation into the store."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from diffusers import DDPMPipeline, UNet2DModel
from PIL import Image as PILImage
from safetensors.torch import load_file
from sqlmodel import Session, select

from finetune.config import PretrainConfig
from finetune.pretrain import pretrain
from finetune.registry import import_model, load_generator
from finetune.sample import SampleSettings, generate_into_store
from finetune.unet import build_unet, check_size
from store.db import make_engine, upgrade
from store.errors import PathloopError
from store.generators import list_generators
from store.ingest import import_tiles
from store.models import GeneratorVersion, Image, Sample
from store.workspace import Settings, Workspace

SIZE = 16
CLASSES = ["red", "blue"]


def _tiles(root, n=12):
    """Toy tiles: reddish or bluish noise, so the classes differ in colour."""
    rng = np.random.default_rng(0)
    for c, base in zip(CLASSES, ([200, 60, 60], [60, 60, 200])):
        (root / c).mkdir(parents=True)
        for i in range(n):
            img = np.clip(np.array(base) + rng.normal(0, 25, (SIZE, SIZE, 3)), 0, 255).astype(np.uint8)
            PILImage.fromarray(img).save(root / c / f"{i}.png")
    return root


@pytest.fixture
def gen_ws(tmp_path):
    """A SQLite workspace of 16 px toy tiles (store behaviour on PostgreSQL is tested elsewhere)."""
    ws = Workspace.create(tmp_path / "ws", Settings(classes=CLASSES, tile_size=SIZE))
    engine = make_engine(ws.database_url)
    upgrade(engine)
    import_tiles(ws, engine, _tiles(tmp_path / "crops"))
    yield ws, engine
    engine.dispose()


def tiny(**kw) -> PretrainConfig:
    base = dict(train_steps=2, train_batch_size=4, train_lr_warmup_steps=0, checkpoint_every=1,
                train_learning_rate=1e-3)
    return PretrainConfig(**{**base, **kw})


def weights(ws, version: GeneratorVersion) -> dict[str, torch.Tensor]:
    return load_file(ws.root / version.folder / "unet" / "diffusion_pytorch_model.safetensors")


def test_presets_and_their_sizes():
    for name, size in (("tiny", 32), ("small", 64), ("base", 128)):
        unet = build_unet(name, size, 3)
        assert unet.config.num_class_embeds == 4 and unet.config.sample_size == size
    with pytest.raises(PathloopError, match="unknown generator preset 'huge'; expected one of: tiny, small, base"):
        check_size("huge", 32)
    with pytest.raises(PathloopError, match="preset 'tiny' takes tiles of 16-64 px divisible by 4, not 256"):
        check_size("tiny", 256)
    with pytest.raises(PathloopError, match="not 30"):
        check_size("tiny", 30)


def test_one_training_step_changes_weights_and_the_loss_is_finite(gen_ws):
    ws, engine = gen_ws
    torch.manual_seed(0)
    v = pretrain(ws, engine, tiny(train_steps=1), progress=False)
    assert math.isfinite(v.config["final_loss"]) and v.config["final_loss"] > 0
    torch.manual_seed(0)
    from accelerate.utils import set_seed

    set_seed(0)
    fresh = build_unet("tiny", SIZE, 2).state_dict()
    trained = weights(ws, v)
    changed = [k for k in fresh if not torch.equal(fresh[k], trained[k])]
    assert len(changed) > len(fresh) // 2


def test_resume_equals_an_uninterrupted_run(gen_ws):
    ws, engine = gen_ws
    straight = pretrain(ws, engine, tiny(train_steps=4, checkpoint_every=2, run_name="a"), progress=False)
    stopped = pretrain(ws, engine, tiny(train_steps=4, checkpoint_every=2, run_name="b"), stop_after=2,
                       progress=False)
    assert stopped is None and len(list_generators(engine)) == 1
    assert (ws.runs_dir / "b" / "checkpoints" / "checkpoint-2").is_dir()
    resumed = pretrain(ws, engine, tiny(train_steps=4, checkpoint_every=2, run_name="b"), resume="latest",
                       progress=False)
    a, b = weights(ws, straight), weights(ws, resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_another_config_and_a_reused_run(gen_ws):
    ws, engine = gen_ws
    pretrain(ws, engine, tiny(run_name="r"), stop_after=1, progress=False)
    with pytest.raises(PathloopError, match=r"made with train_batch_size = 4, not 8"):
        pretrain(ws, engine, tiny(run_name="r", train_batch_size=8), resume="latest", progress=False)
    with pytest.raises(PathloopError, match="already has checkpoints; pass --resume latest"):
        pretrain(ws, engine, tiny(run_name="r"), progress=False)
    with pytest.raises(PathloopError, match="no checkpoint to resume from"):
        pretrain(ws, engine, tiny(run_name="fresh"), resume="latest", progress=False)
    assert list_generators(engine) == []


def test_export_is_a_stock_diffusers_folder_with_provenance(gen_ws):
    ws, engine = gen_ws
    v = pretrain(ws, engine, tiny(), progress=False)
    folder = ws.root / v.folder
    unet = UNet2DModel.from_pretrained(folder, subfolder="unet")
    assert unet.config.num_class_embeds == 3 and unet.config.sample_size == SIZE
    pipe = DDPMPipeline.from_pretrained(folder)
    assert pipe.scheduler.config.num_train_timesteps == 1000
    info = json.loads((folder / "pathloop.json").read_text())
    assert info["classes"] == CLASSES and info["config"]["train_steps"] == 2 and len(info["train_tile_ids"]) > 0
    assert v.config["preset"] if "preset" in v.config else v.config["config"]["preset"] == "tiny"
    assert not list((ws.models_dir / "generators").glob(".incoming-*"))


def test_bad_training_input(gen_ws, tmp_path):
    ws, engine = gen_ws
    with pytest.raises(PathloopError, match="train_steps must be >= 1"):
        tiny(train_steps=0)
    with pytest.raises(PathloopError, match="unknown generator preset"):
        pretrain(ws, engine, tiny(preset="huge"), progress=False)
    empty = Workspace.create(tmp_path / "empty", Settings(classes=CLASSES, tile_size=SIZE))
    e2 = make_engine(empty.database_url)
    upgrade(e2)
    with pytest.raises(PathloopError, match="the workspace has no train tiles"):
        pretrain(empty, e2, tiny(), progress=False)
    more = Workspace.create(tmp_path / "more", Settings(classes=[*CLASSES, "green"], tile_size=SIZE))
    e3 = make_engine(more.database_url)
    upgrade(e3)
    import_tiles(more, e3, tmp_path / "crops" if (tmp_path / "crops").exists() else _tiles(tmp_path / "c2"))
    with pytest.raises(PathloopError, match="class 'green' has no train tiles"):
        pretrain(more, e3, tiny(), progress=False)
    assert list_generators(e2) == [] and list_generators(e3) == []


@pytest.fixture
def trained(gen_ws):
    ws, engine = gen_ws
    return ws, engine, pretrain(ws, engine, tiny(), progress=False)


def _samples(engine):
    with Session(engine) as s:
        return s.exec(select(Sample, Image.sha256).join(Image, Image.id == Sample.image_id)
                      .order_by(Sample.class_name, Sample.seed)).all()


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_generation_is_reproducible_registered_and_idempotent(trained, sampler):
    ws, engine, v = trained
    gen = load_generator(ws, engine, v.id, device="cpu")
    settings = SampleSettings(sampler=sampler, steps=3, guidance=1.0, batch_size=4)
    r = generate_into_store(ws, engine, gen, per_class=3, settings=settings, seed=7, round_number=0)
    assert (r.generated, r.skipped) == (6, 0)
    rows = _samples(engine)
    assert [s.class_name for s, _ in rows].count("red") == 3
    for s, sha in rows:
        assert (s.generator_id, s.sampler, s.steps, s.guidance, s.round_number) == (v.id, sampler, 3, 1.0, 0)
        assert (ws.root / f"images/{sha[:2]}/{sha[2:4]}/{sha}.png").is_file()
    # Rerun: nothing new. Larger --per-class: only the missing ones.
    assert generate_into_store(ws, engine, gen, per_class=3, settings=settings, seed=7).generated == 0
    assert generate_into_store(ws, engine, gen, per_class=4, settings=settings, seed=7).generated == 2
    # The same seed gives the same pixels, whatever the batch it is drawn in.
    first = {(s.class_name, s.seed): sha for s, sha in _samples(engine)}
    with Session(engine) as s:
        for row in s.exec(select(Sample)).all():
            s.delete(row)
        s.commit()
    one_by_one = SampleSettings(sampler=sampler, steps=3, guidance=1.0, batch_size=1)
    generate_into_store(ws, engine, gen, per_class=4, settings=one_by_one, seed=7)
    again = {(s.class_name, s.seed): sha for s, sha in _samples(engine)}
    assert again == first


def test_guidance_is_a_separate_recipe(trained):
    ws, engine, v = trained
    gen = load_generator(ws, engine, v.id, device="cpu")
    base = dict(sampler="ddim", steps=2, batch_size=8)
    generate_into_store(ws, engine, gen, per_class=2, settings=SampleSettings(guidance=1.0, **base))
    r = generate_into_store(ws, engine, gen, per_class=2, settings=SampleSettings(guidance=3.0, **base))
    assert r.generated == 4 and len(_samples(engine)) == 8


def test_bad_generation_input(trained):
    ws, engine, v = trained
    gen = load_generator(ws, engine, v.id, device="cpu")
    cases = [
        (SampleSettings(steps=0), 1, "steps = 0; expected 1 to 1000"),
        (SampleSettings(steps=5000), 1, "steps = 5000"),
        (SampleSettings(guidance=-1), 1, "guidance = -1"),
        (SampleSettings(batch_size=0), 1, "batch size = 0"),
        (SampleSettings(sampler="euler"), 1, "sampler 'euler'"),
        (SampleSettings(), 0, "--per-class 0"),
    ]
    for settings, n, message in cases:
        with pytest.raises(PathloopError, match=message):
            generate_into_store(ws, engine, gen, per_class=n, settings=settings)
    with pytest.raises(PathloopError, match="generator version 99 does not exist; known: 1"):
        load_generator(ws, engine, 99)
    assert _samples(engine) == []


def test_import_accepts_fitting_models_and_rejects_others(gen_ws, tmp_path):
    ws, engine = gen_ws
    build_unet("tiny", SIZE, 2).save_pretrained(tmp_path / "unet_only")
    v1 = import_model(ws, engine, tmp_path / "unet_only")
    assert v1.kind == "imported"
    DDPMPipeline.from_pretrained(ws.root / v1.folder)  # re-exported as a full pipeline folder
    v2 = import_model(ws, engine, ws.root / v1.folder)  # a pipeline folder imports too
    assert v2.id == v1.id + 1
    build_unet("tiny", SIZE, 5).save_pretrained(tmp_path / "other_classes")
    build_unet("tiny", 32, 2).save_pretrained(tmp_path / "other_size")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "config.json").write_text('{"_class_name": "AutoencoderKL"}')
    for folder, message in [
        ("other_classes", "has 6 class embeddings; the workspace needs 3"),
        ("other_size", "makes 32 px tiles; the workspace tile_size is 16"),
        ("junk", "is not a diffusers UNet2DModel or DDPMPipeline folder"),
        ("missing", "does not exist"),
    ]:
        with pytest.raises(PathloopError, match=message):
            import_model(ws, engine, tmp_path / folder)
    assert len(list_generators(engine)) == 2
    assert not list((ws.models_dir / "generators").glob(".incoming-*"))


def _run(exe, *args, ok=True, **kw):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PATHLOOP_")}
    p = subprocess.run([exe, *map(str, args)], capture_output=True, text=True, env=env, timeout=600, **kw)
    if ok:
        assert p.returncode == 0, p.stderr[-3000:]
    return p


def test_cli_pretrain_generate_status(gen_ws, pathloop_exe):
    ws, _ = gen_ws
    _run(pathloop_exe, "pretrain", "-w", ws.root, "--steps", "2", "--batch-size", "4", "--checkpoint-every", "1")
    out = _run(pathloop_exe, "generate", "-w", ws.root, "--model", "1", "--per-class", "2", "--steps", "2").stdout
    assert "4 samples generated" in out
    st = json.loads(_run(pathloop_exe, "status", "--json", "-w", ws.root).stdout)
    assert st["samples"] == {"red": 2, "blue": 2} and st["generator_versions"] == 1
    assert "pretrained" in _run(pathloop_exe, "generator", "list", "-w", ws.root).stdout
    # Each call loads torch and diffusers (~8 s here); the other bad inputs are tested in-process.
    for args, needle in [
        (["generate", "--model", "1", "--per-class", "2", "--guidance", "99"], "guidance = 99"),
        (["pretrain", "--preset", "base"], "preset 'base' takes tiles of 128-256 px"),
    ]:
        p = _run(pathloop_exe, *args, "-w", ws.root, ok=False)
        assert p.returncode == 1 and needle in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr


def test_accelerate_launch_two_processes(gen_ws):
    ws, engine = gen_ws
    launcher = os.path.join(os.path.dirname(sys.executable), "accelerate")
    # `accelerate launch --cpu` always starts one process; several CPU processes take --multi_gpu
    # with ACCELERATE_USE_CPU (accelerate issue #2741), which torchrun runs on the gloo backend.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PATHLOOP_")}
    env.update(ACCELERATE_USE_CPU="1", CUDA_VISIBLE_DEVICES="")
    p = subprocess.run([launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                        "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "pathloop.cli", "pretrain",
                        "-w", str(ws.root), "--steps", "2", "--batch-size", "2", "--checkpoint-every", "1"],
                       capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    [v] = list_generators(engine)  # registered once, by the main process
    assert v.config["processes"] == 2
    UNet2DModel.from_pretrained(ws.root / v.folder, subfolder="unet")


def test_tracker_logging_with_tensorboard(gen_ws):
    pytest.importorskip("tensorboard", reason="tensorboard is in the dev extra; install it to test trackers")
    ws, engine = gen_ws
    pretrain(ws, engine, tiny(log_with="tensorboard", run_name="logged"), progress=False)
    events = list((ws.runs_dir / "logged" / "logs").rglob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0


def test_data_workers_change_nothing_but_speed(gen_ws):
    ws, engine = gen_ws
    here = pretrain(ws, engine, tiny(train_steps=3, data_workers=0, run_name="here"), progress=False)
    ahead = pretrain(ws, engine, tiny(train_steps=3, data_workers=2, run_name="ahead"), progress=False)
    a, b = weights(ws, here), weights(ws, ahead)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_training_reads_shard_tiles_without_holding_them(tmp_path):
    from finetune.data import TileSet
    from pathloop.demo import write_large_pyramid
    from store.generators import tile_table, training_tiles
    from store.images import load_rgb
    from store.ingest import ingest_slides

    ws = Workspace.create(tmp_path / "ws", Settings(classes=["tissue"], tile_size=SIZE))
    engine = make_engine(ws.database_url)
    upgrade(engine)
    slide = write_large_pyramid(tmp_path / "s.tif", size=512, tile=256)
    ingest_slides(ws, engine, [slide], class_name="tissue", workers=2)
    table = tile_table(ws, engine, "train")
    refs = training_tiles(ws, engine, "train")
    assert table.tile_ids.tolist() == [r.tile_id for r in refs] and len(table) > 100
    data = TileSet(table.images, table.class_ids)
    picks = np.array([0, len(data) // 2, len(data) - 1])
    batch = data.batch(picks)
    assert batch.shape == (3, 3, SIZE, SIZE) and batch.dtype == torch.uint8
    for k, i in enumerate(picks):
        assert np.array_equal(batch[k].permute(1, 2, 0).numpy(), load_rgb(refs[i].path, SIZE))
    # Columns of ids and byte ranges, not pixels: far less than one tile's pixels per tile.
    held = sum(v.nbytes for v in vars(table.images).values() if isinstance(v, np.ndarray))
    assert held < len(table) * 32 < len(table) * SIZE * SIZE * 3
    # A subset by id, in the order asked; a gone id is a clear error.
    some = tile_table(ws, engine, "train", tile_ids=[int(table.tile_ids[5]), int(table.tile_ids[2])])
    assert some.tile_ids.tolist() == [table.tile_ids[5], table.tile_ids[2]]
    assert np.array_equal(some.images.read(0), table.images.read(5))
    with pytest.raises(PathloopError, match="train tile 999999 is no longer in the workspace"):
        tile_table(ws, engine, "train", tile_ids=[999999])
    version = pretrain(ws, engine, PretrainConfig(train_steps=2, train_batch_size=4, train_lr_warmup_steps=0,
                                                  run_name="shards"), progress=False)
    assert version is not None and version.config["train_tiles"] == len(table)
    engine.dispose()
