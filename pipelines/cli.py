"""The `softmask` command, generated from the typed stage configs (no hand-kept argument lists).

Every stage command takes ``--config recipe.yaml`` plus overrides, with the precedence
dataclass defaults < YAML recipe < ``--key=value`` / ``--section.key=value``. Top-level config fields are also
plain options (``--checkpoint PATH``, ``--port 8000``, ``--detach``). ``softmask <command> --help`` lists every field
with its documentation.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
import sys
import typing
from dataclasses import dataclass
from typing import Any, Callable

from infra.config import ConfigError, apply_overrides, field_docs, from_dict, load_yaml, section_type


@dataclass
class Command:
    """A CLI command bound to a typed config and a runner ``main(cfg, extras) -> int``."""

    name: str
    help: str
    config: str  # "module:Class" (imported lazily: `softmask --help` must not import torch/ray)
    main: str  # "module:function"
    section: str | None = None  # YAML section holding this command's config in a workflow recipe
    extras: tuple[tuple[str, dict], ...] = ()  # options that are not config fields


def _resolve(ref: str) -> Any:
    mod, _, attr = ref.partition(":")
    return getattr(importlib.import_module(mod), attr)


COMMANDS: dict[str, Command] = {c.name: c for c in [
    Command("run", "the whole workflow: preprocess -> train -> evaluate -> deploy (Prefect + Ray)",
            "pipelines.workflow:WorkflowConfig", "pipelines.commands:cli_main",
            extras=(("--keep-serving", {"action": "store_true", "help": "keep the endpoint up until Ctrl-C"}),
                    ("--force", {"action": "append", "default": [], "metavar": "STAGE",
                                 "help": "rerun STAGE and every stage after it (repeatable)"}))),
    Command("preprocess", "tokenise and pack text into Parquet shards (Ray)", "pipelines.preprocess:PreprocessConfig",
            "pipelines.commands:cli_preprocess", section="preprocess"),
    Command("hf-import", "a local HF dir / GGUF / packaged model -> softmask checkpoint + tokenizer",
            "pipelines.hf_import:HFImportConfig", "pipelines.hf_import:cli_hf_import", section="hf_import"),
    Command("mdlm-import", "an MDLM / soft-masking DiT checkpoint (hub dir or Lightning .ckpt) -> softmask checkpoint",
            "pipelines.mdlm_import:MDLMImportConfig", "pipelines.mdlm_import:cli_mdlm_import", section="mdlm_import"),
    Command("train", "Ray Train + DeepSpeed training", "workers.train_config:TrainConfig",
            "pipelines.commands:cli_train", section="train"),
    Command("eval", "evaluate a checkpoint (ELBO PPL, gen PPL, MAUVE, entropy)", "pipelines.evaluate:EvalConfig",
            "pipelines.commands:cli_eval", section="evaluate"),
    Command("experiment", "SM vs binary vs self-conditioning grid", "pipelines.experiment:ExperimentConfig",
            "pipelines.commands:cli_experiment", section="experiment"),
    Command("serve", "serve a checkpoint over HTTP with Ray Serve (blocks until Ctrl-C unless --detach)",
            "pipelines.serve:ServeStageConfig", "pipelines.commands:cli_serve", section="serve"),
    Command("schedule", "register a cron-scheduled workflow (long-lived Prefect server + serve process)",
            "pipelines.workflow:WorkflowConfig", "pipelines.commands:cli_schedule",
            extras=(("--cron", {"required": True, "help": "cron expression, e.g. '0 3 * * *' (validated first)"}),
                    ("--timezone", {"default": "UTC", "help": "IANA timezone of the cron schedule (default UTC), "
                                                              "e.g. Europe/Paris"}),
                    ("--api-url", {"default": None, "help": "Prefect API URL, e.g. the one `softmask ui` prints "
                                                            "(default: start a local Prefect server with its UI)"}),
                    ("--ui-port", {"default": 0, "type": int, "help": "port of the Prefect server it starts "
                                                                      "(default: a free port; printed)"}),
                    ("--deployment-name", {"default": None, "help": "name of the Prefect deployment "
                                                                    "(default: <name>-scheduled)"}))),
    Command("ui", "start the Prefect UI on 127.0.0.1", "pipelines.commands:UiConfig",
            "pipelines.commands:cli_ui"),
    Command("status", "what ran and where the artifacts are", "pipelines.commands:StatusConfig",
            "pipelines.commands:cli_status"),
    Command("tokenizer", "tokenizer tools: `softmask tokenizer train`", "pipelines.tokenizer_train:TokenizerTrainConfig",
            "pipelines.commands:cli_tokenizer"),
]}


def _scalar_fields(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if section_type(hints[f.name]) is None}


def build_config(cmd: Command, config_path: str | None, overrides: list[str], options: dict[str, Any]) -> Any:
    """defaults < YAML (the command's section if the recipe has one) < options < --section.key overrides."""
    cls = _resolve(cmd.config)
    data: dict = {}
    if config_path:
        data = load_yaml(config_path)
        field_names = {f.name for f in dataclasses.fields(cls)}
        if cmd.section and cmd.section in data and cmd.section not in field_names:
            data = data[cmd.section]
    prefix = f"{cmd.section}."
    cleaned = [o[len(prefix) + 2:] if cmd.section and o.startswith("--" + prefix) else o.lstrip("-") for o in overrides]
    opts = [f"{k}={v}" for k, v in options.items() if v is not None]
    return from_dict(cls, apply_overrides(data, opts + cleaned))


def _parser(cmd: Command) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"softmask {cmd.name}", description=cmd.help,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML recipe (configs/*.yaml)")
    for flags, kw in cmd.extras:
        p.add_argument(flags, **kw)
    cls = _resolve(cmd.config)
    docs = field_docs(cls)
    for name, tp in _scalar_fields(cls).items():
        dest = f"opt_{name}"
        flag = "--" + name.replace("_", "-")
        names = [flag] + (["--" + name] if "_" in name else [])
        if tp is bool:
            p.add_argument(*names, dest=dest, nargs="?", const="true", default=None, metavar="BOOL", help=docs[name])
        else:
            p.add_argument(*names, dest=dest, default=None, metavar="VALUE", help=docs[name])
    nested = "\n".join(f"  --{k}=VALUE  {v}" for k, v in docs.items() if "." in k)
    if nested:
        p.epilog = "nested fields (--section.key=VALUE):\n" + nested
    return p


def main(argv: list[str] | None = None) -> int:
    # Ray 2.60 clusters use token auth by default and a driver reads the mode when Ray is imported: clients of this
    # CLI present ~/.ray/auth_token unless the user chose otherwise (RAY_AUTH_MODE=disabled for an opted-out cluster).
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        lines = [f"  {c.name:<11} {c.help}" for c in COMMANDS.values()]
        print("usage: softmask <command> [--config recipe.yaml] [--key=value ...]\n\ncommands:\n" + "\n".join(lines))
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nsoftmask: unknown command {argv[0]!r}", file=sys.stderr)
            return 2
        return 0
    cmd = COMMANDS[argv[0]]
    rest = argv[1:]
    if cmd.name == "tokenizer":
        if not rest or rest[0] != "train":
            print("usage: softmask tokenizer train --config ... [--key=value ...]", file=sys.stderr)
            return 2
        rest = rest[1:]
    parser = _parser(cmd)
    ns, unknown = parser.parse_known_args(rest)
    bad = [u for u in unknown if not (u.startswith("--") and "=" in u)]
    if bad:
        parser.error(f"unrecognised arguments {bad} (overrides are --section.key=value)")
    options = {k[4:]: v for k, v in vars(ns).items() if k.startswith("opt_")}
    extras = {k: v for k, v in vars(ns).items() if not k.startswith("opt_") and k != "config"}
    try:
        cfg = build_config(cmd, ns.config, unknown, options)
    except ConfigError as e:
        print(f"softmask {cmd.name}: config error: {e}", file=sys.stderr)
        return 2
    runner: Callable[[Any, dict], int] = _resolve(cmd.main)
    try:
        return int(runner(cfg, extras) or 0)
    except (ConfigError, FileNotFoundError) as e:  # a stage's check of its inputs (checkpoint, manifest, sources)
        if os.environ.get("SOFTMASK_TRACEBACK"):
            raise
        retry = f"; fix it, then rerun: {retry_command(argv)}" if cmd.name == "run" else ""
        print(f"softmask {cmd.name}: error: {e} (SOFTMASK_TRACEBACK=1 shows where){retry}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # commands that start servers handle signals themselves; this is the rest
        print(f"softmask {cmd.name}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - a crash: one line here, the whole traceback in a file
        if os.environ.get("SOFTMASK_TRACEBACK"):
            raise
        log = _save_traceback(cmd.name)
        resume = " (completed stages are skipped)" if cmd.name == "run" else ""
        print(f"softmask {cmd.name}: failed: {_cause(e)}; traceback in {log}; rerun: {retry_command(argv)}{resume}",
              file=sys.stderr)
        return 1


def _cause(e: BaseException) -> str:
    """The exception in one line: its type and the first line of its message (Ray wraps worker tracebacks in it)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    text = lines[0] if lines else ""
    return f"{type(e).__name__}: {text[:300]}" if text else type(e).__name__


def _save_traceback(command: str) -> str:
    """The current exception's traceback in a file of its own (the console keeps one line); returns its path."""
    import tempfile
    import time
    import traceback

    fd, path = tempfile.mkstemp(prefix=f"softmask-{command}-{time.strftime('%Y%m%d-%H%M%S')}-", suffix=".log")
    with os.fdopen(fd, "w") as f:
        f.write(traceback.format_exc())
    return path


def retry_command(argv: list[str]) -> str:
    """The command that reruns this one, as the user typed it: `make run` under the Makefile's run target."""
    import shlex

    default = ["run", "--config", "configs/demo_cpu.yaml"]  # the Makefile's `run` recipe (its ARGS follow)
    if os.environ.get("MAKELEVEL") and argv[:3] == default:
        extra = shlex.join(argv[3:])
        return "make run" + (f" ARGS={shlex.quote(extra)}" if extra else "")
    return shlex.join(["softmask", *argv])


if __name__ == "__main__":
    sys.exit(main())
