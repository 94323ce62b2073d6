"""Macenko stain-matrix estimation and colour deconvolution, for any two-stain brightfield image.

Macenko et al., ISBI 2009: optical density (OD) of the tissue pixels lies near a plane spanned
by the two stain vectors; the extreme angles of the pixels in that plane are the stains.
"""

from __future__ import annotations

import numpy as np

from store.errors import PathloopError

# Pixels whose OD vector is shorter are background (near white). A norm, not Macenko's
# every-channel threshold: that one drops pure pixels of a stain that barely absorbs one colour.
OD_MIN = 0.15


def optical_density(rgb: np.ndarray) -> np.ndarray:
    """``(..., 3)`` uint8 → ``(..., 3)`` float OD = -log((I + 1) / 256)."""
    return -np.log((rgb.astype(np.float64) + 1.0) / 256.0)


def macenko_matrix(rgb: np.ndarray, alpha: float = 1.0) -> np.ndarray:
    """``(N, H, W, 3)`` or ``(H, W, 3)`` uint8 tissue → ``(2, 3)`` unit stain vectors (OD space), rows ordered
    by their red OD (haematoxylin-like, the blue stain, first: it absorbs red most)."""
    od = optical_density(rgb).reshape(-1, 3)
    od = od[np.linalg.norm(od, axis=1) > OD_MIN]
    if len(od) < 10:
        raise PathloopError(f"only {len(od)} tissue pixels; Macenko stain estimation needs at least 10")
    # The plane of the two largest principal directions of OD (about the origin, as Macenko does).
    _, vecs = np.linalg.eigh(np.cov(od.T))
    plane = vecs[:, 1:3]
    plane = plane * np.sign(plane.sum(axis=0, keepdims=True) + 1e-12)  # both axes point into positive OD
    proj = od @ plane
    angle = np.arctan2(proj[:, 1], proj[:, 0])
    lo, hi = np.percentile(angle, alpha), np.percentile(angle, 100 - alpha)
    stains = np.stack([plane @ [np.cos(a), np.sin(a)] for a in (lo, hi)])
    stains = stains * np.sign(stains.sum(axis=1, keepdims=True))
    stains /= np.linalg.norm(stains, axis=1, keepdims=True)
    return stains[np.argsort(-stains[:, 0])]


def concentrations(rgb: np.ndarray, stains: np.ndarray) -> np.ndarray:
    """``(H, W, 3)`` uint8 and ``(2, 3)`` stains → ``(H, W, 2)`` least-squares stain concentrations."""
    od = optical_density(rgb).reshape(-1, 3)
    conc, *_ = np.linalg.lstsq(stains.T, od.T, rcond=None)
    return conc.T.reshape(*rgb.shape[:2], 2)
