"""The reward-weighted fine-tuning objective (DESIGN.md, "The fine-tuning objective").

For B synthetic tiles x̃ᵢ with weights wᵢ and B real tiles xⱼ, all noised and denoised in
ONE forward pass over the concatenated batch (synthetic first):

    L = (1/B) Σᵢ wᵢ ‖ε − ε_θ(x̃ᵢ)‖²  +  β (1/B) Σⱼ ‖ε − ε_θ(xⱼ)‖²

the reward-weighted likelihood of Lee et al. (2023) with the real tiles as regulariser, as
in Sun et al. (2023). ‖·‖² is the mean over pixels and channels, so with all weights 1 and
β = 1 the loss is twice pretraining's ``F.mse_loss``.

The preference objective (Diffusion-DPO, Wallace et al. 2023) learns from the implausible
tiles too: for P pairs of a plausible tile x̃ʷ and an implausible tile x̃ˡ of the same class,
noised with the same ε and t, and the frozen parent ε_ref,

    Δ = (‖ε − ε_θ(x̃ʷ)‖² − ‖ε − ε_θ(x̃ˡ)‖²) − (‖ε − ε_ref(x̃ʷ)‖² − ‖ε − ε_ref(x̃ˡ)‖²)
    L = (1/P) Σ −log σ(−(κ/2) Δ)  +  β (1/B) Σⱼ ‖ε − ε_θ(xⱼ)‖²

κ (``preference_beta``) sets how far the child may move from the parent: the larger, the
sooner a pair stops pulling.

The KTO objective (Diffusion-KTO, Li et al. 2024, after Ethayarajh et al.'s KTO) learns from
each tile's own binary verdict, no pairing: with the implicit reward of a synthetic tile

    r = (κ/2) (‖ε − ε_ref(x̃)‖² − ‖ε − ε_θ(x̃)‖²)      (the model denoises it better than the parent: r > 0)

and the reference point z = max(0, mean r over the batch), detached (KTO's estimate of the
policy's KL from the reference; the paper draws it from mismatched pairs, here from the batch),

    L = (1/S) Σ [ λ_D (1 − σ(r − z)) if plausible,  λ_U (1 − σ(z − r)) if implausible ]  +  β · real term

λ_D, λ_U weigh the rarer verdict up so that λ_D n_D = λ_U n_U (KTO's advice: that ratio in
[1, 4/3]); the sigmoid is the Kahneman-Tversky value function of both papers. Because it needs
no pairs, it also learns from a round whose tiles are all implausible.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from finetune.config import WEIGHTINGS


class WeightedLoss(NamedTuple):
    """``total`` is what ``backward`` sees; the two terms (before β) are for logging. All scalars."""

    total: torch.Tensor
    synthetic: torch.Tensor
    real: torch.Tensor


def per_sample_error(pred: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """``(B, C, H, W)`` prediction and target → ``(B,)`` squared error, mean over C, H, W (in float32)."""
    if pred.shape != noise.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and noise {tuple(noise.shape)} differ in shape")
    return (pred.float() - noise.float()).pow(2).flatten(1).mean(dim=1)


def reward_weighted_loss(pred: torch.Tensor, noise: torch.Tensor, weights: torch.Tensor, beta: float) -> WeightedLoss:
    """The objective over one concatenated batch.

    ``pred``, ``noise``: ``(B_s + B_r, C, H, W)``, the ``B_s`` synthetic tiles first, then the
    ``B_r`` real ones; ``weights``: ``(B_s,)`` one per synthetic tile. Each term is a mean over
    its own tiles (``1/B`` of DESIGN.md when ``B_s = B_r = B``).
    """
    n = weights.shape[0]
    if weights.ndim != 1 or not 0 < n < pred.shape[0]:
        raise ValueError(f"weights {tuple(weights.shape)} must be (B_s,) with 0 < B_s < batch {pred.shape[0]}")
    if beta < 0:
        raise ValueError(f"beta must be >= 0, not {beta}")
    err = per_sample_error(pred, noise)
    synthetic = (weights.to(err.device, err.dtype) * err[:n]).mean()
    real = err[n:].mean()
    return WeightedLoss(synthetic + beta * real, synthetic, real)


def preference_loss(pred: torch.Tensor, noise: torch.Tensor, ref_pred: torch.Tensor, pairs: int, kappa: float,
                    beta: float) -> WeightedLoss:
    """The preference objective over one concatenated batch: ``synthetic`` is the pair term.

    ``pred``, ``noise``: ``(2P + B_r, C, H, W)``: the P plausible tiles, then their P
    implausible partners (the same ε and t as their pair), then the ``B_r`` real tiles;
    ``ref_pred``: ``(2P, C, H, W)`` the frozen parent's prediction for the pairs.
    """
    if pairs < 1 or pred.shape[0] <= 2 * pairs:
        raise ValueError(f"batch {pred.shape[0]} must hold {pairs} pairs (2 tiles each) and at least one real tile")
    if ref_pred.shape != pred[:2 * pairs].shape:
        raise ValueError(f"reference prediction {tuple(ref_pred.shape)} must be {tuple(pred[:2 * pairs].shape)}")
    if kappa <= 0 or beta < 0:
        raise ValueError(f"preference_beta must be > 0 and beta >= 0, not {kappa} and {beta}")
    err = per_sample_error(pred, noise)
    ref = per_sample_error(ref_pred, noise[:2 * pairs]).detach()
    delta = (err[:pairs] - err[pairs:2 * pairs]) - (ref[:pairs] - ref[pairs:])
    synthetic = -torch.nn.functional.logsigmoid(-0.5 * kappa * delta).mean()
    real = err[2 * pairs:].mean()
    return WeightedLoss(synthetic + beta * real, synthetic, real)


def kto_weights(desirable: int, undesirable: int) -> tuple[float, float]:
    """``(λ_D, λ_U)`` for the run's counts of plausible and implausible tiles: the rarer side weighed up so that
    λ_D·n_D = λ_U·n_U, neither below 1 (a side with no tiles keeps 1)."""
    if desirable and undesirable:
        return max(1.0, undesirable / desirable), max(1.0, desirable / undesirable)
    return 1.0, 1.0


def kto_loss(pred: torch.Tensor, noise: torch.Tensor, ref_pred: torch.Tensor, desirable: torch.Tensor, kappa: float,
             beta: float, lambda_d: float = 1.0, lambda_u: float = 1.0) -> tuple[WeightedLoss, torch.Tensor]:
    """The KTO objective over one concatenated batch; also returns the share of tiles on their verdict's side of z.

    ``pred``, ``noise``: ``(S + B_r, C, H, W)``, the S synthetic tiles first; ``ref_pred``:
    ``(S, C, H, W)`` the frozen parent's prediction for them; ``desirable``: ``(S,)`` bool,
    True where the tile is plausible.
    """
    n = desirable.shape[0]
    if desirable.ndim != 1 or not 0 < n < pred.shape[0]:
        raise ValueError(f"desirable {tuple(desirable.shape)} must be (S,) with 0 < S < batch {pred.shape[0]}")
    if ref_pred.shape != pred[:n].shape:
        raise ValueError(f"reference prediction {tuple(ref_pred.shape)} must be {tuple(pred[:n].shape)}")
    if kappa <= 0 or beta < 0 or lambda_d <= 0 or lambda_u <= 0:
        raise ValueError(f"kto needs preference_beta > 0, beta >= 0 and positive weights, not {kappa}, {beta}, "
                         f"{lambda_d}, {lambda_u}")
    err = per_sample_error(pred, noise)
    ref = per_sample_error(ref_pred, noise[:n]).detach()
    r = 0.5 * kappa * (ref - err[:n])
    z = r.mean().clamp(min=0).detach()
    d = desirable.to(r.device)
    value = torch.where(d, lambda_d * (1 - torch.sigmoid(r - z)), lambda_u * (1 - torch.sigmoid(z - r)))
    synthetic = value.mean()
    real = err[n:].mean()
    right_side = torch.where(d, r > z, r < z).float().mean().detach()
    return WeightedLoss(synthetic + beta * real, synthetic, real), right_side


def pair_accuracy(pred: torch.Tensor, noise: torch.Tensor, ref_pred: torch.Tensor, pairs: int) -> torch.Tensor:
    """Share of pairs whose plausible tile the model favours more than the parent does (a scalar)."""
    err = per_sample_error(pred[:2 * pairs], noise[:2 * pairs])
    ref = per_sample_error(ref_pred, noise[:2 * pairs])
    return (((err[:pairs] - err[pairs:]) - (ref[:pairs] - ref[pairs:])) < 0).float().mean()


def sample_weights(expert_targets: torch.Tensor, reward_probs: torch.Tensor, mode: str = "reward",
                   threshold: float = 0.5) -> torch.Tensor:
    """``(B,)`` weights of synthetic tiles from their plausibility.

    ``expert_targets``: ``(B,)`` the experts' share of plausible judgments, NaN where a tile
    has too few ratings; ``reward_probs``: ``(B,)`` calibrated p(plausible) from the reward
    model, used where the experts' verdict is NaN. Modes: ``reward`` the plausibility as is;
    ``binary`` 1 where it is >= ``threshold``, else 0; ``normalized`` divided by the batch
    mean (all zeros stay zeros); ``none`` all 0, whatever the plausibility (a control without feedback).
    """
    if mode not in WEIGHTINGS:
        raise ValueError(f"weighting {mode!r}; expected one of: {', '.join(WEIGHTINGS)}")
    if mode == "none":
        return torch.zeros(expert_targets.shape, dtype=torch.float32)
    p = torch.where(torch.isnan(expert_targets), reward_probs, expert_targets).float()
    if torch.isnan(p).any():
        raise ValueError("a tile has neither an experts' verdict nor a reward probability")
    if mode == "binary":
        return (p >= threshold).float()
    if mode == "normalized":
        mean = p.mean()
        return p / mean if mean > 0 else torch.zeros_like(p)
    return p
