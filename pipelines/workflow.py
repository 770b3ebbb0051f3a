"""One reproducible workflow: preprocess -> train -> evaluate -> deploy. Prefect orchestrates, Ray computes.

Every stage output lives at a content-addressed location ``<run_root>/<stage>/<key>``; the key hashes the stage's
resolved config, its upstream key/fingerprint and the code version of the packages it runs. A stage whose
``_stage.json`` exists with that key is skipped (its body does not run); Prefect's cache key is the same key, so the
Prefect UI shows those tasks as Cached. ``force`` reruns a stage and everything after it. A failed run resumes from
the failed stage (training itself resumes from its latest checkpoint: same run name + storage path).
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
import urllib.request
import uuid
from dataclasses import dataclass, replace
from typing import Any, Callable

from infra import storage
from infra.config import ConfigError, field, require, to_dict
from pipelines import lineage
from pipelines.evaluate import EvalConfig
from pipelines.preprocess import PreprocessConfig
from pipelines.serve import ServeStageConfig
from pipelines.tokenizer_train import TokenizerTrainConfig
from workers.train_config import TrainConfig

STAGES = ("preprocess", "train", "evaluate", "deploy")
STAGE_CODE = {"preprocess": ("models", "workers", "infra"), "train": ("models", "workers", "infra"),
              "evaluate": ("models", "workers", "infra", "pipelines")}


@dataclass
class DeployConfig:
    """The deploy step and the request that proves it works."""

    prompt: str = field("ROMEO:", "prompt of the request sent to the deployed sampler")
    max_tokens: int = field(48, "completion tokens of that request")
    steps: int = field(48, "denoising steps of that request")
    seed: int = field(0, "sampling seed of that request")
    cluster_cpus: int = field(0, "CPUs of the local Ray cluster `softmask run` starts (0 = the machine's cores)")
    address: str | None = field(None, "Ray cluster to run on and deploy to (None: RAY_ADDRESS, else a local cluster "
                                      "that `softmask run` starts and stops)")

    def __post_init__(self):
        require(self.max_tokens >= 1 and self.steps >= 1, "max_tokens", "max_tokens and steps must be >= 1")


@dataclass
class WorkflowConfig:
    """The whole workflow (each section is the stage's own config; paths between stages are filled in)."""

    name: str = field("softmask", "workflow name (Prefect flow-run name prefix)")
    run_root: str = field("artifacts", "root of every artifact: local dir or s3://bucket/prefix")
    stages: list[str] = field(None, f"stages to run, in order, a prefix of {list(STAGES)}", factory=lambda: list(STAGES))
    use_prefect: bool = field(True, "run the stages as Prefect tasks (False: plain calls with the same skipping)")
    tokenizer: TokenizerTrainConfig | None = field(None, "train a byte-level BPE first (part of the preprocess stage) "
                                                         "and use it as preprocess.tokenizer; None = use "
                                                         "preprocess.tokenizer as given")
    preprocess: PreprocessConfig = field(None, "preprocessing stage", factory=PreprocessConfig)
    train: TrainConfig = field(None, "training stage", factory=TrainConfig)
    evaluate: EvalConfig = field(None, "evaluation stage", factory=EvalConfig)
    serve: ServeStageConfig = field(None, "the serving application of the deploy stage", factory=ServeStageConfig)
    deploy: DeployConfig = field(None, "deploy step", factory=DeployConfig)

    # Links between stages: the workflow fills these in from the upstream stage's content-addressed output.
    derived_fields = {"preprocess.output": "<workflow>", "train.data.manifest": "<workflow>",
                      "evaluate.checkpoint": "<workflow>", "evaluate.manifest": "<workflow>",
                      "serve.checkpoint": "<workflow>"}

    def __post_init__(self):
        require(list(self.stages) == list(STAGES[:len(self.stages)]) and self.stages, "stages",
                f"must be a non-empty prefix of {list(STAGES)}, got {self.stages}")


@dataclass
class WorkflowResult:
    """What a workflow call did: one record per stage (``executed``: its body ran in this call, False = skipped as
    complete or replayed from Prefect's cache), the lineage written, and the deployment when there was one."""

    run_id: str
    lineage_uri: str
    records: dict[str, dict]
    reply: dict | None = None      # the deploy stage's answer to its request
    serve: Any = None              # pipelines.serve.ServeResult of the deploy stage (the running application)

    @property
    def executed(self) -> dict[str, bool]:
        return {s: r.get("executed", False) for s, r in self.records.items()}


def say(line: str) -> None:
    """One progress line on the console. Written to stdout directly: inside a Prefect flow ``print`` becomes a run log
    record, which the console does not show."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


# ------------------------------------------------------------------------------------------------ stage bodies
def _without(cfg: Any, *paths: str) -> dict:
    """Config dict with path-like fields blanked (they are derived from keys, so they must not feed the keys)."""
    d = to_dict(cfg)
    for p in paths:
        node = d
        *parents, last = p.split(".")
        for part in parents:
            node = node[part]
        node[last] = None
    return d


def _run_stage(stage: str, key: str, out_dir: str, body: Callable[[], dict], force: bool, call_id: str = "") -> dict:
    """Skip when ``out_dir`` holds a completion record for ``key``; else run ``body`` and record it. A record whose
    body ran here carries ``call_id`` (the caller's id of this call: a record Prefect replays from its cache carries
    the id of the call that made it, so the caller can tell the two apart)."""
    rec = lineage.stage_record(out_dir)
    if rec and rec.get("key") == key and not force:
        return {**rec, "executed": False}
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    outputs = body()
    rec = lineage.complete(out_dir, {"stage": stage, "key": key, "dir": out_dir, "started_at": started, **outputs})
    return {**rec, "executed": True, "call_id": call_id}


def plan_tokenizer(cfg: WorkflowConfig) -> TokenizerTrainConfig | None:
    if cfg.tokenizer is None:
        return None
    key = lineage.digest("tokenizer", _without(cfg.tokenizer, "output"), lineage.code_version("models"))
    return replace(cfg.tokenizer, output=storage.join(cfg.run_root, "tokenizers", key))


def plan_preprocess(cfg: WorkflowConfig) -> tuple[str, PreprocessConfig]:
    from pipelines.preprocess import code_version, output_config

    tok = plan_tokenizer(cfg)
    pre = replace(cfg.preprocess, tokenizer=tok.output) if tok else cfg.preprocess
    ocfg = output_config(pre)  # the byte-determining settings (no output path, no worker counts)
    if tok:
        ocfg["tokenizer"] = None  # identified by the tokenizer-training config instead of its derived path
    key = lineage.digest("preprocess", ocfg, _without(tok, "output") if tok else None, code_version())
    return key, replace(pre, output=storage.join(cfg.run_root, "datasets", key))


def run_preprocess(cfg: WorkflowConfig, force: bool = False, call_id: str = "") -> dict:
    from pipelines import preprocess, tokenizer_train

    key, pcfg = plan_preprocess(cfg)
    tok = plan_tokenizer(cfg)

    def body() -> dict:
        if tok is not None and (force or not storage.exists(storage.join(tok.output, "tokenizer.json"))):
            tokenizer_train.run(tok)
        m = preprocess.run(pcfg)
        return {"manifest": pcfg.output, "fingerprint": m.fingerprint, "config": to_dict(pcfg)}

    return _run_stage("preprocess", key, pcfg.output, body, force, call_id)


def plan_train(cfg: WorkflowConfig, data: dict) -> tuple[str, TrainConfig]:
    key = lineage.digest("train", _without(cfg.train, "data.manifest", "checkpoint.storage_path", "output_dir",
                                           "run_name"), data["fingerprint"], lineage.code_version(*STAGE_CODE["train"]))
    root = storage.join(cfg.run_root, "train", key)
    tcfg = replace(cfg.train, run_name="run", output_dir=storage.join(root, "output"),
                   data=replace(cfg.train.data, manifest=data["manifest"]),
                   checkpoint=replace(cfg.train.checkpoint, storage_path=root))
    return key, tcfg


def run_train(cfg: WorkflowConfig, data: dict, force: bool = False, call_id: str = "") -> dict:
    from pipelines import train

    key, tcfg = plan_train(cfg, data)

    def body() -> dict:
        res = train.run(tcfg)
        _ship_tokenizer(data["manifest"], res.export_uri)
        return {"export": res.export_uri, "output": res.output_uri, "checkpoint": res.checkpoint_uri,
                "metrics": res.metrics, "plot": res.plot_uri, "inputs": [data["key"]], "config": to_dict(tcfg)}

    return _run_stage("train", key, storage.join(cfg.run_root, "train", key), body, force, call_id)


def _ship_tokenizer(dataset: str, export: str) -> None:
    """Put the dataset's tokenizer files next to the export, so the export alone can be served or evaluated."""
    if storage.exists(storage.join(export, "tokenizer.json")):
        return
    files = storage.list_files(storage.join(dataset, "tokenizer"))
    for path in sorted(files, key=lambda p: p.endswith("/tokenizer.json")):  # the file checked above goes last
        storage.write_atomic(storage.join(export, path.rsplit("/", 1)[-1]), storage.read_bytes(path))


def evaluate_key(cfg: WorkflowConfig, data: dict, model: dict) -> str:
    return lineage.digest("evaluate", _without(cfg.evaluate, "checkpoint", "manifest", "output_dir"), model["key"],
                          data["key"], lineage.code_version(*STAGE_CODE["evaluate"]))


def run_evaluate(cfg: WorkflowConfig, data: dict, model: dict, force: bool = False, call_id: str = "") -> dict:
    from pipelines import evaluate

    key = evaluate_key(cfg, data, model)
    out = storage.join(cfg.run_root, "eval", key)
    ecfg = replace(cfg.evaluate, checkpoint=model["export"], manifest=data["manifest"], output_dir=out)

    def body() -> dict:
        report = evaluate.run(ecfg)
        summary = report.to_dict() if hasattr(report, "to_dict") else dataclasses.asdict(report)
        return {"report": storage.join(out, "eval.json"), "summary": _small(summary),
                "inputs": [model["key"], data["key"]]}

    return _run_stage("evaluate", key, out, body, force, call_id)


def _small(d: Any, depth: int = 0) -> Any:
    """Keep the record readable: drop long lists (samples) from the summary copied into lineage."""
    if isinstance(d, dict):
        return {k: _small(v, depth + 1) for k, v in d.items() if not (isinstance(v, list) and len(v) > 8)}
    return d


def run_deploy(cfg: WorkflowConfig, model: dict):
    """Deploy the export with Ray Serve on the current Ray (a cluster when RAY_ADDRESS/`address` is set) and send one
    real request; returns (its record, the ServeResult of the running application). Never cached: a deployment is a
    side effect."""
    from pipelines import serve as serve_stage

    scfg = replace(cfg.serve, checkpoint=model["export"],
                   address=cfg.deploy.address or os.environ.get("RAY_ADDRESS") or cfg.serve.address)
    try:
        res = serve_stage.run(scfg)  # its preflight: checkpoint, tokenizer against the model, port
    except ConfigError as e:
        raise ConfigError(f"serve.{e}") from None
    body = {"model": res.model, "prompt": cfg.deploy.prompt, "max_tokens": cfg.deploy.max_tokens,
            "steps": cfg.deploy.steps, "seed": cfg.deploy.seed}
    headers = serve_stage.request_headers(scfg)  # with the API key when one is configured
    req = urllib.request.Request(res.completions_url, data=json.dumps(body).encode(), headers=headers)
    with urllib.request.urlopen(req, timeout=300) as r:
        reply = json.loads(r.read())
    models = urllib.request.Request(f"{res.url}/v1/models", headers=headers)
    with urllib.request.urlopen(models, timeout=60) as r:  # what is served, its SM head included
        card = json.loads(r.read())["data"][0]
    return {"stage": "deploy", "url": res.url, "model": res.model, "model_card": card, "request": body, "reply": reply,
            "curl": res.example_curl(), "checkpoint": model["export"], "executed": True}, res


# ------------------------------------------------------------------------------------------------ orchestration
def preflight(cfg: WorkflowConfig, sources: bool = True) -> None:
    """The input checks that need no upstream output, before anything starts: an input that would fail a later stage
    (a missing init_checkpoint) must not wait for preprocessing to finish first. Raises ConfigError naming the field.
    ``sources``: also check that every preprocess source matches files (off for scheduled runs, whose data may
    arrive later)."""
    from pipelines.serve import check_access
    from workers import checkpointing

    if "deploy" in cfg.stages:  # a public bind without a key must not wait for training to fail
        try:
            check_access(cfg.serve)
        except ConfigError as e:
            raise ConfigError(f"serve.{e}") from None
    if sources:
        from pipelines.preprocess_plan import expand_source
        from pipelines.tokenizer_train import resolve_files

        if cfg.tokenizer is not None:
            try:
                resolve_files(cfg.tokenizer.sources)
            except ConfigError as e:
                raise ConfigError(f"tokenizer.{e}") from None
        so = cfg.preprocess.storage_options()
        for i, src in enumerate(cfg.preprocess.sources):
            try:
                expand_source(src, i, so)
            except FileNotFoundError as e:
                raise ConfigError(f"preprocess.{e}") from None
    if "train" in cfg.stages and cfg.train.init_checkpoint:
        try:
            checkpointing.read_export(cfg.train.init_checkpoint)
        except ConfigError as e:
            raise ConfigError(f"train.{e}; point it at an existing export, e.g. the checkpoint `softmask run` "
                              f"prints") from None


def forced_stages(force: list[str] | None) -> set[str]:
    """The stages ``force`` reruns: the first one named and every stage after it. ConfigError naming an unknown one
    (the CLI calls this before it starts a server or a cluster)."""
    force = list(force or [])
    bad = [f for f in force if f not in STAGES]
    if bad:
        raise ConfigError(f"force: unknown stage(s) {bad}; stages are {list(STAGES)}")
    first_forced = min((STAGES.index(f) for f in force), default=len(STAGES))
    return {s for i, s in enumerate(STAGES) if i >= first_forced}


def run_workflow(cfg: WorkflowConfig, force: list[str] | None = None, *,
                 check_inputs: bool = True) -> WorkflowResult:
    """Run the configured stages in order (each skipped when complete); returns the records and the lineage.
    ``check_inputs=False``: the caller has already run :func:`preflight` on this config."""
    forced = forced_stages(force)
    if "://" not in cfg.run_root:  # Ray workers run in other directories: local paths must be absolute
        cfg = replace(cfg, run_root=os.path.abspath(cfg.run_root))
    if check_inputs:
        preflight(cfg)
    if cfg.use_prefect:
        from pipelines.orchestration import run_with_prefect

        return run_with_prefect(cfg.name, lambda task: execute(cfg, forced, task))
    return execute(cfg, forced, lambda stage, fn, key_fn, refresh: fn)


def execute(cfg: WorkflowConfig, forced: set[str], wrap) -> WorkflowResult:
    """The stage chain; ``wrap(stage, fn, key_fn, refresh)`` turns a stage function into a (Prefect) task."""
    records: dict[str, dict] = {}

    def call(stage, fn, key_fn, *args):
        marker_ok = _marker_matches(cfg.run_root, stage, key_fn())
        call_id = uuid.uuid4().hex
        t0 = time.monotonic()
        if stage in forced or not marker_ok:
            say(f"[{stage}] started")
        rec = dict(wrap(stage, fn, key_fn, stage in forced or not marker_ok)(*args, force=stage in forced,
                                                                             call_id=call_id))
        rec["executed"] = rec.pop("call_id", None) == call_id  # a Prefect cache hit replays an earlier call's record
        say(f"[{stage}] " + (f"done in {time.monotonic() - t0:.0f} s" if rec["executed"] else "skipped: complete")
            + f" -> {rec.get('dir')}")
        return rec

    pre_key = lambda: plan_preprocess(cfg)[0]  # noqa: E731
    records["preprocess"] = call("preprocess", _task_preprocess, pre_key, cfg)
    data = records["preprocess"]
    if "train" in cfg.stages:
        records["train"] = call("train", _task_train, lambda: plan_train(cfg, data)[0], cfg, data)
    if "evaluate" in cfg.stages:
        records["evaluate"] = call("evaluate", _task_evaluate, lambda: evaluate_key(cfg, data, records["train"]), cfg,
                                   data, records["train"])
    run_id = lineage.digest(to_dict(cfg), data["fingerprint"], lineage.code_version("models", "workers", "pipelines",
                                                                                      "infra"))
    result = WorkflowResult(run_id=run_id, lineage_uri="", records=records)
    if "deploy" in cfg.stages:
        t0 = time.monotonic()
        say("[deploy] started: Ray Serve, then one request")
        records["deploy"], result.serve = run_deploy(cfg, records["train"])
        say(f"[deploy] done in {time.monotonic() - t0:.0f} s -> {records['deploy']['url']}")
        result.reply = records["deploy"]["reply"]
    result.lineage_uri = lineage.write_lineage(cfg.run_root, run_id, {"run_id": run_id, "config": to_dict(cfg),
                                                                      "stages": list(records.values())})
    return result


_MARKER_DIRS = {"preprocess": "datasets", "train": "train", "evaluate": "eval"}


def _marker_matches(run_root: str, stage: str, key: str) -> bool:
    """True when the stage's output is complete on storage (Prefect's cache is only trusted then)."""
    rec = lineage.stage_record(storage.join(run_root, _MARKER_DIRS[stage], key))
    return bool(rec and rec.get("key") == key)


def _task_preprocess(cfg: WorkflowConfig, force: bool = False, call_id: str = "") -> dict:
    return run_preprocess(cfg, force, call_id)


def _task_train(cfg: WorkflowConfig, data: dict, force: bool = False, call_id: str = "") -> dict:
    return run_train(cfg, data, force, call_id)


def _task_evaluate(cfg: WorkflowConfig, data: dict, model: dict, force: bool = False, call_id: str = "") -> dict:
    return run_evaluate(cfg, data, model, force, call_id)
