"""Train a reward model on the store's judgments, evaluate it held out, register a version.

The accelerate loop in the usual shape (``accumulate`` → ``backward`` → ``step``), BCE with
soft targets, AdamW, a cosine or step schedule, and early stopping on validation ROC-AUC
(expert examples; all examples when the expert ones have one side only; validation loss
breaks ties, as an AUC of 1.0 often comes epochs before a good fit). The best epoch's
weights are kept; a temperature is fitted on the validation experts; the test split is
scored once, at the end, before and after calibration. Only the main process writes.
"""

from __future__ import annotations

import copy
import hashlib
import math
import shutil
import time
from dataclasses import asdict

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, set_seed
from sqlalchemy.engine import Engine
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from reward import metrics as M
from reward.config import RewardConfig
from reward.data import ExampleSet, RewardData, build_data, dihedral
from reward.model import RewardModel, load_backbone_weights, model_config, save_folder
from store.errors import PathloopError
from store.models import RewardVersion
from store.rewards import incoming_folder, register_reward
from store.workspace import Workspace


def _generator(seed: int, *parts) -> torch.Generator:
    digest = hashlib.sha256(":".join(map(str, (seed, *parts))).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "big") >> 1)


def resolve_mixed_precision(choice: str) -> str:
    if choice != "auto":
        return choice
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "no"


def reward_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy of ``(B,)`` logits against ``(B,)`` soft targets in [0, 1]."""
    return F.binary_cross_entropy_with_logits(logits.float(), targets.float())


def make_lr_scheduler(optimizer, cfg: RewardConfig, total_steps: int):
    if cfg.train_schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, total_steps))
    return torch.optim.lr_scheduler.StepLR(optimizer, step_size=max(1, total_steps // 3), gamma=0.1)


def eval_loader(accelerator: Accelerator, data: ExampleSet, batch_size: int):
    """Indices of every example in order, sharded across processes; prepare once, reuse each epoch."""
    return accelerator.prepare(DataLoader(torch.arange(len(data)), batch_size=batch_size, shuffle=False))


@torch.inference_mode()
def predict_logits(accelerator: Accelerator, model, data: ExampleSet, loader) -> np.ndarray:
    """``(N,)`` logits of every example, in order, gathered from all processes (``loader``: ``eval_loader``)."""
    model.eval()
    out = []
    for idx in loader:
        cpu = idx.cpu()
        x = data.images[cpu].to(accelerator.device).contiguous(memory_format=torch.channels_last)
        logits = model(x, data.class_ids[cpu].to(accelerator.device))
        out.append(accelerator.gather_for_metrics(logits.float()).cpu())
    return torch.cat(out).numpy() if out else np.zeros(0)


def _monitor(p: np.ndarray, data: ExampleSet) -> float | None:
    """Validation ROC-AUC on the expert examples, else on all; None when neither has two sides."""
    t, expert = data.targets.numpy(), data.expert.numpy()
    auc = M.roc_auc(p[expert], t[expert])
    return auc if auc is not None else M.roc_auc(p, t)


def _split_metrics(p: np.ndarray, data: ExampleSet) -> dict:
    t, expert = data.targets.numpy(), data.expert.numpy()
    return {"expert": M.evaluate(p[expert], t[expert]), "weak": M.evaluate(p[~expert], t[~expert]),
            "all": M.evaluate(p, t)}


def train_reward(ws: Workspace, engine: Engine, cfg: RewardConfig, *, progress: bool = True,
                 data: RewardData | None = None) -> RewardVersion | None:
    """Train, evaluate and register a reward version; ``None`` on non-main processes."""
    classes, size = ws.settings.classes, ws.settings.tile_size
    data = data or build_data(ws, engine, cfg)
    set_seed(cfg.seed)
    model = RewardModel(cfg.backbone, len(classes), class_embed_dim=cfg.model_class_embed_dim,
                        hidden=cfg.model_hidden, dropout=cfg.model_dropout)
    if cfg.backbone_weights:
        load_backbone_weights(model.backbone, cfg.backbone, cfg.backbone_weights)
    sets = {s: ExampleSet(v, size) for s, v in data.splits.items()}
    if len(sets["train"]) == 0 or len(sets["val"]) == 0:
        raise PathloopError("the split left no training or validation examples; rate more samples")

    run_dir = ws.runs_dir / cfg.run_name
    accelerator = Accelerator(mixed_precision=resolve_mixed_precision(cfg.mixed_precision), log_with=cfg.log_with,
                              project_config=ProjectConfiguration(project_dir=str(run_dir),
                                                                  logging_dir=str(run_dir / "logs")))
    model = model.to(memory_format=torch.channels_last)  # faster convolutions on CPU (oneDNN) and GPU (cuDNN)
    train = sets["train"]
    loader = DataLoader(torch.arange(len(train)), batch_size=cfg.train_batch_size, shuffle=True,
                        generator=_generator(cfg.seed, "order"), drop_last=len(train) > cfg.train_batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train_learning_rate, weight_decay=cfg.train_weight_decay)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    lr_scheduler = accelerator.prepare(make_lr_scheduler(optimizer, cfg, cfg.train_epochs * len(loader)
                                                         * accelerator.num_processes))
    val_loader = eval_loader(accelerator, sets["val"], cfg.train_batch_size)
    if cfg.log_with:
        accelerator.init_trackers("pathloop-reward", config={k: v for k, v in asdict(cfg).items() if v is not None})

    best = {"score": (-math.inf, -math.inf), "epoch": 0, "state": None}
    history = []
    waited = 0
    started = time.time()
    bar = tqdm(total=cfg.train_epochs, desc="train-reward", unit="epoch",
               disable=not (progress and accelerator.is_local_main_process))
    for epoch in range(cfg.train_epochs):
        model.train()
        losses = []
        for step, idx in enumerate(loader):
            cpu = idx.cpu()
            x = train.images[cpu]
            if cfg.train_augment:
                x = dihedral(x, _generator(cfg.seed, "augment", epoch, step, accelerator.process_index))
            with accelerator.accumulate(model):
                x = x.to(accelerator.device).contiguous(memory_format=torch.channels_last)
                logits = model(x, train.class_ids[cpu].to(accelerator.device))
                loss = reward_loss(logits, train.targets[cpu].to(accelerator.device))
                accelerator.backward(loss)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()
            losses.append(loss.detach())
        train_loss = accelerator.gather(torch.stack(losses).mean()).mean().item()
        if not math.isfinite(train_loss):
            raise PathloopError(f"the loss became {train_loss} in epoch {epoch + 1}; lower --train-learning-rate")
        val_logits = predict_logits(accelerator, model, sets["val"], val_loader)
        auc = _monitor(M.sigmoid(val_logits), sets["val"])
        val_loss = M.soft_bce(val_logits, sets["val"].targets.numpy())
        score = (auc if auc is not None else -math.inf, -val_loss)  # equal AUC (say both 1.0): lower loss wins
        history.append({"epoch": epoch + 1, "train_loss": train_loss, "val_roc_auc": auc, "val_loss": val_loss})
        accelerator.log({"train_loss": train_loss, "val_loss": val_loss, "lr": lr_scheduler.get_last_lr()[0],
                         **({"val_roc_auc": auc} if auc is not None else {})}, step=epoch + 1)
        bar.update(1)
        bar.set_postfix(loss=f"{train_loss:.4f}", val_auc="-" if auc is None else f"{auc:.3f}")
        if score > best["score"]:
            best = {"score": score, "epoch": epoch + 1,
                    "state": copy.deepcopy(accelerator.unwrap_model(model).state_dict())}
            waited = 0
        else:
            waited += 1
            if waited >= cfg.train_patience:
                break
    bar.close()

    final = accelerator.unwrap_model(model)
    final.load_state_dict(best["state"])
    val_logits = predict_logits(accelerator, model, sets["val"], val_loader)
    expert = sets["val"].expert.numpy()
    temperature = M.fit_temperature(val_logits[expert], sets["val"].targets.numpy()[expert])
    final.temperature.fill_(temperature)
    test_logits = predict_logits(accelerator, model, sets["test"], eval_loader(accelerator, sets["test"], cfg.train_batch_size))
    metrics = {
        "test": _split_metrics(M.sigmoid(test_logits / temperature), sets["test"]),
        "test_uncalibrated": _split_metrics(M.sigmoid(test_logits), sets["test"]),
        "val": _split_metrics(M.sigmoid(val_logits / temperature), sets["val"]),
        "temperature": temperature, "best_epoch": best["epoch"], "epochs_run": len(history),
        "monitor": "val expert ROC-AUC", "history": history, "seconds": round(time.time() - started, 1),
        "processes": accelerator.num_processes,
    }
    version = None
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        config = {**model_config(cfg, classes, size), "training": asdict(cfg)}
        folder = incoming_folder(ws)
        try:
            save_folder(final.cpu(), config, folder, {"metrics.json": metrics, "data_manifest.json": data.manifest})
            version = register_reward(ws, engine, folder, backbone=cfg.backbone, config=config,
                                      metrics=headline(metrics), data_manifest=data.manifest)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return version


def headline(metrics: dict) -> dict:
    """What ``reward list`` and the dashboard show: held-out expert metrics, calibrated, plus context."""
    test = metrics["test"]["expert"]
    return {**{k: test[k] for k in ("n", "roc_auc", "balanced_accuracy", "brier", "ece")},
            "ece_uncalibrated": metrics["test_uncalibrated"]["expert"]["ece"],
            "test_all_roc_auc": metrics["test"]["all"]["roc_auc"], "temperature": metrics["temperature"],
            "best_epoch": metrics["best_epoch"], "epochs_run": metrics["epochs_run"]}
