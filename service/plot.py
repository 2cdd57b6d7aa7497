"""A job's curves as a PNG: the terminal world's view of the dashboard."""

from __future__ import annotations


def plot_history(rows: list[dict], path: str, title: str = "") -> None:
    """Train and validation loss, validation accuracy and samples/s against step."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    def column(key):
        points = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
        return [p[0] for p in points], [p[1] for p in points]

    fig, (loss, acc, rate) = plt.subplots(1, 3, figsize=(13, 3.6))
    loss.plot(*column("loss"), label="train", color="#2563eb")
    loss.plot(*column("val_loss"), label="validation", color="#ea580c", marker=".")
    loss.set_title("loss")
    loss.legend()
    acc.plot(*column("val_accuracy"), color="#059669", marker=".")
    acc.set_title("validation accuracy")
    rate.plot(*column("samples_per_s"), color="#7c3aed")
    rate.set_title("samples/s")
    for ax in (loss, acc, rate):
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
