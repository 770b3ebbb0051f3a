"""HumanEval execution: completions run as programs in limited, isolated subprocesses; pass@k.

    problems = load_problems()                                    # models.evaluation.humaneval (164, offline)
    gens = generate_completions(model, tok, problems, SamplerConfig(steps=64, algorithm="entropy"), gen_tokens=256)
    res = evaluate(problems, gens.completions, ExecConfig(timeout_s=10, memory_mb=1024, workers=2))
    res.pass_at_1, res.passed, res.total
    res = run_humaneval(model, tok, sampler_cfg, gen_tokens=256)  # both steps

Execution: each program (prompt + completion + the problem's tests + ``check(entry_point)``) runs in a fresh
``python -I -S`` subprocess, in its own session and temp dir, with a wall-time limit (the process group is killed),
``RLIMIT_AS`` (memory), ``RLIMIT_CPU``, ``RLIMIT_FSIZE`` and no network: inside a new network namespace
(``unshare -rn``) where the kernel allows it, and always with the socket API disabled in the interpreter.
NOTE: this limits accidents of generated code; it is not a security sandbox against hostile code.
Generation (prompts, chat templates, truncation) is pure model code in ``models.evaluation.humaneval``; this module
starts processes, so it lives outside ``models/``.
"""
from __future__ import annotations

import functools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

from models.evaluation.humaneval import generate_completions, load_problems, program_for

# Runs first in the child: limits, then the socket API disabled, then the program (stdin) as __main__.
_RUNNER = r"""
import resource, sys
mem, cpu = int(sys.argv[1]), int(sys.argv[2])
resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
src = sys.stdin.read()
import socket
def _no_network(*args, **kwargs):
    raise PermissionError("network access is disabled for HumanEval programs")
for _name in ("socket", "create_connection", "create_server", "socketpair", "fromfd", "getaddrinfo"):
    setattr(socket, _name, _no_network)
exec(compile(src, "<humaneval>", "exec"), {"__name__": "__main__"})
"""


@dataclass
class ExecConfig:
    timeout_s: float = field(default=10.0, metadata={"doc": "wall-clock limit per program (process group killed)"})
    memory_mb: int = field(default=1024, metadata={"doc": "address-space limit (RLIMIT_AS) per program"})
    workers: int = field(default=2, metadata={"doc": "programs run in parallel"})

    def __post_init__(self):
        if self.timeout_s <= 0 or self.memory_mb < 64 or self.workers < 1:
            raise ValueError(f"invalid ExecConfig (timeout_s > 0, memory_mb >= 64, workers >= 1): {self}")


@dataclass
class TaskResult:
    task_id: str
    passed: bool
    status: str          # passed | timed out | memory limit | killed by <signal> | failed: <last error line>
    seconds: float


@dataclass
class HumanEvalResult:
    pass_at_1: float                 # mean over tasks of (passed samples / samples)
    passed: int                      # passed programs
    total: int                       # programs run
    tasks: int
    isolation: str                   # "netns" (network namespace) or "socket-guard"
    results: list[TaskResult] = field(default_factory=list)
    extra: dict = field(default_factory=dict)   # generation settings, NFE, ...

    def to_dict(self) -> dict:
        return asdict(self)


@functools.lru_cache(maxsize=1)
def _netns_prefix() -> tuple[str, ...]:
    """``unshare -rn`` when user + network namespaces are permitted here, else nothing."""
    exe = shutil.which("unshare")
    if exe is None:
        return ()
    try:
        ok = subprocess.run([exe, "-rn", "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        ok = False
    return (exe, "-rn") if ok else ()


def isolation() -> str:
    return "netns" if _netns_prefix() else "socket-guard"


def _status(rc: int, err: str) -> str:
    if rc == 0:
        return "passed"
    if "MemoryError" in err:
        return "memory limit"
    if rc < 0:
        return f"killed by {signal.Signals(-rc).name}"
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    return "failed: " + (lines[-1][:200] if lines else f"exit code {rc}")


def run_program(program: str, timeout_s: float = 10.0, memory_mb: int = 1024) -> tuple[bool, str, float]:
    """(passed, status, seconds) of one program in a limited subprocess (see the module docstring)."""
    cmd = [*_netns_prefix(), sys.executable, "-I", "-S", "-c", _RUNNER, str(memory_mb << 20),
           str(max(1, int(timeout_s) + 1))]
    env = {"PATH": "/usr/bin:/bin", "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1", "LANG": "C.UTF-8"}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="humaneval-") as work:
        err_path = os.path.join(work, "stderr")
        with open(err_path, "wb") as err_f:
            proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=err_f, cwd=work,
                                    env=env, start_new_session=True)
            try:
                proc.communicate(program.encode(), timeout=timeout_s)
                timed_out = False
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                if timed_out:
                    try:
                        os.killpg(proc.pid, signal.SIGKILL)  # the whole session this call started
                    except ProcessLookupError:
                        pass
                proc.wait()
        with open(err_path, "rb") as f:
            f.seek(max(0, os.path.getsize(err_path) - 4096))
            err = f.read().decode("utf-8", "replace")
    seconds = time.perf_counter() - t0
    status = "timed out" if timed_out else _status(proc.returncode, err)
    return status == "passed", status, seconds


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one task with n samples of which c pass (Chen et al. 2021)."""
    if n - c < k:
        return 1.0
    prob_all_fail = 1.0
    for i in range(n - c + 1, n + 1):
        prob_all_fail *= 1.0 - k / i
    return 1.0 - prob_all_fail


def evaluate(problems: list[dict], completions: dict[str, str | list[str]],
             cfg: ExecConfig | None = None) -> HumanEvalResult:
    """Run every completion of every task in ``completions`` (task_id -> one or several completions)."""
    cfg = cfg or ExecConfig()
    by_id = {p["task_id"]: p for p in problems}
    unknown = set(completions) - set(by_id)
    if unknown:
        raise ValueError(f"completions for unknown task(s) {sorted(unknown)[:5]}")
    jobs = [(tid, c) for tid, cs in completions.items() for c in ([cs] if isinstance(cs, str) else cs)]
    with ThreadPoolExecutor(max_workers=cfg.workers) as pool:
        outs = list(pool.map(lambda j: run_program(program_for(by_id[j[0]], j[1]), cfg.timeout_s, cfg.memory_mb),
                             jobs))
    results = [TaskResult(tid, ok, status, round(sec, 3)) for (tid, _), (ok, status, sec) in zip(jobs, outs)]
    per_task: dict[str, list[bool]] = {}
    for r in results:
        per_task.setdefault(r.task_id, []).append(r.passed)
    p1 = sum(pass_at_k(len(v), sum(v), 1) for v in per_task.values()) / max(1, len(per_task))
    return HumanEvalResult(pass_at_1=p1, passed=sum(r.passed for r in results), total=len(results),
                           tasks=len(per_task), isolation=isolation(), results=results)



def run_humaneval(model, tokenizer, sampler_cfg, gen_tokens: int, *, problems: list[dict] | None = None,
                  exec_cfg: ExecConfig | None = None, samples_per_task: int = 1, seed: int = 0,
                  batch_size: int = 1, chat_template: str | None = None) -> HumanEvalResult:
    """Generate + execute; ``extra`` records the sampler settings, gen_tokens and the mean NFE per sample."""
    problems = problems if problems is not None else load_problems()
    gens = generate_completions(model, tokenizer, problems, sampler_cfg, gen_tokens,
                                samples_per_task=samples_per_task, seed=seed, batch_size=batch_size,
                                chat_template=chat_template)
    res = evaluate(problems, gens.completions, exec_cfg)
    res.extra = {"sampler": asdict(sampler_cfg), "gen_tokens": gen_tokens, "samples_per_task": samples_per_task,
                 "nfe_per_sample": gens.nfe_per_problem, "seed": seed, "batch_size": batch_size,
                 "chat_template": chat_template is not None}
    return res
