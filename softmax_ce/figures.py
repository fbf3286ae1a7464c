"""The tutorial's figures (../shared/ARTICLE.md in the project's notes), computed with the
package's own functions: ``python -m softmax_ce figures --out DIR`` writes one PNG per figure.

The data functions need only torch; the plots need matplotlib (``pip install .[plot]``).
"""

from __future__ import annotations

import os
from typing import Dict, List

import torch

import softmax_ce

__all__ = ["bce_cost_data", "softmax_example_data", "ce_vs_mse_gradient_data", "write_figures"]

SOFTMAX_EXAMPLE = [1.0, 5.0, 6.0, 4.0, 2.0, 2.6, 6.0]
# the article's values (NumPy)
SOFTMAX_EXAMPLE_VALUES = [0.00263032, 0.14361082, 0.39037468, 0.05283147, 0.00714996,
                          0.01302808, 0.39037468]


def bce_cost_data() -> Dict[str, torch.Tensor]:
    """The binary cross-entropy cost J(w) against phi(z) for y = 1 and y = 0, z from -5 to 5 in
    steps of 0.2 (the article's ``np.arange(-5, 5, 0.2)``), through
    ``softmax_ce.binary_cross_entropy_with_logits(z, y, reduction='none')``."""
    z = torch.arange(-5, 5, 0.2, dtype=torch.float64)
    phi = torch.sigmoid(z)
    j1 = softmax_ce.binary_cross_entropy_with_logits(z, torch.ones_like(z), reduction="none")
    j0 = softmax_ce.binary_cross_entropy_with_logits(z, torch.zeros_like(z), reduction="none")
    return {"z": z, "phi": phi, "j_y1": j1, "j_y0": j0}


def softmax_example_data() -> torch.Tensor:
    """``softmax([1, 5, 6, 4, 2, 2.6, 6])`` through ``softmax_ce.softmax``."""
    return softmax_ce.softmax(torch.tensor(SOFTMAX_EXAMPLE, dtype=torch.float64), dim=0)


def ce_vs_mse_gradient_data() -> Dict[str, torch.Tensor]:
    """d loss / d z for a target of class 1, against z: cross-entropy (``softmax_ce.cross_entropy``
    on the two logits [0, z]) and the squared error of the predicted probability
    (``softmax_ce.softmax`` of [0, z], whose class-1 probability is sigmoid(z)), both through
    autograd on the package's hand-written gradients."""
    z = torch.linspace(-10, 10, 201, dtype=torch.float64, requires_grad=True)
    logits = torch.stack([torch.zeros_like(z), z], dim=1)
    target = torch.ones(z.shape[0], dtype=torch.long)
    ce = softmax_ce.cross_entropy(logits, target, reduction="sum")
    (g_ce,) = torch.autograd.grad(ce, z)
    p = softmax_ce.softmax(torch.stack([torch.zeros_like(z), z], dim=1), dim=1)[:, 1]
    mse = (p - 1).square().sum()
    (g_mse,) = torch.autograd.grad(mse, z)
    return {"z": z.detach(), "grad_ce": g_ce, "grad_mse": g_mse}


def write_figures(out_dir: str) -> List[str]:
    """Writes the three PNGs to out_dir; returns their paths."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("figures need matplotlib: pip install matplotlib (or .[plot])")
    os.makedirs(out_dir, exist_ok=True)
    paths = []

    d = bce_cost_data()
    fig, ax = plt.subplots(figsize=(8, 6))
    ax.plot(d["phi"], d["j_y1"], label="J(w) if y=1")
    ax.plot(d["phi"], d["j_y0"], linestyle="--", label="J(w) if y=0")
    ax.set_xlabel("$\\phi$(z)")
    ax.set_ylabel("J(w)")
    ax.set_ylim(0.0, 5.1)
    ax.set_xlim(0, 1)
    ax.legend(loc="best")
    ax.set_title("Binary cross-entropy (softmax_ce.binary_cross_entropy_with_logits)")
    paths.append(_save(fig, out_dir, "bce_cost.png"))

    probs = softmax_example_data()
    fig, ax = plt.subplots(figsize=(8, 5))
    labels = [f"{v:g}" for v in SOFTMAX_EXAMPLE]
    bars = ax.bar(range(len(probs)), probs.tolist(), tick_label=labels)
    for bar, p in zip(bars, probs.tolist()):
        ax.annotate(f"{p:.4f}", (bar.get_x() + bar.get_width() / 2, p), ha="center",
                    va="bottom", fontsize=9)
    ax.set_xlabel("score z")
    ax.set_ylabel("softmax(z)")
    ax.set_title("softmax_ce.softmax([1, 5, 6, 4, 2, 2.6, 6]): probabilities summing to 1")
    paths.append(_save(fig, out_dir, "softmax_example.png"))

    g = ce_vs_mse_gradient_data()
    fig, ax = plt.subplots(figsize=(8, 5))
    ax.plot(g["z"], g["grad_ce"], label="cross-entropy: p - 1")
    ax.plot(g["z"], g["grad_mse"], linestyle="--", label="squared error: 2 (p - 1) p (1 - p)")
    ax.axhline(0, color="gray", linewidth=0.5)
    ax.set_xlabel("logit z of the true class (p = sigmoid(z))")
    ax.set_ylabel("d loss / d z")
    ax.legend(loc="best")
    ax.set_title("Confidently wrong (z << 0): cross-entropy's gradient stays, MSE's vanishes")
    paths.append(_save(fig, out_dir, "ce_vs_mse_gradient.png"))
    return paths


def _save(fig, out_dir, name) -> str:
    import matplotlib.pyplot as plt

    path = os.path.join(out_dir, name)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
