"""The one ``pathloop`` command: every subcommand of the loop, for people and schedulers.

Bad input raises ``PathloopError``; ``main`` prints it as one line on stderr and exits 1,
so scripts and cron see a non-zero status with a reason. A bad option or value is one line
too (exit 2, as argparse), and a ``PathloopWarning`` (input repaired, e.g. a self-intersecting
region) is one ``pathloop: warning: ...`` line.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import unicodedata
import warnings
from pathlib import Path

from store.errors import PathloopError, PathloopWarning

DESCRIPTION = """pathloop: pathologist-in-the-loop synthetic histology.

Slides are tiled into a workspace; a class-conditional diffusion model is trained on the
tiles; pathologists rate generated tiles in the browser; a reward model learns their
judgments; reward-weighted fine-tuning closes the loop."""


class _Parser(argparse.ArgumentParser):
    """argparse with one line per bad option or value (the usage is in ``--help``)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def _workspace_parent() -> argparse.ArgumentParser:
    p = _Parser(add_help=False)
    p.add_argument(
        "--workspace", "-w", metavar="DIR", default=None,
        help="workspace folder (default: $PATHLOOP_WORKSPACE, else the current folder)",
    )
    return p


def _whole(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None


def _positive_int(text: str) -> int:
    v = _whole(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"{text} must be >= 1")
    return v


def _nonnegative_int(text: str) -> int:
    v = _whole(text)
    if v < 0:
        raise argparse.ArgumentTypeError(f"{text} must be >= 0")
    return v


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(v) or v <= 0:
        raise argparse.ArgumentTypeError(f"{text} must be a number > 0")
    return v


SEED_MAX = 2**32 - 1  # numpy's and accelerate's set_seed range


def _seed(text: str) -> int:
    v = _whole(text)
    if not 0 <= v <= SEED_MAX:
        raise argparse.ArgumentTypeError(f"{text} is not a seed; expected a whole number from 0 to {SEED_MAX}")
    return v


def _port(text: str) -> int:
    v = _whole(text)
    if not 1 <= v <= 65535:
        raise argparse.ArgumentTypeError(f"{text} is not a TCP port; expected 1 to 65535")
    return v


def _class_list(text: str) -> list[str]:
    """``A,B`` as class names, compared NFC-normalised like ``pathloop.toml`` (store.workspace.class_key)."""
    return [unicodedata.normalize("NFC", c.strip()) for c in text.split(",") if c.strip()]


def _open(args):
    """The workspace and a checked engine for commands that use the database."""
    from store.db import check_schema, make_engine
    from store.workspace import Workspace

    ws = Workspace.open(args.workspace)
    engine = make_engine(ws.database_url)
    check_schema(engine)
    return ws, engine


def _progress(desc: str, total: int):
    from tqdm import tqdm

    def wrap(it):
        return tqdm(it, total=total, desc=desc, unit="tile", disable=None, leave=False)

    return wrap


def _counter(desc: str):
    from tqdm import tqdm

    return lambda total: tqdm(total=total, desc=desc, unit="img", disable=None, leave=False)


# ---------------------------------------------------------------- commands


def cmd_init(args) -> int:
    from store.db import connect_check, make_engine, safe_url, upgrade
    from store.workspace import SQLITE_FILE, Settings, Workspace

    classes = _class_list(args.classes) if args.classes else []
    settings = Settings(classes=classes, tile_size=args.tile_size, database_url=args.database_url or "")
    root = Path(args.dir).expanduser().resolve()
    url = os.environ.get("PATHLOOP_DATABASE_URL") or settings.database_url or f"sqlite:///{root / SQLITE_FILE}"
    if not url.startswith("sqlite"):
        connect_check(make_engine(url))  # before writing anything
    ws = Workspace.create(root, settings)
    rev = upgrade(make_engine(ws.database_url))
    print(f"initialised workspace {ws.root} (database {safe_url(ws.database_url)}, schema {rev})")
    if not classes:
        print(f"next: list your classes in {ws.root / 'pathloop.toml'}")
    return 0


def cmd_db(args) -> int:
    from store.db import current_revision, head_revision, make_engine, safe_url, upgrade
    from store.workspace import Workspace

    ws = Workspace.open(args.workspace)
    engine = make_engine(ws.database_url)
    if args.db_command == "upgrade":
        before = _quiet_revision(engine)
        after = upgrade(engine)
        print(f"database {safe_url(ws.database_url)}: schema {before or 'empty'} -> {after}")
    else:
        from store.db import connect_check

        connect_check(engine)
        print(f"database {safe_url(ws.database_url)}: schema {current_revision(engine) or 'empty'} "
              f"(this pathloop: {head_revision()})")
    return 0


def _quiet_revision(engine):
    from store.db import connect_check, current_revision

    connect_check(engine)
    return current_revision(engine)


def cmd_demo_slide(args) -> int:
    from pathloop.demo import write_demo_slide

    tiff, geojson = write_demo_slide(Path(args.out), stain=args.stain)
    print(f"wrote {tiff} and {geojson}")
    return 0


def cmd_ingest(args) -> int:
    from store.ingest import ingest_slides

    ws, engine = _open(args)
    results = ingest_slides(
        ws, engine, args.slides, class_name=unicodedata.normalize("NFC", args.class_name) if args.class_name else None,
        labels=Path(args.labels) if args.labels else None,
        regions=Path(args.regions) if args.regions else None,
        tile_size=args.tile_size, level=args.level, mpp=args.mpp, stride=args.stride,
        min_tissue=args.min_tissue, workers=args.workers, split_by=args.split_by, seed=args.seed,
        progress=_progress,
    )
    for r in results:
        classes = ", ".join(f"{c} {n}" for c, n in sorted(r.per_class.items())) or "-"
        splits = ", ".join(f"{s} {n}" for s, n in sorted(r.per_split.items())) or "-"
        again = "" if r.new_source else " (slide already in the workspace)"
        print(f"{r.source}: {r.tiles_added} tiles added, {r.tiles_skipped} already there{again}; "
              f"classes: {classes}; splits: {splits}")
    return 0


def cmd_import_tiles(args) -> int:
    from store.ingest import import_tiles

    ws, engine = _open(args)
    r = import_tiles(ws, engine, Path(args.folder), seed=args.seed)
    classes = ", ".join(f"{c} {n}" for c, n in sorted(r.per_class.items())) or "-"
    print(f"{r.source}: {r.tiles_added} tiles added, {r.tiles_skipped} already there; classes: {classes}")
    return 0


def cmd_status(args) -> int:
    from store.db import safe_url
    from store.status import format_status, workspace_status

    ws, engine = _open(args)
    st = workspace_status(engine, ws.settings.classes)
    if args.json:
        print(json.dumps({"workspace": str(ws.root), "database": safe_url(ws.database_url), **st}, indent=2))
    else:
        print(format_status(st, str(ws.root), safe_url(ws.database_url)))
    return 0


def cmd_pretrain(args) -> int:
    from finetune.pretrain import PretrainConfig, pretrain

    ws, engine = _open(args)
    cfg = PretrainConfig(**_dataclass_args(args, PretrainConfig))
    version = pretrain(ws, engine, cfg, resume=args.resume)
    if version is not None:
        print(f"generator version {version.id}: {version.folder} (final loss {version.config['final_loss']:.4f}, "
              f"{version.config['seconds']} s)")
    return 0


def cmd_import_model(args) -> int:
    from finetune.registry import import_model

    ws, engine = _open(args)
    v = import_model(ws, engine, Path(args.dir), note=args.note or "")
    print(f"generator version {v.id}: imported {args.dir} into {v.folder}")
    return 0


def cmd_generate(args) -> int:
    from finetune.registry import load_generator
    from finetune.sample import SampleSettings, generate_into_store

    ws, engine = _open(args)
    settings = SampleSettings(args.sampler, args.steps, args.guidance, args.batch_size)
    gen = load_generator(ws, engine, _generator_id(engine, args.model))
    settings.check(gen.scheduler_config["num_train_timesteps"])
    r = generate_into_store(ws, engine, gen, per_class=args.per_class, settings=settings, seed=args.seed,
                            classes=_class_list(args.classes) if args.classes else None, round_number=args.round,
                            progress=_counter("generate"))
    print(f"generator version {gen.id}: {r.generated} samples generated, {r.skipped} already there "
          f"({settings.sampler}, {settings.steps} steps, guidance {settings.guidance:g}, seed {args.seed})")
    return 0


def _generator_id(engine, text: str, flag: str = "--model") -> int:
    """A generator version id, or ``latest`` for the newest one."""
    from store.generators import list_generators

    if text == "latest":
        versions = list_generators(engine)
        if not versions:
            raise PathloopError("no generator versions yet; `pathloop pretrain` or `pathloop import-model DIR`")
        return versions[-1].id
    try:
        return int(text)
    except ValueError:
        raise PathloopError(f"{flag} {text!r}; expected a generator version id or 'latest'") from None


def cmd_finetune(args) -> int:
    from finetune.config import FinetuneConfig
    from finetune.train import finetune
    from reward.score import load_reward

    ws, engine = _open(args)
    cfg = FinetuneConfig(**_dataclass_args(args, FinetuneConfig))
    parent_id = _finetune_parent(engine, args.parent)
    reward_fn = load_reward(ws, engine, args.reward, device=_process_device())
    v = finetune(ws, engine, cfg, reward_fn, parent_id=parent_id, reward_id=reward_fn.reward_id,
                 round_number=args.round, resume=args.resume)
    if v is not None:
        c = v.config
        print(f"generator version {v.id}: {v.folder} (fine-tuned from version {parent_id} with reward version "
              f"{c['reward_id']}; {len(c['samples'])} samples, {c['weight_sources']['experts']} weighted by experts; "
              f"{cfg.weighting} weights, mean {c['mean_weight']:.3f}; final loss {c['final_loss']:.4f} = synthetic "
              f"{c['final_loss_synthetic']:.4f} + {cfg.beta:g} x real {c['final_loss_real']:.4f}; {c['seconds']} s)")
        if c.get("selection"):
            sel = c["selection"]
            stopped = f", stopped early at step {sel['stopped_early_at']}" if sel["stopped_early_at"] else ""
            checks = (f"on {sel['per_class']} fresh tiles per class, of {len(sel['history'])} checks{stopped}"
                      if sel["history"] else "no checks")
            if sel.get("rule", "reward") == "reward":
                best = next(h for h in sel["history"] if h["step"] == sel["selected_step"])
                own = " (the parent's weights)" if sel["selected_step"] == 0 else ""
                print(f"selection: the child is step {sel['selected_step']}{own}, reward p {best['reward_p']:.3f} "
                      f"{checks}")
            else:  # the round-1 guard: the reward model did not decide
                print(f"selection: the child is step {sel['selected_step']} ({sel['rule']}), {checks}")
    return 0


def _finetune_parent(engine, text: str) -> int:
    """The ``--from`` generator version: an id or ``latest``."""
    if text != "latest" and not text.isdigit():
        raise PathloopError(f"--from {text!r}; expected a generator version id or 'latest'")
    return _generator_id(engine, text)


def _process_device():
    """This process's GPU under ``accelerate launch`` (LOCAL_RANK), else the reward model's default."""
    import torch

    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0") or 0))
    return None


def cmd_generator_list(args) -> int:
    from store.generators import list_generators

    ws, engine = _open(args)
    rows = list_generators(engine)
    if not rows:
        print("no generator versions yet; `pathloop pretrain` or `pathloop import-model DIR`")
        return 0
    print(f"{'id':>4}  {'kind':<10} {'parent':>6} {'round':>5}  {'created':<19}  folder")
    for g in rows:
        print(f"{g.id:>4}  {g.kind:<10} {g.parent_id or '-':>6} {g.round_number if g.round_number is not None else '-':>5}"
              f"  {g.created_at:%Y-%m-%d %H:%M:%S}  {g.folder}")
    return 0


def cmd_train_reward(args) -> int:
    from reward.config import RewardConfig
    from reward.train import train_reward

    ws, engine = _open(args)
    cfg = RewardConfig(**_dataclass_args(args, RewardConfig))
    if cfg.backbone_weights and not Path(cfg.backbone_weights).expanduser().is_file():
        raise PathloopError(f"--weights {cfg.backbone_weights}: no such file; expected a local safetensors file "
                            f"or timm checkpoint")  # before the judgments are gathered
    v = train_reward(ws, engine, cfg)
    if v is not None:
        m = v.metrics
        print(f"reward version {v.id}: {v.folder} ({v.backbone}; held-out experts: n={m['n']}, "
              f"ROC-AUC {_fmt(m['roc_auc'])}, balanced accuracy {_fmt(m['balanced_accuracy'])}, "
              f"Brier {_fmt(m['brier'])}, ECE {_fmt(m['ece'])} (uncalibrated {_fmt(m['ece_uncalibrated'])}), "
              f"T={m['temperature']:.2f}, best epoch {m['best_epoch']}/{m['epochs_run']})")
    return 0


def _fmt(x, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def cmd_score(args) -> int:
    from reward.score import score_samples

    ws, engine = _open(args)
    which = args.samples
    if which not in ("unscored", "all"):
        try:
            which = int(which)
        except ValueError:
            raise PathloopError(f"--samples {which!r}; expected unscored, all or a round number") from None
    r = score_samples(ws, engine, args.reward, which, batch_size=args.batch_size)
    print(f"reward version {r.reward_id}: {r.scored} samples scored, {r.skipped} already scored")
    return 0


def cmd_reward_list(args) -> int:
    from store.rewards import current_reward_id, list_rewards, score_counts

    ws, engine = _open(args)
    rows = list_rewards(engine)
    if not rows:
        print("no reward versions yet; `pathloop train-reward` trains one from the judgments")
        return 0
    current, scored = current_reward_id(engine), score_counts(engine)
    print("held-out expert metrics (temperature-calibrated); * = current (the newest, used by `score` and the queue)")
    print(f"{'':1}{'id':>4}  {'backbone':<18} {'judg.':>6} {'n test':>6} {'ROC-AUC':>7} {'bal.acc':>7} {'Brier':>6} "
          f"{'ECE':>6} {'T':>5} {'scored':>7}  created")
    for r in rows:
        m = r.metrics
        print(f"{'*' if r.id == current else ' '}{r.id:>4}  {r.backbone[:18]:<18} "
              f"{len(r.data_manifest.get('judgment_ids', [])):>6} {m.get('n', 0):>6} {_fmt(m.get('roc_auc')):>7} "
              f"{_fmt(m.get('balanced_accuracy')):>7} {_fmt(m.get('brier')):>6} {_fmt(m.get('ece')):>6} "
              f"{_fmt(m.get('temperature'), 2):>5} {scored.get(r.id, 0):>7}  {r.created_at:%Y-%m-%d %H:%M}")
    return 0


def cmd_annotate(args) -> int:
    from annotate_app.launch import serve
    from store.workspace import Workspace

    ws = Workspace.open(args.workspace)
    _check_listen(args.host, args.port)
    print(f"serving the rating app for {ws.root} at http://{args.host}:{args.port} (Ctrl+C to stop)", flush=True)
    return serve(ws.root, args.host, args.port)


def _check_listen(host: str, port: int) -> None:
    """Refuse a host this machine cannot listen on, or a port in use, before Streamlit starts."""
    import socket

    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except (socket.gaierror, UnicodeError) as e:
        raise PathloopError(f"--host {host!r} is not an address to listen on: "
                            f"{getattr(e, 'strerror', None) or e}") from None
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as Streamlit's server does
        try:
            sock.bind(address)
        except OSError as e:
            raise PathloopError(f"cannot serve on {host}:{port}: {e.strerror or e}"
                                + (" (another app is there; pick another --port)" if e.errno == 98 else "")) from None


def _read_password(args) -> str | None:
    """The password from stdin (--password-stdin), a prompt, or None to generate one."""
    import getpass

    if args.password_stdin:
        pw = sys.stdin.readline().rstrip("\n")
        if not pw:
            raise PathloopError("--password-stdin: expected a password on standard input, got an empty line")
        return pw
    if args.generate_password or not sys.stdin.isatty():
        return None
    first = getpass.getpass(f"password for {args.username}: ")
    if first != getpass.getpass("again: "):
        raise PathloopError("the two passwords differ; nothing was changed")
    return first


def cmd_users(args) -> int:
    from store import accounts

    ws, engine = _open(args)
    if args.users_command == "add":
        user, generated = accounts.add_user(engine, args.username, role=args.role, password=_read_password(args),
                                            email=args.email)
        print(f"added {user.role} {user.username}")
        if generated:
            print(f"password (shown once): {generated}")
    elif args.users_command == "list":
        rows = accounts.list_users(engine)
        print(f"{'username':<20} {'role':<10} {'active':<6}  e-mail")
        for u in rows:
            print(f"{u.username:<20} {u.role:<10} {'yes' if u.active else 'no':<6}  {u.email or ''}")
    elif args.users_command in ("disable", "enable"):
        u = accounts.set_active(engine, args.username, args.users_command == "enable")
        print(f"{u.username}: {'active' if u.active else 'disabled'}")
    elif args.users_command == "password":
        pw = _read_password(args)
        generated = None
        if pw is None:
            import secrets

            pw = generated = secrets.token_urlsafe(12)
        accounts.set_password(engine, args.username, pw)
        print(f"{args.username}: password changed" + (f"; new password (shown once): {generated}" if generated else ""))
    return 0


def cmd_export(args) -> int:
    from store.export import export_binary, export_judgments, export_pairs, export_samples

    feedback_only = {"--min-ratings": args.min_ratings, "--pair-by": args.pair_by, "--max-pairs": args.max_pairs,
                     "--seed": args.seed, "--image-format": args.image_format}
    given = [k for k, v in feedback_only.items() if v is not None]
    if args.what in ("pairs", "binary"):
        if args.format not in (None, "parquet"):
            raise PathloopError(f"--format {args.format}: `export {args.what}` writes Parquet only")
        if args.model or args.exclude_copies:
            raise PathloopError(f"--model and --exclude-copies apply to `export samples`, not `export {args.what}`")
        wrong = [k for k in (("--pair-by", "--max-pairs", "--seed") if args.what == "binary" else ("--image-format",))
                 if feedback_only[k] is not None]
        if wrong:
            raise PathloopError(f"{', '.join(wrong)}: not used by `export {args.what}`")
        ws, engine = _open(args)
        out = Path(args.out) if args.out else _exports_dir(ws) / f"{args.what}.parquet"
        min_ratings = 2 if args.min_ratings is None else args.min_ratings
        if args.what == "pairs":
            max_pairs = 10_000 if args.max_pairs is None else (args.max_pairs or None)
            n = export_pairs(ws, engine, out, min_ratings=min_ratings, pair_by=args.pair_by or "generator",
                             max_pairs=max_pairs, seed=0 if args.seed is None else args.seed)
            print(f"wrote {n} preference pairs to {out}")
        else:
            n, ties = export_binary(ws, engine, out, min_ratings=min_ratings, image_format=args.image_format or "jpeg")
            print(f"wrote {n} rated samples to {out}" + (f"; left out {ties} tied" if ties else ""))
        return 0
    if given:
        raise PathloopError(f"{', '.join(given)} apply to `export pairs` and `export binary`, "
                            f"not `export {args.what}`")
    if args.campaign and args.what != "turing":
        raise PathloopError(f"--campaign applies to `export turing`, not `export {args.what}`")
    ws, engine = _open(args)
    if args.what == "turing":
        from store.turing import find_campaign
        from store.turing_results import export_turing

        if args.model or args.exclude_copies:
            raise PathloopError("--model and --exclude-copies apply to `export samples`, not `export turing`")
        fmt = args.format or "csv"
        campaign = find_campaign(engine, args.campaign).id if args.campaign else None
        out = Path(args.out) if args.out else _exports_dir(ws) / f"turing.{fmt}"
        n = export_turing(engine, out, fmt, campaign)
        print(f"wrote {n} Turing test answers to {out}")
        return 0
    if args.what == "samples":
        if args.format not in (None, "csv"):
            raise PathloopError(f"--format {args.format}: samples are exported as PNG files with a CSV manifest")
        from pathloop.evaluate import copy_flags

        copies = copy_flags(ws)  # the manifest says which samples an evaluation checked, and what it found
        model = _generator_id(engine, args.model) if args.model else None
        out = Path(args.out) if args.out else _exports_dir(ws) / f"samples-{_stamp()}"
        kept, left_out = export_samples(ws, engine, out, generator_id=model, copies=copies,
                                        exclude_copies=args.exclude_copies)
        print(f"wrote {kept} samples to {out} (manifest.csv)" + (f"; left out {left_out} flagged as copies of real "
                                                                  f"training tiles" if args.exclude_copies else ""))
        return 0
    if args.model or args.exclude_copies:
        raise PathloopError("--model and --exclude-copies apply to `export samples`, not `export judgments`")
    fmt = args.format or "csv"
    out = Path(args.out) if args.out else _exports_dir(ws) / f"judgments.{fmt}"
    n = export_judgments(engine, out, fmt)
    print(f"wrote {n} judgments to {out}")
    return 0


def cmd_turing(args) -> int:
    from store import turing
    from store.turing_results import results, results_table

    ws, engine = _open(args)
    if args.turing_command == "create":
        cfg = turing.CampaignConfig(**_dataclass_args(args, turing.CampaignConfig))
        cid = turing.create_campaign(ws, engine, cfg, created_by=os.environ.get("USER"))
        items = turing.progress(engine, None, cid)[1]
        print(f"created Turing test campaign {cfg.name!r} (id {cid}): {items} items, inactive; "
              f"show it to raters with `pathloop turing activate {cfg.name}`")
        return 0
    if args.turing_command == "list":
        rows = [{"id": c.id, "name": c.name, "active": c.active, "generator_ids": c.generator_ids,
                 "per_class": c.per_class, "real_share": c.real_share, "seed": c.seed, "round": c.round_number,
                 "created_by": c.created_by, "created_at": c.created_at.isoformat()} for c in turing.campaigns(engine)]
        if args.json:
            print(json.dumps(rows, indent=2))
        elif not rows:
            print("no Turing test campaigns yet; `pathloop turing create --name N --model ID`")
        for r in [] if args.json else rows:
            print(f"{r['id']:>4}  {r['name']}  {'ACTIVE' if r['active'] else 'inactive'}  versions "
                  f"{','.join(map(str, r['generator_ids']))}  {r['per_class']} per class  real share "
                  f"{r['real_share']:g}  seed {r['seed']}" + (f"  round {r['round']}" if r["round"] is not None else ""))
        return 0
    if not args.campaign:
        raise PathloopError(f"turing {args.turing_command} needs a CAMPAIGN (name or id)")
    if args.turing_command in ("activate", "deactivate"):
        c = turing.set_active(engine, args.campaign, args.turing_command == "activate")
        print(f"campaign {c.name!r} is now {'active: raters see it' if c.active else 'inactive'}")
        return 0
    res = results(engine, turing.find_campaign(engine, args.campaign))
    if args.json:
        print(json.dumps(res, indent=2))
        return 0
    import pandas as pd

    with pd.option_context("display.width", 200, "display.max_columns", None, "display.float_format", "{:.3f}".format):
        print(results_table(res).to_string(index=False))
    f = res["fleiss"]
    print(f"Fleiss' kappa {_fmt(f['kappa'])} (95% CI {_fmt(f['low'])} to {_fmt(f['high'])}, bootstrap) over "
          f"{f['n_items']} items answered by all {f['raters']} raters; {res['items']} items in the campaign")
    return 0


def _exports_dir(ws) -> Path:
    """WORKSPACE/exports, created on first use (an explicit --out must name an existing folder)."""
    folder = ws.root / "exports"
    try:
        folder.mkdir(exist_ok=True)
    except OSError as e:
        raise PathloopError(f"cannot create {folder}: {e.strerror or e}") from None
    return folder


def _stamp() -> str:
    from datetime import UTC, datetime

    return datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")


def cmd_round(args) -> int:
    from pathloop import rounds

    ws, engine = _open(args)
    if args.round_command == "status":
        return _round_status(ws, engine, args.json)
    if args.if_due and not rounds.is_due(ws, engine):
        return 0
    changes = _dataclass_args(args, rounds.RoundOptions)
    rounds.RoundOptions(**changes)  # refuse bad values now, before anything runs
    done = rounds.advance(ws, engine, changes, only=args.step)
    if done.waiting_for:
        print(done.waiting_for)
    return 0


def _round_status(ws, engine, as_json: bool) -> int:
    from pathloop import rounds

    rows = rounds.list_rounds(engine)
    if as_json:
        print(json.dumps([r.model_dump(mode="json") for r in rows], indent=2, default=str))
        return 0
    if not rows:
        print("no rounds yet; `pathloop round` starts the first from the newest generator")
        return 0
    print(f"{'round':>5}  {'state':<17} {'gen in':>6} {'reward':>6} {'gen out':>7} {'samples':>7} {'judged':>6} "
          f"{'reward ROC-AUC':>14} {'plaus. in→out':>14}  {'started':<16}  finished")
    for r in rows:
        judged, samples = rounds.round_ratings(engine, r.number)
        d = r.details
        auc = (d.get("reward_metrics") or {}).get("roc_auc")
        ev = d.get("evaluation") or {}
        plaus = f"{ev['parent']:.2f}→{ev['child']:.2f}" if ev.get("parent") is not None else "-"
        print(f"{r.number:>5}  {r.state:<17} {r.generator_in_id or '-':>6} {r.reward_id or '-':>6} "
              f"{r.generator_out_id or '-':>7} {samples:>7} {judged:>6} {_fmt(auc):>14} {plaus:>14}  "
              f"{r.created_at:%Y-%m-%d %H:%M}  {f'{r.finished_at:%Y-%m-%d %H:%M}' if r.finished_at else '-'}"
              f"{'  locked by ' + r.lock_owner if r.lock_owner else ''}")
    waiting = rounds.open_round(engine)
    if waiting is not None and not rounds.is_due(ws, engine):
        print(rounds.waiting_message(engine, waiting, ws))
    return 0


def cmd_simulate_expert(args) -> int:
    from pathloop.simulate import simulate

    ws, engine = _open(args)
    r = simulate(ws, engine, raters=args.raters, max_per_rater=args.max, noise=args.noise, seed=args.seed,
                 fit_per_class=args.fit_per_class, rules=args.rules)
    share = f"{100 * r.plausible / r.judgments:.0f}%" if r.judgments else "-"
    print(f"simulated expert: {r.judgments} judgments by {args.raters} rater(s), {share} plausible, "
          f"{r.controls} on control tiles")
    return 0


def cmd_evaluate(args) -> int:
    from pathloop.evaluate import EvaluateConfig, evaluate

    ws, engine = _open(args)
    cfg = EvaluateConfig(**_dataclass_args(args, EvaluateConfig))
    model = None if args.model in (None, "current") else _generator_id(engine, args.model)
    against = [_generator_id(engine, a, "--against") for a in args.against] if args.against else None
    r = evaluate(ws, engine, cfg, model=model, against=against)
    print(r.table)
    print(f"wrote {r.folder} (metrics.csv, metrics.json, copies.csv, plausibility.png, trends.png); "
          f"evaluation rows {', '.join(map(str, r.evaluation_ids))}")
    return 0


def _dataclass_args(args, cls) -> dict:
    from dataclasses import fields

    return {f.name: getattr(args, f.name) for f in fields(cls) if getattr(args, f.name, None) is not None}


def _add_dataclass_options(p: argparse.ArgumentParser, cls, aliases: dict[str, list[str]]) -> None:
    """One option per config field (``train_steps`` → ``--train-steps``), help from the field."""
    import dataclasses

    for f in dataclasses.fields(cls):
        flags = [f"--{f.name.replace('_', '-')}", *aliases.get(f.name, [])]
        default = f.default if f.default is not dataclasses.MISSING else None
        kind = {"int": int, "float": float, "str": str, "bool": _bool}.get(str(f.type).split(" |")[0], str)
        if f.name == "seed":
            kind = _seed
        if kind is _bool and default is False:  # an opt-in switch: --flag, no value
            p.add_argument(*flags, dest=f.name, action="store_const", const=True, default=None,
                           help=f.metadata.get("help", ""))
            continue
        p.add_argument(*flags, dest=f.name, type=kind, default=None, metavar=f.metadata.get("metavar", f.name.split("_")[-1].upper()),
                       help=f"{f.metadata.get('help', '')} (default: {default})")


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"{text!r} is not true or false")


# ---------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    ws = _workspace_parent()
    parser = _Parser(prog="pathloop", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("init", help="create a workspace: pathloop.toml, database, folders",
                       description="Create a workspace folder with commented settings, the database and folders.")
    p.add_argument("dir", metavar="DIR", help="folder to create (may exist, must not be a workspace yet)")
    p.add_argument("--classes", metavar="A,B,...", help="comma-separated tile classes")
    p.add_argument("--tile-size", type=_positive_int, default=256, metavar="N",
                   help="edge of every stored tile in pixels (default 256)")
    p.add_argument("--database-url", metavar="URL",
                   help="postgresql+psycopg://USER@HOST/DB for a multi-user lab (default: SQLite in DIR)")
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("db", help="database schema: upgrade or show the current revision", parents=[ws],
                       description="Create or upgrade the workspace's database schema (Alembic).")
    p.add_argument("db_command", choices=["upgrade", "current"], help="upgrade to this pathloop's schema, or show it")
    p.set_defaults(func=cmd_db)

    p = sub.add_parser("demo-slide", help="write the demo slide (real IHC tissue) and its QuPath regions",
                       description="Write scikit-image's immunohistochemistry image as a tiled pyramidal TIFF "
                                   "that OpenSlide opens, and OUT.geojson classing its tissue by DAB stain.")
    p.add_argument("out", metavar="OUT.tiff")
    p.add_argument("--stain", choices=["ihc", "he", "he-real", "he-tia"], default="ihc",
                   help="ihc: the image as shipped (dab_positive/dab_negative); he: recoloured to H&E by colour "
                        "deconvolution (nuclei_dense/stroma) - real morphology, not a real H&E stain; he-real: a "
                        "real 300x500 H&E crop that ships in the stardist wheel; he-tia: a real 1000x1000 H&E "
                        "field that ships in the tiatoolbox wheel (both nuclei_dense/stroma by haematoxylin "
                        "density)")
    p.set_defaults(func=cmd_demo_slide)

    p = sub.add_parser("ingest", help="tile whole-slide images into the workspace", parents=[ws],
                       description="Find tissue, walk the tile grid, store class-labelled tiles with their "
                                   "coordinates and train/val/test splits. Re-ingesting a slide adds nothing.")
    p.add_argument("slides", nargs="+", metavar="SLIDE", help="slide files OpenSlide can open")
    label = p.add_mutually_exclusive_group(required=True)
    label.add_argument("--class", dest="class_name", metavar="NAME", help="one class for every tile")
    label.add_argument("--labels", metavar="slides.csv", help="CSV with columns slide,class")
    label.add_argument("--regions", metavar="FILE.geojson",
                       help="QuPath GeoJSON regions (a file, or a folder of SLIDE_STEM.geojson); "
                            "a tile takes the class covering most of it, tiles outside every region are dropped")
    p.add_argument("--tile-size", type=_positive_int, metavar="N",
                   help="tile edge read from the slide, in pixels of the level read "
                        "(default: the workspace tile_size); tiles are stored at the workspace tile_size")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--level", type=_nonnegative_int, metavar="L", help="pyramid level to read (default 0)")
    where.add_argument("--mpp", type=_positive_float, metavar="M",
                       help="target microns per pixel (needs slide mpp metadata)")
    p.add_argument("--stride", type=_positive_int, metavar="S", help="grid step in level pixels (default: tile size)")
    p.add_argument("--min-tissue", type=float, default=0.5, metavar="F",
                   help="drop tiles whose tissue fraction is below F (default 0.5)")
    p.add_argument("--split-by", choices=["auto", "slide", "blocks"], default="auto",
                   help="group splits by slide, or by spatial blocks within a slide "
                        "(auto: by slide when 3 or more slides are given)")
    p.add_argument("--workers", type=_nonnegative_int, default=0, metavar="N",
                   help="threads reading, hashing and encoding tiles (default 0: one per core)")
    p.add_argument("--seed", type=_seed, default=0, help="seed of the split assignment (default 0)")
    p.set_defaults(func=cmd_ingest)

    p = sub.add_parser("import-tiles", help="import an ImageFolder tree of tiles (FOLDER/CLASS/*.png)",
                       parents=[ws], description="Import existing crops: FOLDER/CLASS/*.png, or "
                                                 "FOLDER/{train,val,test}/CLASS/*.png to keep your own splits.")
    p.add_argument("folder", metavar="FOLDER")
    p.add_argument("--seed", type=_seed, default=0, help="seed of the split assignment (default 0)")
    p.set_defaults(func=cmd_import_tiles)

    from finetune.config import PretrainConfig

    p = sub.add_parser("pretrain", help="train a class-conditional diffusion generator on the train tiles",
                       parents=[ws], description="DDPM pretraining with accelerate (EMA, checkpoints, resume); "
                       "exports a diffusers DDPMPipeline folder registered as a generator version. "
                       "Several GPUs: accelerate launch -m pathloop.cli pretrain ...")
    _add_dataclass_options(p, PretrainConfig, {"train_steps": ["--steps"], "train_batch_size": ["--batch-size"],
                                               "train_learning_rate": ["--lr"]})
    p.add_argument("--resume", metavar="latest|auto|DIR",
                   help="resume the run from its latest (or a given) checkpoint; auto: resume if it has one")
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("import-model", help="register a local diffusers UNet2DModel or DDPMPipeline folder",
                       parents=[ws], description="Import an existing class-conditional model after checking that "
                       "its class embedding and sample size fit the workspace.")
    p.add_argument("dir", metavar="DIR")
    p.add_argument("--note", help="free text stored with the version")
    p.set_defaults(func=cmd_import_model)

    p = sub.add_parser("generate", help="generate samples per class into the store", parents=[ws],
                       description="Seeded, batched sampling; every image is stored and registered as a sample "
                       "with its generator version, class, seed, sampler, steps and guidance. Rerunning the same "
                       "call adds nothing; a larger --per-class adds the missing ones.")
    p.add_argument("--model", required=True, metavar="ID", help="generator version id, or 'latest'")
    p.add_argument("--per-class", type=_positive_int, required=True, metavar="N", help="samples per class")
    p.add_argument("--classes", metavar="A,B", help="only these classes (default: all)")
    p.add_argument("--sampler", choices=["ddim", "ddpm"], default="ddim")
    p.add_argument("--steps", type=_positive_int, default=50, metavar="K", help="sampler steps (default 50)")
    p.add_argument("--guidance", type=float, default=1.0, metavar="G",
                   help="classifier-free guidance scale: 1 none, >1 stronger, 0 unconditional (default 1)")
    p.add_argument("--seed", type=_seed, default=0, help="base seed; sample i of class c gets its own seed from it")
    p.add_argument("--batch-size", type=_positive_int, default=64, metavar="B")
    p.add_argument("--round", type=_nonnegative_int, metavar="N", help="round number recorded on the samples")
    p.set_defaults(func=cmd_generate)

    from finetune.config import FinetuneConfig

    p = sub.add_parser("finetune", help="reward-weighted fine-tuning of a generator version (one step of the loop)",
                       parents=[ws], description="Fine-tune a generator version on its rated samples, each weighted "
                       "by the experts' share of plausible (enough ratings) or the reward model's probability, plus "
                       "beta x the denoising loss on real train tiles, in one forward pass; accelerate loop with EMA, "
                       "checkpoints and resume; registers the result as a child generator version. "
                       "Several GPUs: accelerate launch -m pathloop.cli finetune ...")
    p.add_argument("--from", dest="parent", required=True, metavar="GEN_ID|latest",
                   help="generator version to fine-tune, or latest")
    p.add_argument("--reward", default="current", metavar="REWARD_ID|current",
                   help="reward version weighting samples with too few ratings (default current: the newest)")
    _add_dataclass_options(p, FinetuneConfig, {"train_steps": ["--steps"], "train_batch_size": ["--batch-size"],
                                               "train_learning_rate": ["--lr"]})
    p.add_argument("--round", type=_nonnegative_int, metavar="N", help="round number recorded on the new version")
    p.add_argument("--resume", metavar="latest|auto|DIR",
                   help="resume the run from its latest (or a given) checkpoint; auto: resume if it has one")
    p.set_defaults(func=cmd_finetune)

    from reward.config import RewardConfig

    p = sub.add_parser("train-reward", help="train a reward model on the judgments (timm backbone + class head)",
                       parents=[ws], description="Learn p(plausible | image, class) from the experts' current "
                       "judgments plus weak labels from real tiles; early stopping on validation ROC-AUC, "
                       "temperature scaling, held-out metrics; registers a reward version. Backbone weights only "
                       "from a local file (--backbone-weights).")
    _add_dataclass_options(p, RewardConfig, {"train_epochs": ["--epochs"], "train_batch_size": ["--batch-size"],
                                             "train_learning_rate": ["--lr"], "backbone_weights": ["--weights"]})
    p.set_defaults(func=cmd_train_reward)

    p = sub.add_parser("score", help="score samples with a reward version (feeds the rating queue)", parents=[ws],
                       description="Batched inference; writes one score per sample and version, skipping those "
                       "already scored. The rating queue shows the most uncertain samples first.")
    p.add_argument("--reward", default="current", metavar="ID", help="reward version id, or current (the newest)")
    p.add_argument("--samples", default="unscored", metavar="unscored|all|ROUND",
                   help="unscored (no score from any version), all, or a round number (default unscored)")
    p.add_argument("--batch-size", type=_positive_int, default=256, metavar="B")
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("reward", help="reward versions: list with metrics side by side", parents=[ws],
                       description="Every reward version with its held-out metrics, and which one is current.")
    p.add_argument("reward_command", choices=["list"])
    p.set_defaults(func=cmd_reward_list)

    p = sub.add_parser("annotate", help="serve the rating app (Streamlit) for this workspace", parents=[ws],
                       description="Serve the browser app where pathologists rate tiles and admins see progress, "
                                   "agreement and exports.")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 for a lab)")
    p.add_argument("--port", type=_port, default=8501, help="port (default 8501)")
    p.set_defaults(func=cmd_annotate)

    p = sub.add_parser("users", help="accounts: add, list, disable, enable, password", parents=[ws],
                       description="Manage rater and admin accounts. Passwords are stored only as scrypt hashes.")
    p.add_argument("users_command", choices=["add", "list", "disable", "enable", "password"])
    p.add_argument("username", nargs="?", help="account name (not for list)")
    p.add_argument("--role", choices=["annotator", "admin"], default="annotator")
    p.add_argument("--email", help="e-mail for single sign-on (st.login) mapping")
    p.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
    p.add_argument("--generate-password", action="store_true", help="generate one and print it once")
    p.set_defaults(func=cmd_users)

    p = sub.add_parser("export", help="export judgments with full provenance, synthetic samples to share, or "
                                      "feedback as preference pairs / binary labels for DPO/KTO fine-tuning",
                       parents=[ws],
                       description="judgments: one row per judgment (all rows; `current` marks those not "
                                   "superseded) with annotator, verdict, reasons, comment, seconds, timestamps and "
                                   "the item's provenance. samples: a new folder of CLASS/SAMPLE_ID.png with a "
                                   "manifest.csv of each sample's recipe; --exclude-copies leaves out samples the "
                                   "latest `pathloop evaluate` flagged as near-copies of real training tiles. "
                                   "pairs: Parquet in the Pick-a-Pic v2 layout the diffusers Diffusion-DPO example "
                                   "reads (jpg_0, jpg_1 = JPEG bytes, quality 95, lossy; label_0 = 1.0 when image 0 "
                                   "is the plausible one, 0.0 when image 1 is; caption = class name), one pair per "
                                   "plausible x implausible sample of the same class and --pair-by group, "
                                   "by the majority of current plausible/implausible judgments (ties left out), "
                                   "order within a pair randomised (--seed), at most --max-pairs drawn at random. "
                                   "binary: Parquet, one row per rated sample for Diffusion-KTO-style training "
                                   "(image = JPEG or PNG bytes, caption = class name, label = 1 plausible / "
                                   "0 implausible by majority; ties left out). turing: every visual Turing test "
                                   "answer (undos included, `current` marks the rest) with campaign, item source "
                                   "(real/synthetic), generator version, class, rater, answer, confidence, seconds "
                                   "and time.")
    p.add_argument("what", choices=["judgments", "samples", "pairs", "binary", "turing"])
    p.add_argument("--format", choices=["csv", "parquet", "jsonl"], default=None,
                   help="judgments: csv (default), parquet or jsonl; samples: csv; pairs/binary: parquet only")
    p.add_argument("--out", metavar="PATH", help="output file or, for samples, a new folder (default: "
                                                 "WORKSPACE/exports/judgments.FORMAT, samples-TIMESTAMP, "
                                                 "pairs.parquet or binary.parquet)")
    p.add_argument("--model", metavar="ID", help="samples: only this generator version's (an id or latest)")
    p.add_argument("--exclude-copies", action="store_true",
                   help="samples: leave out near-copies of real training tiles; refuses samples never evaluated")
    p.add_argument("--min-ratings", type=int, metavar="N", default=None,
                   help="pairs/binary: only samples with at least N current plausible/implausible judgments "
                        "(default 2)")
    p.add_argument("--pair-by", choices=["generator", "round", "class"], default=None,
                   help="pairs: pair samples of the same class and generator version (default), the same class and "
                        "round, or the same class across versions")
    p.add_argument("--max-pairs", type=int, metavar="N", default=None,
                   help="pairs: at most N pairs, drawn at random (seeded) from all plausible x implausible "
                        "combinations (default 10000; 0 = all)")
    p.add_argument("--seed", type=int, default=None,
                   help="pairs: seed of the pair draw and of which image comes first (default 0)")
    p.add_argument("--campaign", metavar="NAME", help="turing: only this campaign's answers (name or id)")
    p.add_argument("--image-format", choices=["jpeg", "png"], default=None,
                   help="binary: image bytes as JPEG quality 95 (default; lossy, as Pick-a-Pic) or PNG (lossless)")
    p.set_defaults(func=cmd_export)

    from store.turing_config import CampaignConfig

    p = sub.add_parser("turing", help="visual Turing test: create, list, activate, deactivate, results",
                       parents=[ws], description="Raters see real val/test tiles and synthetic samples mixed blind "
                       "and answer real or synthetic (with confidence), on their own page, apart from plausibility "
                       "ratings. create fixes a campaign's items (inactive until activated); results prints "
                       "sensitivity (synthetic called synthetic), specificity (real called real) and accuracy with "
                       "Wilson 95% intervals per rater, pooled and per generator version, and Fleiss' kappa.")
    p.add_argument("turing_command", choices=["create", "list", "activate", "deactivate", "results"])
    p.add_argument("campaign", nargs="?", help="campaign name or id (activate, deactivate, results)")
    p.add_argument("--json", action="store_true", help="list/results as JSON")
    _add_dataclass_options(p, CampaignConfig, {})
    p.set_defaults(func=cmd_turing)

    p = sub.add_parser("generator", help="generator versions: list", parents=[ws],
                       description="List generator versions with their lineage.")
    p.add_argument("generator_command", choices=["list"])
    p.set_defaults(func=cmd_generator_list)

    from pathloop.rounds import RoundOptions

    p = sub.add_parser("round", help="run the loop: generate, await ratings, reward, fine-tune, evaluate",
                       parents=[ws], description="Advance the current round as far as it can and say what it waits "
                       "for; a finished round starts the next one from its fine-tuned generator. Options apply to a "
                       "round that starts in this call and are kept with it; a new round keeps the previous round's "
                       "options except those given. For cron: pathloop round --if-due.")
    p.add_argument("round_command", nargs="?", choices=["run", "status"], default="run",
                   help="run (default) or status: the history of rounds")
    p.add_argument("--if-due", action="store_true", help="do nothing (exit 0, quietly) while waiting for ratings")
    p.add_argument("--json", action="store_true", help="status as JSON")
    p.add_argument("--step", metavar="STATE", help="run only this step of the open round (refused out of order)")
    _add_dataclass_options(p, RoundOptions, {})
    p.set_defaults(func=cmd_round)

    p = sub.add_parser("simulate-expert", help="rate the queue with a programmatic expert (demo, study)",
                       parents=[ws], description="A documented rule-based rater (pathloop/simulate.py): plausible "
                       "only when stain levels (Macenko deconvolution), colour, texture and a classifier fit the real train "
                       "tiles of the class the tile is shown as (--rules ihc-legacy: the old DAB rules). Writes ordinary judgments as sim-expert-1, -2, ... through the queue.")
    p.add_argument("--raters", type=_positive_int, default=1, help="simulated raters (default 1)")
    p.add_argument("--max", type=_positive_int, metavar="N", help="at most N ratings per rater (default: until empty)")
    p.add_argument("--noise", type=float, default=0.0, metavar="P", help="share of verdicts flipped (default 0)")
    p.add_argument("--seed", type=_seed, default=0, help="seed of the noise and the queue order")
    p.add_argument("--fit-per-class", type=_positive_int, default=2000, metavar="N",
                   help="fit the rules on at most N real train tiles per class (default 2000)")
    p.add_argument("--rules", choices=["stain", "ihc-legacy"], default="stain",
                   help="stain: stain-agnostic rules fitted on the workspace (default); ihc-legacy: DAB rules of the "
                        "IHC demo")
    p.set_defaults(func=cmd_simulate_expert)

    from pathloop.evaluate_config import EvaluateConfig

    p = sub.add_parser("evaluate", help="compare generator versions: plausibility, FID/PRDC, utility, copies",
                       parents=[ws], description="Side by side per generator version: expert plausibility (Wilson "
                       "95% intervals), reward-predicted plausibility, FID, precision, recall, density and coverage "
                       "of fresh samples against the real test tiles in a fixed feature space, downstream utility "
                       "and memorisation. Writes WORKSPACE/evaluations/<timestamp>/ (CSV, JSON, PNG plots) and one "
                       "Evaluation row per version for the dashboard.")
    p.add_argument("--model", metavar="ID", help="generator version id, latest, or current (default: current)")
    p.add_argument("--against", nargs="+", metavar="ID",
                   help="versions to compare with (default: every ancestor of --model, root first)")
    _add_dataclass_options(p, EvaluateConfig, {})
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("status", help="what the workspace holds", parents=[ws],
                       description="Counts of slides, tiles per class and split, samples, judgments, versions.")
    p.add_argument("--json", action="store_true", help="print JSON for scripts")
    p.set_defaults(func=cmd_status)
    return parser


def _show_warning(message, category, filename, lineno, file=None, line=None, _default=warnings.showwarning):
    """A ``PathloopWarning`` as one ``pathloop: warning: ...`` line; any other warning as Python shows it."""
    if issubclass(category, PathloopWarning):
        print(f"pathloop: warning: {' '.join(str(message).split())}", file=sys.stderr, flush=True)
    else:
        _default(message, category, filename, lineno, file, line)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "users_command", None) not in (None, "list") and not args.username:
        parser.exit(2, f"pathloop users: error: users {args.users_command} needs a USERNAME "
                       f"(see `pathloop users --help`)\n")
    with warnings.catch_warnings():
        warnings.simplefilter("always", PathloopWarning)
        warnings.showwarning = _show_warning
        try:
            return args.func(args)
        except PathloopError as e:
            print(f"pathloop: error: {e}", file=sys.stderr)
            return 1
        except OSError as e:
            # A file or folder the checks did not foresee (unwritable, a file where a folder
            # should be, disk full): one line naming it, not a traceback.
            where = f" {e.filename}" if e.filename else ""
            print(f"pathloop: error: cannot use{where}: {e.strerror or e}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("pathloop: interrupted", file=sys.stderr)
            return 130


if __name__ == "__main__":
    sys.exit(main())
