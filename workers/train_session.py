"""Where the training loop runs: inside a Ray Train worker group, or alone in the calling process.

``workers.train_loop.train_loop(config, session)`` asks its session for its rank and world size, the checkpoint to
resume from, the Ray Data shard, and where a finished checkpoint goes; everything else is the same loop.

- :class:`RaySession` (the default): a Ray Train worker; checkpoints are reported to Ray Train, which keeps and
  restores them under ``<storage_path>/<run_name>``.
- :class:`LocalSession`: one process and no Ray Train (the experiment's cells, tests): a single-rank gloo process
  group on 127.0.0.1 for DeepSpeed, checkpoints moved into the same ``<storage_path>/<run_name>/checkpoint_<step>``
  layout (local paths only), the newest complete one restored by a rerun of the same run.
"""
from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path


class RaySession:
    """The Ray Train worker this loop runs in."""

    def __init__(self):
        import ray.train

        self._train = ray.train
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()

    def checkpoint(self):
        """The checkpoint to resume from (an object with ``as_directory()``), or None."""
        return self._train.get_checkpoint()

    def dataset_shard(self, name: str):
        return self._train.get_dataset_shard(name)

    def report(self, metrics: dict, directory: str, name: str) -> None:
        """Hand this rank's checkpoint files in ``directory`` to Ray Train as ``name`` (collective)."""
        self._train.report(metrics, checkpoint=self._train.Checkpoint.from_directory(directory),
                           checkpoint_dir_name=name)


class LocalCheckpoint:
    """A checkpoint folder on the local disk (the ``as_directory`` interface of a Ray Train checkpoint)."""

    def __init__(self, path: str):
        self.path = path

    @contextlib.contextmanager
    def as_directory(self):
        yield self.path


class LocalSession:
    """A single-rank run in this process. Use as a context manager: it creates the gloo process group DeepSpeed
    needs unless one exists. The group then lives as long as the process: DeepSpeed's communication layer keeps a
    handle on it, so a later local run in the same process reuses it (a destroyed group would leave DeepSpeed a dead
    handle: "Group ... is not registered")."""

    rank, world = 0, 1

    def __init__(self, storage_path: str, run_name: str, keep_last: int):
        if "://" in storage_path and not storage_path.startswith("file://"):
            raise ValueError(f"checkpoint.storage_path: a local training run needs a local path, got {storage_path}")
        self.run_dir = Path(storage_path.removeprefix("file://")).resolve() / run_name
        self.keep_last = keep_last

    def __enter__(self) -> "LocalSession":
        import torch.distributed as dist

        from infra.net import LOOPBACK, free_port

        if not dist.is_initialized():
            port = free_port()
            # what a launcher would export (DeepSpeed reads them); set only where absent
            os.environ.update({k: v for k, v in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1",
                                                 "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": LOOPBACK,
                                                 "MASTER_PORT": str(port)}.items() if k not in os.environ})
            dist.init_process_group("gloo", init_method=f"tcp://{LOOPBACK}:{port}", rank=0, world_size=1)
        elif dist.get_world_size() != 1:
            raise RuntimeError(f"a local run needs a single-rank process group; this process has world size "
                               f"{dist.get_world_size()}")
        return self

    def __exit__(self, *exc) -> None:
        return None

    def checkpoint(self) -> LocalCheckpoint | None:
        from workers.checkpointing import list_checkpoints

        found = list_checkpoints(str(self.run_dir))
        return LocalCheckpoint(found[-1][1]) if found else None

    def dataset_shard(self, name: str):
        raise ValueError("data.loader: ray_data needs Ray Train; a local run reads with the local loader")

    def report(self, metrics: dict, directory: str, name: str) -> None:
        """Move the checkpoint in ``directory`` to ``<run>/<name>`` (rename of a complete copy), keep the newest
        ``keep_last``."""
        from workers.checkpointing import list_checkpoints

        self.run_dir.mkdir(parents=True, exist_ok=True)
        final = self.run_dir / name
        tmp = self.run_dir / f".{name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(directory, tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for _, uri in list_checkpoints(str(self.run_dir))[:-self.keep_last]:
            shutil.rmtree(uri, ignore_errors=True)
