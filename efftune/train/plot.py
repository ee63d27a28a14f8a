"""The loss / learning-rate plot of a run (PNG), drawn from the metrics rows."""
from __future__ import annotations

from pathlib import Path


def plot_metrics(rows: list[dict], path: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in rows if "loss" in r and not r.get("eval")]
    evals = [r for r in rows if r.get("eval")]
    fig, (ax_loss, ax_lr) = plt.subplots(2, 1, figsize=(7, 6), sharex=True, height_ratios=[3, 1])
    if train:
        steps = [r["step"] for r in train]
        ax_loss.plot(steps, [r["loss"] for r in train], lw=0.8, alpha=0.5, label="train loss")
        k = max(1, len(train) // 20)  # a running mean shows the trend through the noise
        smooth = [sum(r["loss"] for r in train[max(0, i - k + 1):i + 1]) / len(train[max(0, i - k + 1):i + 1])
                  for i in range(len(train))]
        ax_loss.plot(steps, smooth, lw=1.6, label=f"mean of {k}")
        ax_lr.plot(steps, [r["lr"] for r in train], color="tab:green")
    ax_loss.set_ylabel("loss (answer tokens)")
    ax_loss.legend(loc="upper right")
    if evals and any("accuracy" in r for r in evals):
        ax_acc = ax_loss.twinx()
        ax_acc.plot([r["step"] for r in evals], [r.get("accuracy") for r in evals], "o-", color="tab:red",
                    label="held-out accuracy")
        ax_acc.set_ylabel("accuracy")
        ax_acc.legend(loc="center right")
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("step")
    return _save(fig, path)


def plot_routing(load: list[list[float]], path: Path) -> Path:
    """Heat map of the tokens each expert took over a run: layers down, experts across."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [[v / max(sum(r), 1e-9) for v in r] for r in load]  # each layer's share per expert
    fig, ax = plt.subplots(figsize=(max(4, 0.5 * len(rows[0]) + 2), max(3, 0.35 * len(rows) + 1.5)))
    image = ax.imshow(rows, aspect="auto", cmap="viridis")
    ax.set_xticks(range(len(rows[0])))
    ax.set_yticks(range(len(rows)))
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE layer")
    ax.set_title("share of routed tokens")
    fig.colorbar(image, ax=ax)
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    """Write the figure beside `path`, then rename: a reader never sees half a PNG."""
    import matplotlib.pyplot as plt
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
    return path
