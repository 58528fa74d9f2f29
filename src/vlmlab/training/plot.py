"""Loss curves of a run (one line per stage) as a PNG, from its ``metrics.jsonl``."""

from __future__ import annotations

from pathlib import Path


def plot_losses(metrics_file: Path, out_png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and CI
    import matplotlib.pyplot as plt

    from vlmlab.io import read_jsonl

    rows = read_jsonl(metrics_file) if Path(metrics_file).exists() else []
    fig, ax = plt.subplots(figsize=(7, 4))
    stages: dict[str, tuple[list, list]] = {}
    for r in rows:
        xs, ys = stages.setdefault(r["stage"], ([], []))
        xs.append(r["global_step"])
        ys.append(r["loss"])
    for name, (xs, ys) in stages.items():
        ax.plot(xs, ys, label=name, linewidth=1)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    if stages:
        ax.legend()
    fig.tight_layout()
    tmp = Path(out_png).with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(out_png)
