"""The simulator's click model: who examines which position, how the logging ranker orders the list,
and how neighbours change examination. P(click) = P(examined | position, user type, neighbours) x
P(relevant | user, item) (the position-based model: Richardson et al. 2007; Joachims et al. 2017)."""
from __future__ import annotations

import numpy as np

from flows.params import SimulatorParams

# Examination curves. Patient users scan the whole page with a slow power-law decay; impatient users
# look at the top ~3 (geometric decay).
TOP_EXAMINE = 0.95
PATIENT_POWER = 0.4
IMPATIENT_RATIO = 0.45


def examination(shown: int, eta: float | None = None, impatient_factor: float = 3.0) -> dict[str, np.ndarray]:
    """P(examined | position) per user type. eta None: the original curves (geometric for impatient
    users, a slow power law for patient ones); eta set: the position-bias model of Joachims et al. 2017,
    ∝ (1/position)^η for patient users and ^(η · impatient_factor) for impatient ones."""
    pos = np.arange(1, shown + 1, dtype=np.float64)
    if eta is None:
        return {"impatient": TOP_EXAMINE * IMPATIENT_RATIO ** (pos - 1),
                "patient": TOP_EXAMINE * pos ** -PATIENT_POWER}
    return {"impatient": TOP_EXAMINE * pos ** -(eta * impatient_factor), "patient": TOP_EXAMINE * pos ** -eta}


def ranker_scores(logit: np.ndarray, keep: np.ndarray, noise: np.ndarray, params: SimulatorParams) -> np.ndarray:
    """The logging ranker's scores. logging_strength s: s · relevance + (1 - s) · noise scaled to the
    spread of relevance among the candidates (0: a random order, 1: the true order); else the original
    true logit + ranker_noise · noise. `noise` is the logger's unit-variance error (persistent and
    per-request parts mixed by the simulator), the same draw either way, so switching the parameter
    leaves every other random draw of the world unchanged."""
    if params.logging_strength is None:
        return logit + params.ranker_noise * noise
    spread = float(np.std(logit[keep])) if keep.any() else 1.0
    s = params.logging_strength
    return s * logit + (1.0 - s) * spread * noise


def neighbour_factor(p_rel: np.ndarray, shown: np.ndarray, gamma: float, columns: int | None) -> np.ndarray:
    """(R, S) multiplier of each shown item's examination: 1 - γ · the mean relevance of its neighbours
    (the items beside it in a list; left/right/above/below in a grid of `columns`). A highly relevant
    neighbour draws the eye away (the independence assumption of position-bias models breaks)."""
    rel = np.where(shown, p_rel, np.nan)                                  # (R, S)
    r, s = rel.shape
    if columns is None:
        offsets = [(0, -1), (0, 1)]
        grid = rel.reshape(r, 1, s)
    else:
        rows = -(-s // columns)
        grid = np.full((r, rows * columns), np.nan)
        grid[:, :s] = rel
        grid = grid.reshape(r, rows, columns)
        offsets = [(0, -1), (0, 1), (-1, 0), (1, 0)]
    padded = np.pad(grid, ((0, 0), (1, 1), (1, 1)), constant_values=np.nan)
    h, w = grid.shape[1:]
    stack = np.stack([padded[:, 1 + dy:1 + dy + h, 1 + dx:1 + dx + w] for dy, dx in offsets])
    with np.errstate(invalid="ignore"):
        counts = np.sum(~np.isnan(stack), axis=0)
        mean = np.where(counts > 0, np.nansum(stack, axis=0) / np.maximum(counts, 1), 0.0)
    return (1.0 - gamma * mean).reshape(r, -1)[:, :s]


def propensity_formula(params: SimulatorParams) -> dict[str, str]:
    if params.position_bias is None:
        return {"impatient": f"{TOP_EXAMINE} * {IMPATIENT_RATIO}^(position-1)",
                "patient": f"{TOP_EXAMINE} * position^-{PATIENT_POWER}"}
    eta = params.position_bias
    return {"impatient": f"{TOP_EXAMINE} * position^-{eta * params.impatient_bias_factor:g}",
            "patient": f"{TOP_EXAMINE} * position^-{eta:g}"}
