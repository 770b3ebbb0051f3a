"""Training progress on the driver's console: one line per metrics line that rank 0 writes while ``fit()`` runs.

The workers' own output does not reach the driver of an in-process Ray (``log_to_driver=False``), so the driver
follows the run's ``metrics.jsonl`` instead (the file the training loop appends to at every ``log_every`` step and
validation): a local file is polled every second from where it ended when the run started (a resumed run prints
only its new lines); an S3 one is uploaded at checkpoints, so it is polled every ``remote_interval_s`` and printed
when it grew.
"""
from __future__ import annotations

import json
import sys
import threading


# optional fields of a train line, in order: (metrics key, format)
TRAIN_FIELDS = (("lr", "lr {:.2e}"), ("grad_norm", "grad_norm {:.3f}"), ("tokens_per_s", "{:,.0f} tok/s"),
                ("omega_s", "ω_s {:.3g}"), ("lambda_mean", "λ {:.3g}"), ("gate_open", "gate-open {:.3f}"))


def format_record(rec: dict, total_steps: int) -> str | None:
    """The console line of one metrics record (None for records that are not worth a line)."""
    kind, step = rec.get("kind", "train"), int(rec.get("step", 0))
    at = f"step {step:>{len(str(total_steps))}}/{total_steps}"
    if kind == "train":
        parts = [f"train {at}", f"loss {rec['loss']:.4f}"] + [fmt.format(rec[k]) for k, fmt in TRAIN_FIELDS if k in rec]
        return "  ".join(parts)
    if kind == "val":
        parts = [f"val   {at}"] + [f"{k} {v:.2f}" for k, v in rec.items() if k.startswith("val_")]
        return "  ".join(parts)
    if kind == "setup":
        how = "started" if not rec.get("attempt") else f"restored (attempt {int(rec['attempt'])})"
        return (f"train {how} at step {step}: {int(rec.get('world', 1))} workers, set up in "
                f"{rec.get('setup_s', 0.0):.1f} s")
    return None


class ProgressPrinter:
    """Context manager: prints the new lines of ``metrics_uri`` (formatted) while the block runs, and once more at
    its end. Reading never raises: a missing or half-written file is tried again at the next poll."""

    def __init__(self, metrics_uri: str, total_steps: int, *, out=None, interval_s: float = 1.0,
                 remote_interval_s: float = 30.0):
        from infra.storage import filesystem, is_remote

        self.total_steps, self._out = total_steps, out
        self.fs, self.path = filesystem(metrics_uri)
        self.remote = is_remote(metrics_uri)
        self.interval_s = remote_interval_s if self.remote else interval_s
        self.offset = self._size()
        self.printed = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="softmask-train-progress", daemon=True)
        self._lock = threading.Lock()

    def _size(self) -> int:
        try:
            if self.remote:  # another process rewrites the object: never answer from a listing cache
                self.fs.invalidate_cache(self.path)
            return int(self.fs.size(self.path))
        except Exception:  # not there yet, or any filesystem error (S3 included): try again at the next poll
            return 0

    def poll(self) -> int:
        """Print the complete lines added since the last poll; returns how many were printed."""
        with self._lock:
            size = self._size()
            if size <= self.offset:
                return 0
            try:
                with self.fs.open(self.path, "rb") as f:
                    f.seek(self.offset)
                    data = f.read(size - self.offset)
            except Exception:
                return 0
            end = data.rfind(b"\n")
            if end < 0:  # only a partial line so far
                return 0
            self.offset += end + 1
            n = 0
            for raw in data[:end].splitlines():
                try:
                    line = format_record(json.loads(raw), self.total_steps)
                except (ValueError, KeyError, TypeError):
                    continue
                if line:
                    print(line, file=self._out or sys.stdout, flush=True)
                    n += 1
            self.printed += n
            return n

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.poll()

    def __enter__(self) -> "ProgressPrinter":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=max(5.0, self.interval_s))
        self.poll()
