"""Checkpoint save / restore / export for the training loop, plus driver-side readers.

A training checkpoint (one directory per step, ``checkpoint_<step:08d>``, merged by Ray Train from every rank):
    ds/...                    DeepSpeed sharded engine state (model, optimizer, LR scheduler) - every rank's shard
    train_state.json          step, data cursor, resolved TrainConfig + RunPlan, model config (rank 0)
    ema.safetensors           EMA shadow of the backbone (rank 0; the EMA is replicated on every rank)
The consolidated export is the core's format (``models.save_pretrained``: config.json + model.safetensors).
NOTE: the ``ds/`` shards are DeepSpeed's own torch files (internal resume state only); everything we write is
JSON or safetensors, and exports never hold pickles.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from infra.storage import filesystem, is_remote, read_json

DS_TAG = "ds"
STATE_FILE = "train_state.json"
EMA_FILE = "ema.safetensors"
CKPT_PREFIX = "checkpoint_"


# ---------------------------------------------------------------------------------------------- storage io
def upload_dir(local: str | Path, uri: str) -> None:
    """Copy a local directory's files to ``uri`` (a no-op copy when it is the same local directory)."""
    local = Path(local)
    if not is_remote(uri):
        dest = Path(uri.removeprefix("file://"))
        if dest.resolve() == local.resolve():
            return
        dest.mkdir(parents=True, exist_ok=True)
        for f in local.rglob("*"):
            if f.is_file():
                target = dest / f.relative_to(local)
                target.parent.mkdir(parents=True, exist_ok=True)
                tmp = target.with_name(f".{target.name}.tmp")
                shutil.copyfile(f, tmp)
                os.replace(tmp, target)
        return
    fs, path = filesystem(uri)
    for f in local.rglob("*"):
        if f.is_file():
            fs.put_file(str(f), f"{path.rstrip('/')}/{f.relative_to(local).as_posix()}")


def download_dir(uri: str, local: str | Path) -> Path:
    """Local directory with the contents of ``uri`` (returned as is when already local)."""
    if not is_remote(uri):
        return Path(uri.removeprefix("file://"))
    fs, path = filesystem(uri)
    local = Path(local)
    fs.get(path.rstrip("/") + "/", str(local) + "/", recursive=True)
    return local


# ----------------------------------------------------------------------------------------- driver side
def read_export(uri: str) -> dict:
    """config.json of an export directory (reads JSON only, never weights): {"model", "metadata", ["backbone"]}."""
    from infra.config import ConfigError

    try:
        data = read_json(f"{uri.rstrip('/')}/config.json")
    except FileNotFoundError:
        raise ConfigError(f"init_checkpoint: no config.json in {uri} (not a softmask export)") from None
    if "model" not in data:
        raise ConfigError(f"init_checkpoint: {uri}/config.json has no 'model' section")
    return data


def load_export(uri: str):
    """The model of an export directory (local or s3://), any backbone."""
    from models import load_pretrained

    with tempfile.TemporaryDirectory(prefix="softmask-init-") as tmp:
        return load_pretrained(download_dir(uri, tmp))


def list_checkpoints(run_uri: str) -> list[tuple[int, str]]:
    """[(step, uri)] of complete training checkpoints of a run, oldest first."""
    fs, path = filesystem(run_uri)
    try:
        entries = fs.ls(path, detail=False)
    except FileNotFoundError:
        return []
    out = []
    for entry in entries:
        name = entry.rstrip("/").rsplit("/", 1)[-1]
        if not name.startswith(CKPT_PREFIX) or not name[len(CKPT_PREFIX):].isdigit():
            continue
        if fs.exists(f"{entry.rstrip('/')}/{STATE_FILE}"):
            uri = f"{run_uri.split('://')[0]}://{entry}" if is_remote(run_uri) else entry
            out.append((int(name[len(CKPT_PREFIX):]), uri))
    return sorted(out)


RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's own record of the checkpoints it registered


def registered_checkpoint(run_uri: str) -> str | None:
    """Directory name of the checkpoint Ray Train will restore for this run ("" when Ray registered none yet), or
    None when Ray's record is absent or unreadable. A folder can exist, even with its train_state.json, before Ray
    registers it (other ranks still uploading, or the run stopped in between); Ray then restores the previous one."""
    try:
        snap = read_json(f"{run_uri.rstrip('/')}/{RAY_SNAPSHOT}")
    except (FileNotFoundError, ValueError, OSError):
        return None
    if not isinstance(snap, dict) or "latest_checkpoint_result" not in snap:
        return None
    latest = snap["latest_checkpoint_result"] or {}
    return str(latest.get("checkpoint_dir_name") or "")


def latest_train_state(run_uri: str) -> dict | None:
    """train_state.json of the checkpoint a same-name run resumes from (the one Ray Train restores), or None for a
    fresh run. Without Ray's record: the newest complete checkpoint folder."""
    ckpts = list_checkpoints(run_uri)
    name = registered_checkpoint(run_uri)
    if name is not None:
        ckpts = [(s, u) for s, u in ckpts if u.rstrip("/").rsplit("/", 1)[-1] == name]
    return read_json(f"{ckpts[-1][1].rstrip('/')}/{STATE_FILE}") if ckpts else None


# ----------------------------------------------------------------------------------------- worker side
def save(engine, ema, state: dict, metrics: dict, rank: int, report) -> None:
    """Write this rank's part of the checkpoint for ``state['step']`` and hand it over with ``report(metrics,
    directory, name)`` (``workers.train_session``: to Ray Train, or into the local run folder; collective)."""
    from safetensors.torch import save_file

    step = int(state["step"])
    with tempfile.TemporaryDirectory(prefix="softmask-ckpt-") as d:
        engine.save_checkpoint(d, tag=DS_TAG, save_latest=True)
        if rank == 0:
            if ema is not None:
                save_file({k: v.contiguous() for k, v in ema.state_dict().items()}, os.path.join(d, EMA_FILE))
            Path(d, STATE_FILE).write_text(json.dumps(state, indent=2, sort_keys=True))
        report(metrics, d, f"{CKPT_PREFIX}{step:08d}")


def restore(engine, ema, checkpoint, device: str = "cpu") -> dict:
    """Load engine (+ EMA) state from a checkpoint (``as_directory()``: Ray Train's or a local folder); returns its
    train_state dict.

    A run that keeps an EMA (``ema`` given) needs the checkpoint's EMA: a missing ``ema.safetensors`` is an error (an
    incomplete checkpoint), never a silent restart of the average from the restored weights. Switching the EMA on
    for a run whose checkpoints have none is refused earlier, by ``workers.train_config.preflight``."""
    from safetensors.torch import load_file

    with checkpoint.as_directory() as d:
        state = json.loads(Path(d, STATE_FILE).read_text())
        if ema is not None and not Path(d, EMA_FILE).is_file():
            raise RuntimeError(f"checkpoint {d} has no {EMA_FILE}, but this run keeps an EMA (ema_decay > 0): the "
                               f"checkpoint is incomplete")
        # (DeepSpeed 0.19 fails on a missing tag folder with a bare AssertionError: say what is missing instead)
        path = None
        if Path(d, DS_TAG).is_dir():
            path, _ = engine.load_checkpoint(d, tag=DS_TAG, load_optimizer_states=True, load_lr_scheduler_states=True)
        if path is None:
            raise RuntimeError(f"DeepSpeed found no engine state under {d}/{DS_TAG}")
        if ema is not None:
            ema.load_state_dict(load_file(str(Path(d, EMA_FILE)), device=device))
    return state


def init_from_export(model, uri: str, keep_sm_head: bool, gather=None) -> dict:
    """Load an export's weights into a freshly built model (before DeepSpeed wraps it); returns its metadata.

    ``keep_sm_head=False`` leaves the SM head (and self-conditioning projection) at their fresh init, which is how a
    binary checkpoint starts an SM model (ω_s ≈ 0, so the model starts out as the binary one).
    """
    from models.optim import is_sm_param

    src = load_export(uri)
    sd = src.state_dict()
    if not keep_sm_head:
        sd = {k: v for k, v in sd.items() if not is_sm_param(k)}

    def load() -> None:
        own = model.state_dict()  # whole shapes: under ZeRO-3 this runs with the partitions gathered
        matched = {k: v for k, v in sd.items() if k in own and own[k].shape == v.shape}
        missing = [k for k in own if k not in matched and not is_sm_param(k) and not k.startswith("sc_proj.")]
        if missing:
            raise ValueError(f"init_checkpoint {uri} lacks backbone weights {missing[:5]}")
        model.load_state_dict(matched, strict=False)

    if gather is None:
        load()
    else:  # ZeRO-3 partitioned model: gathered whole while loading (rank 0's copy is broadcast on exit)
        with gather(list(model.parameters())):
            load()
    return dict(getattr(src, "checkpoint_metadata", {}) or {})


def export(engine, ema, model_config: dict, out_uri: str, metadata: dict, rank: int, use_ema: bool = True,
           prepare=None, backbone: str = "core") -> str:
    """Consolidated export (collective: gathers ZeRO-3 partitions); rank 0 writes ``out_uri``.

    ``prepare(model)`` gives a freshly built model the training-time structure (adapters) before the trained state
    is loaded; adapters are then merged into the base weights (core checkpoint layout).
    """
    from infra.deepspeed import full_state_dict, match_shapes
    from models import save_pretrained
    from models.registry import config_from_dict, get_spec

    from workers.train_adapters import core_state_dict

    full = full_state_dict(engine)  # every rank takes part in the gather
    if rank != 0:
        return out_uri
    spec = get_spec(backbone)
    model = (spec.build_for_load or spec.build)(config_from_dict(model_config, backbone))  # weights loaded below
    if prepare is not None:
        model = prepare(model)
    model.load_state_dict(match_shapes(full, model.state_dict()))
    if use_ema and ema is not None:
        model.load_state_dict(ema.model_state_dict(model))
    sd = core_state_dict(model)
    metadata = dict(metadata, weights="ema" if (use_ema and ema is not None) else "live")
    if is_remote(out_uri):
        with tempfile.TemporaryDirectory(prefix="softmask-export-") as tmp:
            save_pretrained(model, Path(tmp, "export"), state_dict=sd, metadata=metadata)
            upload_dir(Path(tmp, "export"), out_uri)
    else:
        save_pretrained(model, out_uri.removeprefix("file://"), state_dict=sd, metadata=metadata)
    return out_uri
