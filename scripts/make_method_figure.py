#!/usr/bin/env python
"""Draw the picture that explains ReCast (docs/figures/recast_method.png):

    python scripts/make_method_figure.py [--out docs/figures/recast_method.png]

One group of G = 8 samples with no hit -> repair (the least target-like sample swapped for the ground-truth
anchor) -> contrast (strongest positive +alpha, hardest negative -alpha, the rest dropped) -> the static
[2P, T] actor batch. The selection is computed by the project's numpy reference (recast_ms.signals), so the
picture cannot drift from the code's tie rules. Needs numpy + matplotlib only (no MindSpore).
"""
import argparse
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

from recast_ms.signals import recast_signal  # noqa: E402

TARGET = (3, 7, 9)
SAMPLES = [(3, 1, 4), (5, 2, 8), (3, 7, 2), (1, 0, 3), (3, 4, 4), (3, 7, 5), (2, 7, 9), (3, 2, 0)]
ALPHA = 1.0
GREY, GREEN, RED, BLUE = "#d9d9d9", "#4daf4a", "#e41a1c", "#377eb8"


def sid(t):
    return "".join(f"<{c}_{v}>" for c, v in zip("abc", t))


def score(t):
    """Normalised common-prefix depth with the target (rewards.sid_similarity for one pair)."""
    n = 0
    while n < len(t) and t[n] == TARGET[n]:
        n += 1
    return n / len(t)


def box(ax, x, y, w, h, text, face, edge="black", lw=0.8, fontsize=7.5, alpha=1.0, hatch=None):
    ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.01,rounding_size=0.05", fc=face, ec=edge,
                                lw=lw, alpha=alpha, hatch=hatch))
    ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=fontsize, family="monospace")


def arrow(fig, x0, x1, y=0.5):
    fig.add_artist(FancyArrowPatch((x0, y), (x1, y), transform=fig.transFigure, arrowstyle="-|>",
                                   mutation_scale=18, lw=1.6, color="#555555"))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join("docs", "figures", "recast_method.png"))
    args = ap.parse_args()

    rewards = np.array([[float(s == TARGET) for s in SAMPLES]])
    scores = np.array([[score(s) for s in SAMPLES]])
    sig = recast_signal(rewards, scores, alpha=ALPHA)
    anchor = int(sig.anchor_index[0])
    pos, neg = (int(i) for i in sig.active_index[0])
    assert sig.repaired[0] and sig.advantages[0, pos] == ALPHA and sig.advantages[0, neg] == -ALPHA

    fig, axes = plt.subplots(1, 4, figsize=(15, 4.6), gridspec_kw={"wspace": 0.32})
    G = len(SAMPLES)
    titles = [f"1. rollout: G = {G} samples, no hit",
              "2. repair: least target-like\nswapped for the ground-truth anchor",
              "3. contrast: strongest positive +α,\nhardest negative −α, the rest dropped",
              "4. actor batch [2P, T]\n(GRPO: [P·G, T])"]
    for ax, title in zip(axes, titles):
        ax.set_xlim(0, 1)
        ax.set_ylim(-0.6, G + 0.9)
        ax.axis("off")
        ax.set_title(title, fontsize=9.5, loc="left")
    for ax in axes[:3]:
        ax.text(0.5, G + 0.35, f"target  {sid(TARGET)}", ha="center", fontsize=8, family="monospace",
                color=GREEN, weight="bold")

    for i, s in enumerate(SAMPLES):
        y = G - 1 - i
        label = f"y{i + 1} {sid(s)}  r=0 S={scores[0, i]:.2f}"
        box(axes[0], 0.02, y + 0.1, 0.96, 0.78, label, "white")
        if i == anchor:
            box(axes[1], 0.02, y + 0.1, 0.96, 0.78, f"y+ {sid(TARGET)}  r=1 S=1.00", GREEN, lw=1.6)
            axes[0].text(0.99, y + 0.5, "◀ argmin S", ha="left", va="center", fontsize=7.5, color=RED,
                         clip_on=False)
        else:
            box(axes[1], 0.02, y + 0.1, 0.96, 0.78, label, "white")
        if i == neg:  # y6 ties at S = 0.67: the lower index wins
            axes[1].text(0.99, y + 0.5, "◀ max S, r=0", ha="left", va="center", fontsize=7.5, color=RED,
                         clip_on=False)
        if i == pos:
            box(axes[2], 0.02, y + 0.1, 0.96, 0.78, f"y+ {sid(TARGET)}   A = +α", GREEN, lw=1.6)
        elif i == neg:
            box(axes[2], 0.02, y + 0.1, 0.96, 0.78, f"y{i + 1} {sid(s)}   A = −α", RED, lw=1.6)
        else:
            box(axes[2], 0.02, y + 0.1, 0.96, 0.78, f"y{i + 1}  A = 0, dropped", GREY, edge=GREY, alpha=0.6)
    axes[2].text(0.5, -0.45, "dropped before old-log-prob, reference and update", ha="center", fontsize=7.5,
                 color="#555555")

    # the static batch: 2 rows per prompt (P = 4); prompt 1 is the group above, prompt 4 an all-hit group
    # kept with a zero loss mask so the shape never changes
    P = 4
    ax = axes[3]
    row_h = G / (2 * P)
    for p in range(P):
        for k, (face, text) in enumerate(((GREEN, "+α"), (RED, "−α"))):
            y = G - (2 * p + k + 1) * row_h
            skipped = p == P - 1
            ax.add_patch(FancyBboxPatch((0.02, y + 0.06), 0.34, row_h - 0.12, boxstyle="square,pad=0",
                                        fc=BLUE, ec="black", lw=0.6, alpha=0.35))
            ax.add_patch(FancyBboxPatch((0.36, y + 0.06), 0.34, row_h - 0.12, boxstyle="square,pad=0",
                                        fc="white" if skipped else face, ec="black", lw=0.6,
                                        alpha=1.0 if skipped else 0.75, hatch="///" if skipped else None))
            who = f" (y{'+' if k == 0 else neg + 1})" if p == 0 else ""
            ax.text(0.74, y + row_h / 2, f"prompt {p + 1}: " + ("mask 0 (all hits)" if skipped else text + who),
                    va="center", fontsize=7.5)
    ax.text(0.19, -0.35, "prompt", ha="center", fontsize=7.5)
    ax.text(0.53, -0.35, "response", ha="center", fontsize=7.5)
    ax.text(0.36, -0.6, "← T tokens →", ha="center", fontsize=7.5)

    fig.canvas.draw()
    for left, right in zip(axes[:-1], axes[1:]):
        a, b = left.get_position(), right.get_position()
        arrow(fig, a.x1 + 0.004, b.x0 - 0.004, y=(a.y0 + a.y1) / 2)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    fig.savefig(args.out, dpi=110, bbox_inches="tight")
    print(args.out)


if __name__ == "__main__":
    main()
