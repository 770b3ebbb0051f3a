"""Training data inside a Ray Train worker: a deterministic per-rank reader and the Ray Data adapter.

Both yield ``(x0 (B, L) long, loss_mask (B, L) long | None)`` micro-batches. The cursor is the number of
micro-batches this rank has consumed (the same on every rank), stored in the checkpoint.
- ``LocalShardReader``: reads the manifest's Parquet shards (local or s3://) into memory, shuffles rows with a
  permutation derived from (seed, epoch), and gives global micro-batch g to rank r as rows
  ``perm[(g*world + r)*B : ...]``. Exact resume: the cursor alone fixes the next batch.
- ``RayDataBatches``: wraps ``ray.train.get_dataset_shard("train")`` (streaming split); resume skips ``cursor``
  batches of the epoch, which is exact only as far as Ray Data's split order is (documented, not guaranteed).
"""
from __future__ import annotations

import hashlib
from typing import Iterator

import numpy as np

Batch = tuple["object", "object"]  # (torch.LongTensor (B, L), torch.LongTensor (B, L) | None)


def _seed(*parts) -> int:
    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:8], "little") >> 1


def read_rows(uris: list[str], with_mask: bool, max_rows: int | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """All rows of the given Parquet shards: input_ids (N, L) int64 and loss_mask (N, L) int64 (or None)."""
    import pyarrow.parquet as pq

    from infra.storage import filesystem

    ids, masks, n = [], [], 0
    for uri in uris:
        fs, path = filesystem(uri)
        cols = ["input_ids", "loss_mask"] if with_mask else ["input_ids"]
        with fs.open(path, "rb") as f:
            table = pq.read_table(f, columns=cols)
        ids.append(_to_matrix(table.column("input_ids")))
        if with_mask:
            masks.append(_to_matrix(table.column("loss_mask")))
        n += table.num_rows
        if max_rows is not None and n >= max_rows:
            break
    x = np.concatenate(ids)[:max_rows]
    m = np.concatenate(masks)[:max_rows] if with_mask else None
    return x, m


def _to_matrix(column) -> np.ndarray:
    """list<int> column of equal-length rows -> (N, L) int64."""
    import pyarrow as pa

    chunked = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    n = len(chunked)
    flat = chunked.flatten().to_numpy(zero_copy_only=False).astype(np.int64)
    if n == 0:
        return flat.reshape(0, 0)
    if flat.size % n:
        raise ValueError(f"rows of unequal length in a shard ({flat.size} values over {n} rows)")
    return flat.reshape(n, flat.size // n)


class LocalShardReader:
    """Deterministic, resumable reader of the training split for one rank."""

    def __init__(self, uris: list[str], *, micro_batch: int, rank: int, world: int, seed: int, shuffle: bool,
                 with_mask: bool):
        self.x, self.mask = read_rows(uris, with_mask)
        self.micro_batch, self.rank, self.world = micro_batch, rank, world
        self.seed, self.shuffle = seed, shuffle
        self.per_epoch = len(self.x) // (micro_batch * world)  # global micro-batches per epoch (drop last)
        if self.per_epoch == 0:
            raise ValueError(f"train split has {len(self.x)} rows, fewer than one global micro-batch "
                             f"({micro_batch} x {world} workers)")
        self._perm_epoch, self._perm = -1, None

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            n = len(self.x)
            self._perm = (np.random.default_rng(_seed(self.seed, epoch, "data")).permutation(n) if self.shuffle
                          else np.arange(n))
            self._perm_epoch = epoch
        return self._perm

    def batch(self, cursor: int) -> Batch:
        """Micro-batch number ``cursor`` (counted from the start of training) of this rank."""
        import torch

        epoch, g = divmod(cursor, self.per_epoch)
        start = (g * self.world + self.rank) * self.micro_batch
        rows = self._permutation(epoch)[start:start + self.micro_batch]
        x = torch.from_numpy(self.x[rows])
        m = torch.from_numpy(self.mask[rows]) if self.mask is not None else None
        return x, m


class RayDataBatches:
    """Micro-batches from a Ray Train dataset shard, epoch after epoch; ``batch(cursor)`` must be called in order."""

    def __init__(self, shard, *, micro_batch: int, with_mask: bool, start_cursor: int = 0):
        self.shard, self.micro_batch, self.with_mask = shard, micro_batch, with_mask
        self._it: Iterator | None = None
        self._next = 0
        self._skip_to = start_cursor

    def _epoch(self) -> Iterator:
        cols = ["input_ids", "loss_mask"] if self.with_mask else ["input_ids"]
        for b in self.shard.iter_batches(batch_size=self.micro_batch, batch_format="numpy", drop_last=True):
            yield tuple(np.stack(b[c]).astype(np.int64) for c in cols)

    def batch(self, cursor: int) -> Batch:
        import torch

        if cursor != self._next and cursor != self._skip_to:
            raise ValueError(f"RayDataBatches reads in order: expected cursor {self._next}, got {cursor}")
        while True:
            if self._it is None:
                self._it, self._in_epoch = self._epoch(), 0
            try:
                arrays = next(self._it)
            except StopIteration:
                self._it = None
                if self._in_epoch == 0:
                    raise ValueError("the train dataset shard has less than one micro-batch") from None
                continue
            self._in_epoch += 1
            self._next += 1
            if self._next > cursor:  # skipped the batches a restored run had already consumed
                break
        x = torch.from_numpy(arrays[0])
        m = torch.from_numpy(arrays[1]) if self.with_mask else None
        return x, m


def validation_batches(uris: list[str], *, micro_batch: int, rank: int, world: int, n_batches: int,
                       with_mask: bool) -> list[Batch]:
    """The same fixed validation micro-batches at every evaluation; every rank gets the same count."""
    import torch

    if not uris or n_batches <= 0:
        return []
    x, m = read_rows(uris, with_mask, max_rows=n_batches * micro_batch * world)
    per_rank = len(x) // (micro_batch * world)
    out = []
    for i in range(min(n_batches, per_rank)):
        start = (i * world + rank) * micro_batch
        out.append((torch.from_numpy(x[start:start + micro_batch]),
                    torch.from_numpy(m[start:start + micro_batch]) if m is not None else None))
    return out
