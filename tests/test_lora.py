"""LoRA fine-tuning (finetune/lora.py): only the adapters train, the child is a full pipeline with the
adapter beside it, stock peft + diffusers rebuild the child from parent + adapter, resume equals an
uninterrupted run, two processes, rounds, and bad input."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import UNet2DModel
from peft import PeftModel
from test_finetune import (  # noqa: F401 (ft_ws: the fixture)
    CLASSES,
    SIZE,
    finetune_on_two_processes,
    ft_ws,
    redness,
    register_reward_version,
    tiny,
    unet_weights,
)

from finetune.config import FinetuneConfig, PretrainConfig
from finetune.pretrain import pretrain
from finetune.train import finetune
from store.errors import PathloopError
from store.generators import list_generators


def _parent(ws, engine):
    return pretrain(ws, engine, PretrainConfig(train_steps=4, train_batch_size=8, train_learning_rate=3e-3,
                                               train_lr_warmup_steps=0, ema_decay=0.1), progress=False)


def _eps(unet, seed: int = 0) -> torch.Tensor:
    """The UNet's noise prediction on a fixed input: ``(4, 3, SIZE, SIZE)``."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 3, SIZE, SIZE, generator=g)
    with torch.no_grad():
        return unet(x, torch.tensor([5, 100, 400, 900]), class_labels=torch.tensor([0, 1, 0, 1])).sample


@pytest.mark.parametrize("objective", ["weighted", "preference"])
def test_lora_trains_only_adapters_and_stock_peft_rebuilds_the_child(ft_ws, objective):  # noqa: F811 (the imported fixture)
    ws, engine, _ = ft_ws
    parent = _parent(ws, engine)
    cfg = tiny(train_steps=6, train_batch_size=8, train_learning_rate=1e-2, objective=objective,
               preference_beta=50.0, weighting="binary", beta=0.1, ema_decay=0.1, checkpoint_every=6, lora_rank=4,
               run_name=f"lora-{objective}")
    child = finetune(ws, engine, cfg, redness, parent_id=parent.id, reward_id=None, round_number=1, progress=False)
    info = child.config["lora"]
    assert info["rank"] == 4 and info["alpha"] == 4 and "conv1" in info["targets"] and info["folder"] == "lora"
    assert 0 < info["trained_parameters"] < sum(v.numel() for v in unet_weights(ws, parent).values()) / 5
    folder = ws.root / child.folder
    adapter = folder / "lora"
    assert {f.name for f in adapter.iterdir()} == {"adapter_config.json", "adapter_model.safetensors"}
    assert info["adapter_bytes"] == sum(f.stat().st_size for f in adapter.iterdir())
    assert info["adapter_bytes"] < (folder / "unet" / "diffusion_pytorch_model.safetensors").stat().st_size / 3
    assert child.config["final_loss"] == child.config["final_loss"]  # finite, not NaN

    # the child's weights moved; the weights LoRA does not touch (norms, embeddings) are the parent's exactly
    p, c = unet_weights(ws, parent), unet_weights(ws, child)
    assert p.keys() == c.keys()
    assert any(not torch.equal(p[k], c[k]) for k in p if ".conv1." in k)
    untouched = [k for k in p if "norm" in k or "embedding" in k or k.startswith("conv_in")]
    assert untouched and all(torch.equal(p[k], c[k]) for k in untouched)

    # stock diffusers + stock peft: parent + adapter = the pathloop child (merged weights)
    base = UNet2DModel.from_pretrained(ws.root / parent.folder, subfolder="unet").eval()
    stock = PeftModel.from_pretrained(base, str(adapter)).eval()
    ours = UNet2DModel.from_pretrained(folder, subfolder="unet").eval()
    assert torch.allclose(_eps(stock), _eps(ours), atol=1e-5)
    assert not torch.allclose(_eps(ours), _eps(UNet2DModel.from_pretrained(ws.root / parent.folder,
                                                                            subfolder="unet").eval()), atol=1e-4)
    assert json.loads((adapter / "adapter_config.json").read_text())["r"] == 4


def test_lora_child_of_a_lora_child_and_resume_equals_an_uninterrupted_run(ft_ws):  # noqa: F811 (the imported fixture)
    ws, engine, parent = ft_ws
    kw = dict(parent_id=parent.id, reward_id=None, progress=False)
    opts = dict(lora_rank=2, train_steps=4, checkpoint_every=2, train_learning_rate=1e-2)
    straight = finetune(ws, engine, tiny(run_name="la", **opts), redness, **kw)
    assert finetune(ws, engine, tiny(run_name="lb", **opts), redness, stop_after=2, **kw) is None
    resumed = finetune(ws, engine, tiny(run_name="lb", **opts), redness, resume="latest", **kw)
    a, b = unet_weights(ws, straight), unet_weights(ws, resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(PathloopError, match="made with lora_rank = 2, not 4"):
        finetune(ws, engine, tiny(run_name="lb", **{**opts, "lora_rank": 4}), redness, resume="latest", **kw)
    # a LoRA child fine-tuned again with LoRA: its adapter sits on the first child's merged weights
    grandchild = finetune(ws, engine, tiny(run_name="lc", **opts), redness, **{**kw, "parent_id": straight.id})
    assert grandchild.parent_id == straight.id and grandchild.config["lora"]["rank"] == 2
    base = UNet2DModel.from_pretrained(ws.root / straight.folder, subfolder="unet").eval()
    stock = PeftModel.from_pretrained(base, str(ws.root / grandchild.folder / "lora")).eval()
    ours = UNet2DModel.from_pretrained(ws.root / grandchild.folder, subfolder="unet").eval()
    assert torch.allclose(_eps(stock), _eps(ours), atol=1e-5)


def test_lora_with_selection_and_bad_options(ft_ws):  # noqa: F811 (the imported fixture)
    ws, engine, parent = ft_ws
    cfg = tiny(lora_rank=2, train_steps=2, select_every=1, select_per_class=2, select_steps=2, run_name="ls")
    child = finetune(ws, engine, cfg, redness, parent_id=parent.id, reward_id=None, progress=False)
    assert [h["step"] for h in child.config["selection"]["history"]] == [0, 1, 2]
    assert (ws.root / child.folder / "lora" / "adapter_model.safetensors").is_file()
    for kw, message in ((dict(lora_rank=-1), "lora_rank must be a whole number >= 0"),
                        (dict(lora_alpha=-2.0), "lora_alpha must be >= 0"),
                        (dict(lora_rank=2, lora_targets=" , "), "lora_targets must name at least one layer")):
        with pytest.raises(PathloopError, match=message):
            FinetuneConfig(**kw)
    before = len(list_generators(engine))
    with pytest.raises(PathloopError, match="lora_targets: no linear or convolution layer of the UNet is named "
                                            "'to_qkv'; expected names such as"):
        finetune(ws, engine, tiny(lora_rank=2, lora_targets="to_q,to_qkv", run_name="lx"), redness,
                 parent_id=parent.id, reward_id=None, progress=False)
    assert len(list_generators(engine)) == before and not (ws.runs_dir / "lx").exists()


def test_cli_lora_on_two_processes(ft_ws):  # noqa: F811 (the imported fixture)
    ws, engine, parent = ft_ws
    rid = register_reward_version(ws, engine, CLASSES)
    p = finetune_on_two_processes(ws, rid, "--lora-rank", "4", "--lora-alpha", "8")
    assert p.returncode == 0, p.stderr[-3000:]
    versions = list_generators(engine)
    assert [v.kind for v in versions] == ["pretrained", "finetuned"]  # registered once, by the main process
    child = versions[-1]
    assert child.config["processes"] == 2 and child.config["lora"]["rank"] == 4 and child.config["lora"]["alpha"] == 8
    base = UNet2DModel.from_pretrained(ws.root / parent.folder, subfolder="unet").eval()
    stock = PeftModel.from_pretrained(base, str(ws.root / child.folder / "lora")).eval()
    ours = UNet2DModel.from_pretrained(ws.root / child.folder, subfolder="unet").eval()
    assert torch.allclose(_eps(stock), _eps(ours), atol=1e-5)
