"""Metrics sink of the training loop (rank 0): metrics.jsonl + TensorBoard events + a PNG of the curves.

Files are written into a local directory; when the run's output directory is remote (s3://) they are uploaded at
every checkpoint and at the end. A restored run appends to the same metrics.jsonl; lines carry ``attempt`` and a
reader keeps the last line per step (``load_metrics``).
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "training_curves.png"
TB_DIR = "tensorboard"


def load_metrics(path: str | Path) -> list[dict]:
    """Metric lines of a run, one per step (the last line wins for steps that a restored run redid)."""
    by_step: dict[tuple, dict] = {}
    for line in Path(path).read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            by_step[(rec.get("kind", "train"), rec["step"])] = rec
    return [by_step[k] for k in sorted(by_step, key=lambda k: (k[1], k[0]))]


class MetricsSink:
    """Append-only metrics for rank 0; other ranks get a disabled sink (every method is a no-op)."""

    def __init__(self, output_uri: str, enabled: bool, attempt: int = 0):
        from infra.storage import is_remote

        self.enabled, self.output_uri, self.attempt = enabled, output_uri, attempt
        self.remote = is_remote(output_uri)
        self._tb = None
        if not enabled:
            return
        if self.remote:
            self.local = Path(tempfile.mkdtemp(prefix="softmask-metrics-"))
            self._pull_existing()
        else:
            self.local = Path(output_uri.removeprefix("file://"))
        self.local.mkdir(parents=True, exist_ok=True)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.local / TB_DIR))
        except ImportError:  # tensorboard is a declared dependency; keep training if it is absent
            self._tb = None

    @property
    def metrics_path(self) -> Path:
        return self.local / METRICS_FILE

    def _pull_existing(self) -> None:
        from infra.storage import filesystem

        fs, path = filesystem(f"{self.output_uri.rstrip('/')}/{METRICS_FILE}")
        if fs.exists(path):
            fs.get_file(path, str(self.local / METRICS_FILE))

    def log(self, step: int, values: dict, kind: str = "train") -> None:
        if not self.enabled:
            return
        rec = {"step": step, "kind": kind, "attempt": self.attempt}
        rec.update({k: (float(v) if isinstance(v, (int, float)) else v) for k, v in values.items()})
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(rec) + "\n")
            f.flush()
            os.fsync(f.fileno())
        if self._tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self._tb.add_scalar(f"{kind}/{k}", v, step)

    def sync(self) -> None:
        """Flush TensorBoard and, for a remote output directory, upload the files."""
        if not self.enabled:
            return
        if self._tb is not None:
            self._tb.flush()
        if self.remote:
            from workers.checkpointing import upload_dir

            upload_dir(self.local, self.output_uri)

    def plot(self) -> Path | None:
        """Write the loss / validation-PPL curves PNG next to the export; returns its local path."""
        if not self.enabled or not self.metrics_path.exists():
            return None
        return plot_curves(self.metrics_path, self.local / PLOT_FILE)

    def close(self) -> None:
        if self.enabled and self._tb is not None:
            self._tb.close()
            self._tb = None


def plot_curves(metrics_path: str | Path, png_path: str | Path) -> Path:
    """Training loss, validation PPL (single / two-pass) and the SM gate (ω_s, gate-open share, mean λ) against the
    step, as a PNG (atomic write)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = load_metrics(metrics_path)
    train = [r for r in recs if r["kind"] == "train" and "loss" in r]
    val = [r for r in recs if r["kind"] == "val"]
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(15, 4))
    ax1.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss")
    ax1.set_xlabel("step"), ax1.set_ylabel("loss (per-token ELBO)"), ax1.legend()
    for key, label in (("val_ppl", "val PPL (single pass)"), ("val_ppl_two_pass", "val PPL (two pass)")):
        pts = [(r["step"], r[key]) for r in val if key in r and math.isfinite(r[key])]
        if pts:
            ax2.plot(*zip(*pts), marker="o", label=label)
    ax2.set_xlabel("step"), ax2.set_ylabel("perplexity bound"), ax2.set_yscale("log")
    if ax2.lines:
        ax2.legend()
    for key, label in (("omega_s", "ω_s"), ("gate_open", "gate-open share"), ("lambda_mean", "mean λ")):
        pts = [(r["step"], r[key]) for r in train if key in r and math.isfinite(r[key])]
        if pts:
            ax3.plot(*zip(*pts), label=label)
    ax3.set_xlabel("step"), ax3.set_ylabel("SM gate"), ax3.set_yscale("log")
    if ax3.lines:
        ax3.legend()
    fig.tight_layout()
    png_path = Path(png_path)
    tmp = png_path.with_name(f".{png_path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, png_path)
    return png_path
