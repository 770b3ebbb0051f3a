"""The sampler deployment: weights loaded once per replica, compatible requests decoded together.

Flow of one request (payload = workers.serving.request_payload):
  complete / complete_stream -> _prepare: tokenize + per-request checks (prompt length, context) -> a _Job
  _intake (@serve.batch): requests arriving together are handed to the replica's scheduler in one go; each caller gets
      back its job's event queue.
  _schedule (one task per replica): whenever the model is free, takes the OLDEST pending job plus every pending job
      with the same key (up to max_batch_size) and decodes them in ONE models.sampling.sample call, run in the
      replica's single sampler thread so the event loop keeps accepting requests meanwhile.
      _Job.key = (length class, steps, algorithm, soft_mask, block_length, transparency, cache); the length class of a
      canvas L is the next power of two >= L and a group decodes on the longest canvas of its members (a shorter
      request reads its completion from its own span; the positions after it are discarded). temperature, top_p and
      threshold may differ inside a group: they reach sample() row by row (models.sampling PER_ROW).
  on_step feeds partial text to streams and trajectories and aborts a group once all its jobs timed out or left.

NOTE: why a scheduler behind @serve.batch: Serve forms the next batch as soon as requests arrive, *before* it waits
for the running batch (max_concurrent_batches), so under sustained load @serve.batch alone decodes many tiny batches
(measured at concurrency 16: 64 requests in 22 batches). Coalescing pending jobs when the model frees up decodes
everything that queued during the previous decode together.
NOTE: a failure inside sample() becomes an error event for the jobs of that group only; the replica lives on.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from ray import serve

from workers.serving_api import ALGORITHMS, MAX_SEED, ApiError

log = logging.getLogger("ray.serve")


@dataclass
class _Job:
    """One request inside the replica. Rows are prompt-major: row = prompt_index * n + sample_index."""

    payload: dict
    prompt_ids: list[list[int]]  # one per prompt
    length: int  # canvas length L this request needs (longest prompt + max_tokens, rounded up to length_bucket)
    deadline: float  # time.monotonic() after which the job is abandoned
    cancelled: bool = False
    events: asyncio.Queue | None = None  # step / final / error events for the caller (set by _intake)

    @property
    def key(self) -> tuple:
        """Requests with equal keys share one sample() call.

        NOTE: sample() draws from ONE generator per call, so a row's randomness depends on what it was decoded with;
        a request that names a seed is therefore decoded on its own (its own key) and stays reproducible.
        """
        p = self.payload
        key = (1 << (self.length - 1).bit_length(), p["steps"], p["algorithm"], p["soft_mask"], p["block_length"],
               p["transparency"], p["cache"])
        return key if p["seed"] is None else key + (id(self),)

    @property
    def rows(self) -> list[list[int]]:
        return [ids for ids in self.prompt_ids for _ in range(self.payload["n"])]

    @property
    def watched(self) -> bool:
        return self.payload["stream"] or self.payload["return_trajectory"]

    def expired(self, now: float) -> bool:
        return self.cancelled or now > self.deadline


class _Aborted(Exception):
    """Raised from on_step when nobody waits for the group any more."""


@serve.deployment
class SamplerDeployment:
    """Holds one DiffusionLM + tokenizer; see the module docstring for the batching contract."""

    def __init__(self, cfg: dict):
        import torch

        import models
        from models.sampling import ALGORITHMS as MODEL_ALGORITHMS
        from models.kv_cache import check_cacheable
        from models.sampling import PER_ROW, SamplerConfig, sample
        from models.tokenizer import NAMED_TOKENIZERS
        from workers.serving_chat import ChatTemplate, tokenizer_folder
        from workers.serving_config import as_serve_config, check_model

        self.cfg = as_serve_config(cfg)
        missing = set(ALGORITHMS) - set(MODEL_ALGORITHMS)
        if missing:
            raise ValueError(f"models.sampling lacks the advertised algorithm(s) {sorted(missing)}")
        if self.cfg.torch_threads:
            torch.set_num_threads(self.cfg.torch_threads)
        ckpt, mcfg, self.tok = check_model(self.cfg)
        self.chat = ChatTemplate.load(self.tok, None if self.tok.spec in NAMED_TOKENIZERS
                                      else tokenizer_folder(self.tok.spec))
        use_cuda = self.cfg.device == "cuda" or (self.cfg.device == "auto" and self.cfg.num_gpus > 0
                                                 and torch.cuda.is_available())
        self.device = torch.device("cuda" if use_cuda else "cpu")
        self.model = models.load_pretrained(ckpt).to(self.device).eval()
        self._sample, self._sampler_config, self._check_cacheable = sample, SamplerConfig, check_cacheable
        self._sampler_fields = {f.name for f in dataclasses.fields(SamplerConfig)}
        self._sampler_defaults = {f.name: f.default for f in dataclasses.fields(SamplerConfig)}
        self._per_row_fields = PER_ROW
        self._torch = torch
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="softmask-sampler")
        self._intake.set_max_batch_size(self.cfg.max_batch_size)
        self._intake.set_batch_wait_timeout_s(self.cfg.batch_wait_timeout_s)
        self._pending: list[_Job] = []
        self._wake: asyncio.Event | None = None
        self._scheduler: asyncio.Task | None = None
        self._info = {"id": self.cfg.served_name, "object": "model", "created": int(time.time()),
                      "owned_by": "softmask", "max_seq_len": mcfg.max_seq_len, "vocab_size": mcfg.vocab_size,
                      "flavor": mcfg.flavor, "soft_mask": self._soft_mask_state(), "chat_template": self.chat.name}
        self.stats = {"intake_batches": 0, "decodes": 0, "requests": 0, "max_batch_size": 0, "decode_s": 0.0}

    def _soft_mask_state(self) -> dict | None:
        """The served model's SM head: ω_s (largest λ), ω_a (steepness), ω_b (entropy threshold of the gate), k; None
        for a self-conditioning model (it has no soft-mask feedback)."""
        if getattr(self.model, "sc_proj", None) is not None:
            return None
        return {**self.model.sm_head.values(), "k": self.model.sm_head.k}

    # ----------------------------------------------------------------------------------------------- public API
    async def describe(self) -> dict:
        return dict(self._info)

    async def get_stats(self) -> dict:
        """Counters: intake batches (@serve.batch calls), decodes (sample() calls), requests, largest decode, seconds
        spent inside sample() (decode_s)."""
        return dict(self.stats)

    def check_health(self) -> None:
        """Serve health check: a dead scheduler would leave requests waiting forever, so the replica is restarted."""
        if self._scheduler is not None and self._scheduler.done():
            raise RuntimeError(f"sampler scheduler stopped: {self._scheduler.exception()!r}")

    async def complete(self, payload: dict) -> dict:
        """Final response dict, or ``{"error": {...}}``."""
        try:
            job = self._prepare(payload)
        except ApiError as e:
            return {"error": e.to_dict()}
        try:
            events = await self._intake(job)
            while True:
                ev = await events.get()
                if ev["type"] in ("final", "error"):
                    return {"error": ev["error"]} if ev["type"] == "error" else ev["data"]
        finally:  # done, or cancelled by the ingress (timeout, client gone): nobody waits for it any more
            job.cancelled = True

    async def complete_stream(self, payload: dict):
        """Events: accepted | error, then step events, then final (or error)."""
        try:
            job = self._prepare(payload)
        except ApiError as e:
            yield {"type": "error", "error": e.to_dict()}
            return
        yield {"type": "accepted"}
        try:
            events = await self._intake(job)
            while True:
                ev = await events.get()
                yield ev
                if ev["type"] in ("final", "error"):
                    return
        finally:
            job.cancelled = True

    # ------------------------------------------------------------------------------------------------ internals
    def _prepare(self, p: dict) -> _Job:
        """Tokenize and check one request against the model; raises ApiError naming the field. An empty prompt fixes
        no position: the whole canvas is generated (unconditional generation). Chat ``messages`` become one prompt
        through the tokenizer's chat template (workers/serving_chat.py), whose stop strings join the request's."""
        if p["algorithm"] not in ALGORITHMS:
            raise ApiError(422, "algorithm", f"unknown algorithm {p['algorithm']!r}")
        if p["cache"] not in (None, "none"):
            try:
                self._check_cacheable(self.model)
            except ValueError as e:
                raise ApiError(400, "cache", str(e).removeprefix("cache: "), "cache_unsupported") from None
        if p.get("messages") is not None:
            try:
                prompt_ids = [self.chat.encode(p["messages"])]
            except Exception as e:  # noqa: BLE001 - a template may refuse a conversation (e.g. no system role)
                raise ApiError(400, "messages", f"the chat template refused them ({type(e).__name__}: {e})",
                               "chat_template_error") from None
            p = {**p, "stop": p["stop"] + self.chat.stop}
        else:
            prompt_ids = self.tok.encode_batch(p["prompts"])
        longest = max(len(ids) for ids in prompt_ids)
        if longest > self.cfg.max_prompt_tokens:
            raise ApiError(413, "prompt", f"{longest} tokens exceeds max_prompt_tokens={self.cfg.max_prompt_tokens}",
                           "prompt_too_long")
        ctx = self.model.config.max_seq_len
        need = longest + p["max_tokens"]
        if need > ctx:
            raise ApiError(400, "max_tokens", f"prompt ({longest} tokens) + max_tokens ({p['max_tokens']}) = {need} "
                                              f"exceeds the model context {ctx}", "context_length_exceeded")
        bucket = self.cfg.length_bucket
        length = min(ctx, -(-need // bucket) * bucket)
        return _Job(payload=p, prompt_ids=prompt_ids, length=length,
                    deadline=time.monotonic() + float(p["timeout_s"]))

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def _intake(self, jobs: list[_Job]) -> list[asyncio.Queue]:
        """Hand arriving jobs to the scheduler (sizes are set from the config in __init__)."""
        if self._scheduler is None or self._scheduler.done():
            self._wake = asyncio.Event()
            self._scheduler = asyncio.get_running_loop().create_task(self._schedule())
        for job in jobs:
            job.events = asyncio.Queue()
            self._pending.append(job)
        self.stats["intake_batches"] += 1
        self.stats["requests"] += len(jobs)
        self._wake.set()
        return [job.events for job in jobs]

    def _next_group(self) -> list[_Job]:
        """Remove and return the oldest live pending job and its compatible pending jobs (FIFO, capped)."""
        now = time.monotonic()
        live = []
        for job in self._pending:
            if job.expired(now):
                timeout = ApiError(504, None, f"request timed out after {job.payload['timeout_s']}s", "timeout")
                job.events.put_nowait({"type": "error", "error": timeout.to_dict()})
            else:
                live.append(job)
        if not live:
            self._pending = []
            return []
        key = live[0].key
        group = [job for job in live if job.key == key][:self.cfg.max_batch_size]
        chosen = {id(job) for job in group}
        self._pending = [job for job in live if id(job) not in chosen]
        return group

    async def _schedule(self) -> None:
        """The replica's decode loop: one group at a time, for as long as the replica lives."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            while group := self._next_group():
                self.stats["decodes"] += 1
                self.stats["max_batch_size"] = max(self.stats["max_batch_size"], len(group))
                try:
                    async for updates in self._run_group(group):
                        for j, ev in updates.items():
                            group[j].events.put_nowait(ev)
                except Exception as e:  # noqa: BLE001 - a bug here must not stop the loop
                    log.exception("decoding a group of %d requests failed", len(group))
                    err = ApiError(500, None, f"sampling failed: {type(e).__name__}: {e}", "sampler_error")
                    for job in group:
                        job.events.put_nowait({"type": "error", "error": err.to_dict()})

    async def _run_group(self, jobs: list[_Job]):
        """Decode one compatible group in one sample() call. Yields {job index in group: event}."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        p0, length = jobs[0].payload, max(job.length for job in jobs)
        rows, owners = [], []  # owners[r] = (job index, choice index)
        for j, job in enumerate(jobs):
            for c, ids in enumerate(job.rows):
                rows.append(ids)
                owners.append((j, c))
        every = max(1, p0["steps"] // self.cfg.stream_max_events)
        watched = [r for r, (j, _) in enumerate(owners) if jobs[j].watched]
        trajectories: dict[int, list[str]] = {r: [] for r in watched}

        def on_step(step: int, tokens) -> None:  # runs in the sampler thread
            if all(job.expired(time.monotonic()) for job in jobs):
                raise _Aborted()
            if watched and step % every == 0:
                snap = tokens[watched].tolist()  # (W, L) copy
                texts = {r: self._text(row, rows[r], jobs[owners[r][0]].payload["max_tokens"], partial=True)
                         for r, row in zip(watched, snap)}
                loop.call_soon_threadsafe(queue.put_nowait, ("step", step, texts))

        scfg = {k: v for k, v in dict(steps=p0["steps"], algorithm=p0["algorithm"], soft_mask=p0["soft_mask"],
                                      block_length=p0["block_length"], transparency=p0["transparency"],
                                      cache=p0["cache"],
                                      ).items() if k in self._sampler_fields and v is not None}
        per_row = {}
        for name in self._per_row_fields:  # one value per row; None = the sampler's default
            values = [jobs[j].payload[name] for j, _ in owners]
            values = [self._sampler_defaults[name] if v is None else v for v in values]
            if len(set(values)) == 1:
                scfg[name] = values[0]
            else:
                per_row[name] = values
        seed = p0["seed"] if p0["seed"] is not None else random.randint(0, MAX_SEED)
        future = loop.run_in_executor(self._executor, self._sample_blocking, scfg, rows, length, seed, on_step,
                                      per_row or None)
        future.add_done_callback(lambda _f: queue.put_nowait(("done",)))
        while True:
            ev = await queue.get()
            if ev[0] == "done":
                break
            _, step, texts = ev
            updates = {}
            for r, text in texts.items():
                trajectories[r].append(text)
                j, c = owners[r]
                if jobs[j].payload["stream"]:
                    updates.setdefault(j, {"type": "step", "data": self._chunk(jobs[j], step, p0["steps"])})
                    updates[j]["data"]["choices"].append({"index": c, "text": text, "finish_reason": None})
            if updates:
                yield updates
        try:
            tokens, nfe, sm_feedback = future.result()
        except _Aborted:
            err = ApiError(504, None, f"request timed out after {p0['timeout_s']}s", "timeout")
            yield {j: {"type": "error", "error": err.to_dict()} for j in range(len(jobs))}
            return
        except (ValueError, TypeError) as e:  # the sampler refused the settings
            err = ApiError(400, None, f"sampler rejected the request: {e}", "invalid_sampler_settings")
            yield {j: {"type": "error", "error": err.to_dict()} for j in range(len(jobs))}
            return
        except Exception as e:  # noqa: BLE001 - never let one decode take the replica down
            log.exception("sample() failed for a batch of %d requests", len(jobs))
            err = ApiError(500, None, f"sampling failed: {type(e).__name__}: {e}", "sampler_error")
            yield {j: {"type": "error", "error": err.to_dict()} for j in range(len(jobs))}
            return
        finals = {}
        for j, job in enumerate(jobs):
            choices, completion_tokens = [], 0
            for r, (owner, c) in enumerate(owners):
                if owner != j:
                    continue
                text, n_tok, reason = self._final_text(tokens[r], rows[r], job.payload)
                completion_tokens += n_tok
                choice = {"index": c, "text": text, "finish_reason": reason, "logprobs": None}
                if job.payload["return_trajectory"]:
                    choice["trajectory"] = trajectories[r]
                choices.append(choice)
            prompt_tokens = sum(len(ids) for ids in job.prompt_ids) * job.payload["n"]
            finals[j] = {"type": "final", "data": {
                "id": job.payload["id"], "object": "text_completion", "created": int(time.time()),
                "model": self._info["id"], "choices": choices,
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                          "total_tokens": prompt_tokens + completion_tokens},
                "nfe": nfe, "batch_size": len(jobs), "batch_rows": len(rows), "steps": p0["steps"],
                "algorithm": p0["algorithm"], "soft_mask": p0["soft_mask"], "sm_feedback": sm_feedback,
                "transparency": p0["transparency"], "length": length,
                # the seed reproduces this response only when the request was decoded on its own
                "seed": seed if len(jobs) == 1 else None}}
        yield finals

    def _sample_blocking(self, scfg: dict, rows: list[list[int]], length: int, seed: int, on_step, per_row=None):
        """Runs in the sampler thread: one sample() call -> ((N, L) token lists, nfe, what soft-masking did: None when
        no feedback ran, else {"lambda_mean", "gate_open"} over every position it fed)."""
        t0 = time.perf_counter()
        try:
            with self._torch.inference_mode():
                out = self._sample(self.model, self._sampler_config(**scfg), num_samples=len(rows), length=length,
                                   prompt_ids=rows, seed=seed, on_step=on_step, per_row=per_row)
        finally:
            self.stats["decode_s"] += time.perf_counter() - t0
        fed = None if out.lambda_mean is None else {"lambda_mean": out.lambda_mean, "gate_open": out.gate_open}
        return out.tokens.tolist(), int(out.nfe), fed

    def _chunk(self, job: _Job, step: int, steps: int) -> dict:
        return {"id": job.payload["id"], "object": "text_completion.step", "created": int(time.time()),
                "model": self._info["id"], "step": step, "steps": steps, "choices": []}

    def _completion_ids(self, row: list[int], prompt: list[int], max_tokens: int) -> list[int]:
        return row[len(prompt):len(prompt) + max_tokens]

    def _text(self, row: list[int], prompt: list[int], max_tokens: int, partial: bool) -> str:
        """Decode the completion span; still-masked positions become the placeholder."""
        ids = self._completion_ids(row, prompt, max_tokens)
        mask, parts, run = self.tok.mask_id, [], []
        for t in ids:
            if t == mask:
                if run:
                    parts.append(self.tok.decode(run))
                    run = []
                parts.append(self.cfg.mask_placeholder if partial else "")
            else:
                run.append(t)
        if run:
            parts.append(self.tok.decode(run))
        return "".join(parts)

    def _final_text(self, row: list[int], prompt: list[int], p: dict) -> tuple[str, int, str]:
        """(text, completion tokens, finish_reason): cut at EOS, then before the first stop string."""
        ids = self._completion_ids(row, prompt, p["max_tokens"])
        reason = "length"
        if self.tok.eos_id in ids:
            ids = ids[:ids.index(self.tok.eos_id)]
            reason = "stop"
        text = self._text(prompt + ids, prompt, len(ids), partial=False)
        cuts = [text.find(s) for s in p["stop"] if s in text]
        if cuts:
            text, reason = text[:min(cuts)], "stop"
        return text, len(ids), reason
