"""docs/forgetting_frontier.png from the figures in docs/demo_experiments.md ("Forgetting against learning" and
"The anchor on the replayed text"): python docs/forgetting_frontier.py"""
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sft = [  # label, ppl, sentiment, group
    ("weight 0, 2%", 587, 0.817, "replay / prompt weight"), ("weight 0, 5%", 536, 0.817, "replay / prompt weight"),
    ("weight 1, 2%", 403, 0.737, "replay / prompt weight"), ("0.3, 2%", 407, 0.760, "replay / prompt weight"),
    ("0.1, 2%", 436, 0.790, "replay / prompt weight"), ("0.2, 5%", 407, 0.793, "replay / prompt weight"),
    ("0.3, 5%", 398, 0.757, "replay / prompt weight"), ("0.1, 10%", 416, 0.660, "replay / prompt weight"),
    ("0.15, 5%", 414, 0.770, "replay / prompt weight"),
    ("0.2, 5%, 360 steps", 395, 0.780, "more steps"),
    ("Muon 0.01", 459, 0.813, "this section"), ("Muon 0.005", 437, 0.797, "this section"),
    ("anchor 3", 405, 0.790, "this section"), ("anchor 10", 387, 0.677, "this section"),
    ("embeddings frozen", 391, 0.697, "this section"), ("WiSE-FT 0.8", 401, 0.683, "this section"),
    ("10,000 reviews", 437, 0.817, "this section"),
    ("kept: 0.1, 5%", 427, 0.810, "kept"),
    ("KL 1", 380, 0.660, "KL to the start on the replayed text"),
    ("KL 0.3", 390, 0.777, "KL to the start on the replayed text"),
]
dist = [
    ("before: answers only, 5%", 505, 0.976, "the recipe before"),
    ("kept: KL 1", 455, 0.994, "kept"), ("KL 3", 449, 0.944, "KL to the start on the replayed text"),
    ("KL 10", 443, 0.946, "KL to the start on the replayed text"), ("10% replay", 482, 0.908, "this section"),
    ("cue first, weight 0.2", 474, 0.950, "this section"), ("anchor 3", 497, 0.984, "this section"),
    ("anchor 20", 470, 0.926, "this section"), ("weight 0.2, 5%", 475, 0.946, "replay / prompt weight"),
    ("weight 0.2, 5%, 150 steps", 471, 0.920, "more steps"),
]
style = {"replay / prompt weight": ("o", "tab:blue"), "this section": ("s", "tab:orange"),
         "more steps": ("^", "tab:green"), "the recipe before": ("P", "tab:gray"),
         "KL to the start on the replayed text": ("D", "tab:purple"), "kept": ("*", "tab:red")}
fig, axes = plt.subplots(1, 2, figsize=(13, 5.2))
panels = [(axes[0], sft, "sentiment_acc (held-out, 300)", (349, 396),
           "SFT from one pretrained model (seed 42, 300 steps)", None),
          (axes[1], dist, "think_format (held-out, 500)", (408, 462),
           "Distillation from one DPO model (seed 42, 130 steps)", 0.95)]
for (ax, pts, ylab, band, title, goal), where in zip(panels, ("lower right", "upper left")):
    ax.axvspan(*band, color="0.9", label="the previous stage's 95% interval")
    if goal:
        ax.axhline(goal, color="0.5", ls="--", lw=1, label="goal 0.95")
    seen = set()
    for label, x, y, g in pts:
        m, c = style[g]
        ax.scatter(x, y, marker=m, color=c, s=120 if m == "*" else 40, label=None if g in seen else g, zorder=3)
        seen.add(g)
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel("news perplexity (held-out, 300 documents; lower is less forgetting)")
    ax.set_ylabel(ylab)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc=where)
    ax.grid(alpha=0.3)
fig.tight_layout()
fig.savefig(Path(__file__).with_suffix(".png"), dpi=110)
