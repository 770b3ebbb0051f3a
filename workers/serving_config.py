"""The Serve deployment's configuration and its model checks: :class:`ServeConfig`, checkpoint resolution (an
``s3://`` checkpoint is cached locally, atomically, re-downloaded only when the remote listing changes) and
:func:`check_model` (checkpoint, weights and tokenizer agree). Read by the ingress (workers.serving), the sampler
replica (workers.serving_sampler) and the driver's preflight (pipelines.serve); imports neither of the first two.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

from infra.config import ConfigError, field, from_dict, require
from workers.serving_api import ALGORITHMS, TRANSPARENCY


@dataclass
class ServeConfig:
    """What the serving application needs: checkpoint, batching, scaling, request bounds and sampler defaults."""

    # --- model
    checkpoint: str = field("", "checkpoint dir (config.json + model.safetensors), local path or s3://bucket/prefix")
    tokenizer: str | None = field(None, "tokenizer spec for models.tokenizer.load_tokenizer ('gpt2', a tokenizer.json "
                                        "or an HF dir); None = <checkpoint>/tokenizer.json")
    model_name: str | None = field(None, "name served by /v1/models and accepted as `model`; None = the checkpoint "
                                         "directory's name")
    cache_dir: str | None = field(None, "local cache for s3:// checkpoints; None = $SOFTMASK_CACHE/checkpoints or "
                                        "~/.cache/softmask/checkpoints")
    device: str = field("auto", "sampler device: auto (cuda when num_gpus > 0 and available), cpu or cuda")
    torch_threads: int = field(0, "torch intra-op threads in a sampler replica; 0 = keep Ray's/torch's default")
    # --- application
    app_name: str = field("softmask", "Serve application name")
    route_prefix: str = field("/", "HTTP route prefix of the application (endpoints live under it)")
    # --- batching
    max_batch_size: int = field(16, "most requests decoded together in one sample() call (1 = no batching)")
    batch_wait_timeout_s: float = field(0.01, "longest wait for a batch to fill after its first request")
    length_bucket: int = field(16, "canvas length (prompt + max_tokens) is rounded up to a multiple of this; requests "
                                   "whose canvases fall in the same power-of-two class share a sample() call")
    # --- scaling and resources
    min_replicas: int = field(1, "autoscaling: fewest sampler replicas")
    max_replicas: int = field(1, "autoscaling: most sampler replicas")
    initial_replicas: int | None = field(None, "autoscaling: replicas at deploy time (None = min_replicas)")
    target_ongoing_requests: float = field(16.0, "autoscaling: ongoing requests per sampler replica to aim for")
    upscale_delay_s: float = field(5.0, "autoscaling: sustained load needed before adding a replica")
    downscale_delay_s: float = field(30.0, "autoscaling: sustained idleness needed before removing a replica")
    max_ongoing_requests: int | None = field(None, "requests a sampler replica accepts at once (>= max_batch_size); "
                                                   "None = 2 * max_batch_size")
    max_queued_requests: int = field(256, "requests waiting for a sampler replica beyond which new ones get 503")
    num_cpus: float = field(1.0, "CPUs reserved per sampler replica (fractional is fine)")
    num_gpus: float = field(0.0, "GPUs per sampler replica (0 = CPU inference)")
    ingress_num_cpus: float = field(0.1, "CPUs reserved per ingress replica")
    ingress_replicas: int = field(1, "ingress (HTTP) replicas")
    # --- request bounds
    max_prompt_tokens: int = field(512, "longest prompt in tokens (413 beyond)")
    max_tokens_limit: int = field(512, "largest accepted `max_tokens` (422 beyond)")
    max_steps: int = field(1024, "largest accepted `steps` (422 beyond)")
    max_n: int = field(8, "largest accepted `n` (422 beyond)")
    max_prompts: int = field(16, "most prompts in one request's prompt list (422 beyond)")
    max_stop: int = field(4, "most stop strings (422 beyond)")
    max_body_bytes: int = field(1 << 20, "largest request body in bytes (413 beyond)")
    request_timeout_s: float = field(60.0, "a request still running after this gets 504 and its decode is aborted")
    # --- sampler defaults (used when the request leaves a field out)
    default_max_tokens: int = field(64, "completion length when `max_tokens` is omitted")
    default_steps: int = field(64, "denoising steps when `steps` is omitted")
    default_algorithm: str = field("ancestral", f"unmasking algorithm when omitted: one of {list(ALGORITHMS)}")
    default_soft_mask: bool = field(True, "soft-masking when `soft_mask` is omitted")
    default_temperature: float = field(1.0, "temperature when omitted")
    default_top_p: float = field(0.9, "nucleus mass when omitted (the paper samples with top-p 0.9)")
    default_block_length: int | None = field(None, "semi-AR block length when omitted (None = one block)")
    default_transparency: str = field("none", "soft-masking transparency schedule when omitted (none, linear, "
                                              "stepwise; models.sampling.TRANSPARENCY)")
    # --- access (the key itself is never part of the config: only where to read it)
    api_key_env: str = field("SOFTMASK_API_KEY", "environment variable an ingress replica reads the API key from; "
                                                 "unset or empty = no key (requests need no Authorization)")
    api_key_file: str | None = field(None, "file whose first line is the API key, read by each ingress replica; "
                                           "takes precedence over api_key_env")
    require_api_key: bool = field(False, "fail closed: an ingress replica that finds no key refuses to start "
                                         "(`softmask serve` sets it whenever it found a key; set it in cluster "
                                         "manifests)")
    # --- streaming
    stream_max_events: int = field(32, "most intermediate step events per stream / trajectory entries per choice")
    mask_placeholder: str = field("_", "text shown for a still-masked position in partial (streamed) text")

    def __post_init__(self) -> None:
        require(bool(self.checkpoint), "checkpoint", "is required (local dir or s3://bucket/prefix)")
        require(self.device in ("auto", "cpu", "cuda"), "device", f"must be auto, cpu or cuda, got {self.device!r}")
        require(self.torch_threads >= 0, "torch_threads", "must be >= 0")
        require(bool(self.app_name), "app_name", "must be non-empty")
        require(self.route_prefix.startswith("/"), "route_prefix", f"must start with '/', got {self.route_prefix!r}")
        require(self.max_batch_size >= 1, "max_batch_size", "must be >= 1")
        require(self.batch_wait_timeout_s >= 0, "batch_wait_timeout_s", "must be >= 0")
        require(self.length_bucket >= 1, "length_bucket", "must be >= 1")
        require(self.min_replicas >= 1, "min_replicas", "must be >= 1")
        require(self.max_replicas >= self.min_replicas, "max_replicas", "must be >= min_replicas")
        if self.initial_replicas is not None:
            require(self.min_replicas <= self.initial_replicas <= self.max_replicas, "initial_replicas",
                    "must lie in [min_replicas, max_replicas]")
        require(self.target_ongoing_requests > 0, "target_ongoing_requests", "must be > 0")
        require(self.upscale_delay_s >= 0 and self.downscale_delay_s >= 0, "upscale_delay_s", "delays must be >= 0")
        if self.max_ongoing_requests is not None:
            require(self.max_ongoing_requests >= self.max_batch_size, "max_ongoing_requests",
                    f"must be >= max_batch_size={self.max_batch_size} (otherwise batches can never fill)")
        require(self.max_queued_requests >= 1, "max_queued_requests", "must be >= 1")
        require(self.num_cpus >= 0 and self.num_gpus >= 0 and self.ingress_num_cpus >= 0, "num_cpus",
                "resources must be >= 0")
        require(self.ingress_replicas >= 1, "ingress_replicas", "must be >= 1")
        for name in ("max_prompt_tokens", "max_tokens_limit", "max_steps", "max_n", "max_prompts", "max_stop",
                     "max_body_bytes", "stream_max_events"):
            require(getattr(self, name) >= 1, name, "must be >= 1")
        require(self.request_timeout_s > 0, "request_timeout_s", "must be > 0")
        require(1 <= self.default_max_tokens <= self.max_tokens_limit, "default_max_tokens",
                "must lie in [1, max_tokens_limit]")
        require(1 <= self.default_steps <= self.max_steps, "default_steps", "must lie in [1, max_steps]")
        require(self.default_algorithm in ALGORITHMS, "default_algorithm",
                f"must be one of {list(ALGORITHMS)}, got {self.default_algorithm!r}")
        require(0.0 <= self.default_temperature <= 2.0, "default_temperature", "must lie in [0, 2]")
        require(0.0 < self.default_top_p <= 1.0, "default_top_p", "must lie in (0, 1]")
        require(self.default_block_length is None or self.default_block_length >= 1, "default_block_length",
                "must be >= 1 or null")
        require(self.default_transparency in TRANSPARENCY, "default_transparency",
                f"must be one of {list(TRANSPARENCY)}, got {self.default_transparency!r}")
        require(bool(self.api_key_env), "api_key_env", "must name an environment variable")
        require(self.api_key_file is None or bool(self.api_key_file), "api_key_file", "must be a path or null")

    @property
    def served_name(self) -> str:
        return self.model_name or Path(self.checkpoint.rstrip("/")).name or "softmask"

    @property
    def ongoing_limit(self) -> int:
        return self.max_ongoing_requests or 2 * self.max_batch_size

    def limits(self) -> dict:
        return {"max_tokens_limit": self.max_tokens_limit, "max_steps": self.max_steps, "max_n": self.max_n,
                "max_prompts": self.max_prompts, "max_stop": self.max_stop, "model_name": self.served_name}


def as_serve_config(cfg: "ServeConfig | dict") -> ServeConfig:
    """A ServeConfig from itself, a subclass instance (only the ServeConfig fields are kept) or a plain dict."""
    if isinstance(cfg, dict):
        return from_dict(ServeConfig, cfg)
    if type(cfg) is ServeConfig:
        return cfg
    names = {f.name for f in dataclasses.fields(ServeConfig)}
    return ServeConfig(**{k: v for k, v in dataclasses.asdict(cfg).items() if k in names})


def read_api_key(cfg: ServeConfig) -> str | None:
    """The API key from ``api_key_file`` (its first line) or else the ``api_key_env`` variable; None = no key.
    Raises ConfigError naming the field for an unreadable or empty key file, or no key under ``require_api_key``.

    NOTE: the key never enters a config, a log line or an error message."""
    if cfg.api_key_file is not None:
        path = Path(cfg.api_key_file).expanduser()
        try:
            key = (path.read_text().splitlines() or [""])[0].strip()
        except OSError as e:
            raise ConfigError(f"api_key_file: cannot read {path} ({e.strerror})") from None
        require(bool(key), "api_key_file", f"{path} holds no key (its first line is empty)")
        return key
    key = os.environ.get(cfg.api_key_env, "").strip() or None
    require(key is not None or not cfg.require_api_key, "require_api_key",
            f"no API key found: set the environment variable {cfg.api_key_env} or api_key_file")
    return key


# ------------------------------------------------------------------------------------------ checkpoint resolution
def default_cache_dir() -> Path:
    from models.cache import cache_root

    return cache_root() / "checkpoints"


def resolve_checkpoint(uri: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Local directory holding the checkpoint ``uri`` (a local path, or s3:// downloaded into ``cache_dir``).

    The cache entry is keyed by the URI and re-downloaded only when the remote listing (names, sizes, ETags) differs
    from the one recorded next to it; downloads go to a temp dir that is renamed into place (atomic, concurrent-safe).
    """
    if not uri.startswith("s3://"):
        path = Path(uri).expanduser()
        if not (path / "config.json").is_file():
            raise ConfigError(f"checkpoint: {path} is not a checkpoint directory (no config.json)")
        return path
    from infra.storage import filesystem

    uri = uri.rstrip("/")
    fs, prefix = filesystem(uri)  # endpoint/credentials from the environment, listings cache off
    try:
        infos = [i for i in fs.find(prefix, detail=True).values() if i.get("type", "file") == "file"]
    except FileNotFoundError:
        infos = []
    listing = sorted((i["name"][len(prefix) + 1:], int(i.get("size") or 0), str(i.get("ETag", ""))) for i in infos)
    if not any(name == "config.json" for name, _, _ in listing):
        raise ConfigError(f"checkpoint: {uri} is not a checkpoint (no config.json under it)")
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    key = hashlib.sha256(uri.encode()).hexdigest()[:16]
    dest = cache / f"{Path(prefix).name}-{key}"
    stamp = json.dumps(listing)
    if (dest / ".source.json").is_file() and (dest / ".source.json").read_text() == stamp:
        return dest
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=cache))
    try:
        for name, _, _ in listing:
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            fs.get(f"{prefix}/{name}", str(tmp / name))
        (tmp / ".source.json").write_text(stamp)
        old = dest.with_name(f".{dest.name}.old-{uuid.uuid4().hex[:8]}")
        if dest.exists():
            dest.rename(old)
        tmp.rename(dest)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if dest.is_dir() and (dest / "config.json").is_file():  # a concurrent download won the rename
            return dest
        raise
    return dest


def check_model(cfg: ServeConfig):
    """What a sampler replica loads, checked without loading the weights: ``(local checkpoint dir, model config,
    tokenizer)``. Raises ConfigError naming the field: a checkpoint that is missing or unreadable, a tokenizer that
    is missing or whose vocabulary or [MASK] id does not fit the model. The driver calls it before it starts
    anything (``softmask serve``, the deploy stage); each replica calls it again before it loads the weights."""
    from safetensors import safe_open

    from models.checkpoint import read_config
    from models.tokenizer import load_tokenizer

    ckpt = resolve_checkpoint(cfg.checkpoint, cfg.cache_dir)
    try:
        mcfg, _ = read_config(ckpt)
    except (ValueError, KeyError, TypeError) as e:  # JSON errors are ValueErrors
        raise ConfigError(f"checkpoint: {ckpt}/config.json is not a readable model config ({e})") from None
    weights = ckpt / "model.safetensors"
    try:
        with safe_open(str(weights), framework="pt") as f:
            if not list(f.keys()):
                raise ValueError("it holds no tensors")
    except Exception as e:  # noqa: BLE001 - missing, truncated or not safetensors: all say the same to the user
        raise ConfigError(f"checkpoint: {weights} is not a readable safetensors file ({type(e).__name__}: {e})") \
            from None
    if cfg.tokenizer is None and not (ckpt / "tokenizer.json").is_file():
        raise ConfigError(f"tokenizer: {ckpt} has no tokenizer.json; set the `tokenizer` field (e.g. gpt2 or the "
                          f"tokenizer.json the model was trained with)")
    spec = cfg.tokenizer or str(ckpt / "tokenizer.json")
    try:
        tok = load_tokenizer(spec)
    except (OSError, ValueError) as e:
        raise ConfigError(f"tokenizer: {e}") from None
    if tok.vocab_size > mcfg.vocab_size:
        raise ConfigError(f"tokenizer: {spec} has {tok.vocab_size} tokens, more than the model's vocab_size "
                          f"{mcfg.vocab_size}: it is not the tokenizer this model was trained with")
    if tok.mask_id != mcfg.mask_token_id:
        raise ConfigError(f"tokenizer: the [MASK] id of {spec} is {tok.mask_id}, the model's mask_token_id is "
                          f"{mcfg.mask_token_id}: it is not the tokenizer this model was trained with")
    return ckpt, mcfg, tok
