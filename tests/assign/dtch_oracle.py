"""METHOD §3's balance weights written directly from the formula, in float64 (a test oracle)."""

import numpy as np


def balance_weights(history: np.ndarray, beta: float) -> np.ndarray:
    """w [K] from the history h [K], with the floors of METHOD §3 (ĥ ≥ 1e-6, w ≥ 1e-25)."""
    hh = np.maximum(history, 1e-6)
    k = len(hh)
    if beta == 1:
        w = 1.0 / (k * hh)
    elif 0 < beta < 1:
        w = (1 - beta) / hh.sum() + beta / (k * hh)
    elif beta > 1:
        w = hh ** (-beta)
    else:
        w = np.full(k, 1.0 / hh.sum())
    return np.maximum(w, 1e-25)
