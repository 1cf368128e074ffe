"""Draw the "How SPADE works" diagram: ``python docs/_scripts/method_diagram.py`` writes docs/_static/."""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

OUT = Path(__file__).resolve().parents[1] / "_static"
COL = {"data": "#f3d9e8", "enc": "#d8e4f0", "clu": "#fbe7c6", "exp": "#d9ecd6", "out": "#e6e0f3"}
EXPERT = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728"]


def box(ax, x, y, w, h, text, color, fs=9, weight="normal"):
    ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.02,rounding_size=0.08", fc=color, ec="#444", lw=1))
    ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=fs, weight=weight, wrap=True)


def arrow(ax, a, b, text=None, color="#333", rad=0.0, fs=8):
    ax.add_patch(FancyArrowPatch(a, b, arrowstyle="-|>", mutation_scale=12, color=color, lw=1.2,
                                 connectionstyle=f"arc3,rad={rad}"))
    if text:
        ax.text((a[0] + b[0]) / 2, (a[1] + b[1]) / 2 + 0.12, text, ha="center", va="bottom", fontsize=fs, color=color)


def main():
    fig, ax = plt.subplots(figsize=(13, 6.5))
    ax.set_xlim(0, 13)
    ax.set_ylim(0.7, 7.2)
    ax.axis("off")
    ax.text(0.1, 6.95, "Training (ss.tl.fit_spade)", fontsize=12, weight="bold")
    ax.text(0.1, 2.75, "Inference (ss.tl.embed)", fontsize=12, weight="bold")
    ax.plot([0.1, 12.9], [3.05, 3.05], color="#bbb", lw=1, ls="--")

    # --- training row
    box(ax, 0.1, 5.3, 1.7, 1.3, "H&E patch\nof each spot\n(224 px)", COL["data"])
    box(ax, 0.1, 3.5, 1.7, 1.3, "spot expression\n(gene panel,\nlog1p CP10k)", COL["data"])
    box(ax, 2.3, 5.3, 1.7, 1.3, "frozen encoder\n(UNI, EfficientNet…)\nss.pp.extract_features", COL["enc"], fs=8)
    arrow(ax, (1.8, 5.95), (2.3, 5.95))
    box(ax, 4.5, 5.3, 2.0, 1.3, "stage 1\nk-means per organ\n→ prototypes", COL["clu"])
    arrow(ax, (4.0, 5.95), (4.5, 5.95), "X_image")
    box(ax, 7.0, 5.3, 1.9, 1.3, "stage 2\nk-means of all\nprototypes → experts", COL["clu"])
    arrow(ax, (6.5, 5.95), (7.0, 5.95))
    # experts
    for i, c in enumerate(EXPERT):
        y = 6.25 - i * 0.72
        ax.add_patch(FancyBboxPatch((9.4, y - 0.25), 3.4, 0.5, boxstyle="round,pad=0.02,rounding_size=0.08",
                                    fc=COL["exp"], ec=c, lw=2))
        ax.text(9.55, y, f"expert {i}:", fontsize=8.5, va="center", color=c, weight="bold")
        ax.text(10.45, y, "image head  ⟷  expression head", fontsize=8, va="center")
    ax.text(11.1, 3.5, "each expert trains on its own spots with\nBLEEP's soft-target contrastive loss\n"
            "(all experts in one batched step)", fontsize=8, ha="center", va="center", style="italic")
    arrow(ax, (8.9, 5.95), (9.4, 6.0), "spots → expert", fs=7)
    arrow(ax, (1.8, 4.15), (9.35, 4.15), "expression of the expert's spots", color="#555")

    # --- inference row
    box(ax, 0.1, 1.0, 1.7, 1.3, "new H&E tile\n(any cohort)", COL["data"])
    box(ax, 2.3, 1.0, 1.7, 1.3, "same frozen\nencoder", COL["enc"])
    arrow(ax, (1.8, 1.65), (2.3, 1.65))
    box(ax, 4.5, 1.0, 2.0, 1.3, "routing\nw_e = Σ softmax(−d_k / sτ)\nover expert e's prototypes", COL["clu"], fs=8)
    arrow(ax, (4.0, 1.65), (4.5, 1.65), "features")
    box(ax, 7.0, 1.0, 1.9, 1.3, "Σ_e w_e · image head_e\n(joint space,\n256-d)", COL["exp"], fs=8.5)
    arrow(ax, (6.5, 1.65), (7.0, 1.65), "weights")
    box(ax, 9.4, 1.0, 3.4, 1.3, "adata.obsm['X_spade'], ['spade_expert_weights']\nscanpy: neighbors / UMAP / leiden\n"
        "squidpy: neighbourhoods, autocorrelation\nss.tl.predict_expression (retrieval)", COL["out"], fs=8)
    arrow(ax, (8.9, 1.65), (9.4, 1.65))
    arrow(ax, (5.5, 5.3), (5.5, 2.3), color="#a0522d")
    ax.text(5.6, 3.45, "prototypes (centroids)\nand their experts", fontsize=8, color="#a0522d", va="center")
    arrow(ax, (9.5, 3.85), (8.2, 2.3), color="#2e7d32", rad=0.1)
    ax.text(8.1, 3.2, "trained\nheads", fontsize=8, color="#2e7d32", ha="right", va="center")
    fig.tight_layout()
    OUT.mkdir(exist_ok=True)
    fig.savefig(OUT / "spade_method.svg")


if __name__ == "__main__":
    main()
