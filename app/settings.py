"""All run-time configuration, read once from PROMPTSERVE_* environment variables."""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEMO_PROMPT_SETS = Path(__file__).resolve().parent / "demo_prompt_sets"


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "promptserve"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PROMPTSERVE_", extra="ignore")

    # Model: empty means the embedded SmolLM2-135M-Instruct; else a local HF checkpoint dir or GGUF file.
    model: str = ""
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    cache_dir: Path = Field(default_factory=default_cache_dir)

    # Prompt-set store.
    store_dir: Path = Path("var/prompt-store")
    # s3://bucket/prefix: the object-store backend (endpoint and credentials from the AWS_* variables), for
    # replicas on several hosts; file:///path: the file store at that path; empty: the file store at store_dir
    store_url: str = ""
    store_poll_seconds: float = 1.0  # the object store: how old a task's cached manifest may get (a new
    # active version reaches every replica within about this)
    # prompt-set files imported at start-up when their task is absent: the demo tasks (chat, ner, spam),
    # shipped inside the package; empty turns seeding off
    seed_dir: str = str(DEMO_PROMPT_SETS)
    admin_token: str = ""
    admin_token_file: Path | None = None  # e.g. a Docker secret; wins over admin_token when set
    max_upload_bytes: int = 64 * 1024 * 1024  # an admin upload's body
    max_request_bytes: int = 4 * 1024 * 1024  # any other request's body (/v1): far above any prompt that fits
    api_keys: str = ""  # comma-separated client keys for /v1; empty = open
    metrics_need_key: bool = True  # with api_keys set, /metrics needs one of them too (it names every task)
    request_timeout: float = 300.0  # seconds a task request may take before it is cancelled (504)
    drain_grace: float = 30.0  # on SIGTERM: seconds in-flight requests get to finish

    # Engine.
    max_num_seqs: int = 64  # running sequences in one batch (KV-cache rows)
    max_model_len: int = 2048  # virtual tokens + prompt + generated tokens
    # the KV cache's memory budget in MiB: sequences are admitted while their reserved lengths (prefix + prompt
    # + max_tokens) fit it, and it is allocated only as far as they need; 0 = a quarter of the memory
    # available once the model is loaded (CPU: MemAvailable and the cgroup limit; GPU: free memory)
    kv_cache_mb: int = Field(0, ge=0)
    max_queue: int = 256  # waiting requests beyond which new ones are refused
    max_prefills_per_step: int = 16
    # prompt tokens (padded) one step prefills: bounds how long a burst of prompts, or one long prompt
    # (prefilled in chunks of this size), holds up the running streams
    max_prefill_tokens: int = Field(1024, ge=16)
    prefix_cache_size: int = 4096  # device-resident prompt sets kept (LRU), bounded by count...
    prefix_cache_mb: int = 1024  # ...and by memory
    # keys and values of prompt beginnings (the chat template's system prompt, a task's instructions) kept in
    # MiB for later generate prompts that begin with the same tokens after the same prompt set; 0 = off
    prompt_cache_mb: int = Field(128, ge=0)
    # speculative decoding: tokens proposed from a sequence's own prompt and output (prompt lookup) that a
    # decode step of one or two sequences checks in the same pass; only where the check is exact (the native
    # bf16 decode op on CPUs with AVX-512 BF16), so outputs are the same as without it; 0 = off
    speculative_tokens: int = Field(3, ge=0)
    default_max_tokens: int = 256
    # Structured outputs: compiled grammars kept (by their measured memory), and what one grammar may cost
    # to compile and take its first tokens; beyond that a request is refused (400 invalid_grammar)
    grammar_cache_mb: int = Field(256, ge=1)
    grammar_max_mb: int = Field(64, ge=1)
    grammar_max_seconds: float = Field(2.0, gt=0)
    # CPU: oneDNN-packed copies of the linear weights (faster); they replace the model's own (held once)
    pack_weights: bool = True
    # CPU, bf16, where the native 1-2-row kernel builds: a plain copy of the linear weights for it is kept
    # beside the packed one up to this size (SmolLM2's 0.27 GB: ~1.5x faster single-client projections);
    # larger models keep one copy
    small_batch_copy_mb: int = Field(1024, ge=0)
    # CPU: the decode-attention kernel built for this machine (app/engine/kernels; needs a C++ compiler,
    # else torch's SDPA), cached under cache_dir
    native_kernels: bool = True
    # CPU: torch's threads; 0 = the CPUs this process may use (its affinity mask, capped by the cgroup's CPU
    # quota: a pod's limit, not the node's cores)
    threads: int = Field(0, ge=0)
    # CPU: fewer threads while other processes keep the cores busy, all of them again after (a neighbour on
    # shared cores stalls every parallel region on its preempted thread)
    adaptive_threads: bool = True

    # Fine-tuning (OpenAI's files and fine_tuning.jobs endpoints). Files and jobs live in the store; a
    # training worker (`promptserve worker`) takes the queued jobs. `serve` starts one beside itself unless
    # training_worker is off (at scale: workers as their own Deployment, deploy/k8s/components/training-worker)
    training_worker: bool = True
    training_threads: int = Field(1, ge=1)  # the worker's torch threads: serving keeps the other cores
    training_nice: int = Field(19, ge=0, le=19)  # the worker's CPU priority: serving's threads run first
    training_gpu_memory_fraction: float = Field(0.25, gt=0, le=1)  # on a GPU: the worker's share of memory
    training_lease_seconds: float = Field(30.0, gt=0)  # a worker silent this long loses its job to another
    training_max_attempts: int = Field(3, ge=1)  # takes of a job (workers lost) before it fails
    training_poll_seconds: float = Field(1.0, gt=0)  # how often an idle worker looks for a queued job
    training_checkpoint_seconds: float = Field(60.0, gt=0)  # a checkpoint at least this often (and each epoch)
    files_max_mb: int = Field(64, ge=1)  # an uploaded training file's size...
    files_max_lines: int = Field(100_000, ge=1)  # ...and rows

    host: str = "127.0.0.1"
    port: int = 8000
    # HTTP connection limits (app/api/http_limits.py): header size, slow headers, stalled bodies, idle
    # keep-alive connections, and connections plus requests at once (more are answered 503)
    http_max_header_bytes: int = 64 * 1024
    http_header_timeout: float = 10.0
    http_body_timeout: float = 30.0
    http_body_min_rate: int = Field(1024, ge=0)  # bytes a second a body must average after 5 s; 0 = off
    http_keep_alive_timeout: float = 5.0
    http_max_connections: int = 2048
    warmup: bool = True


    @property
    def api_key_list(self) -> list[str]:
        return [k.strip() for k in self.api_keys.split(",") if k.strip()]

    @model_validator(mode="after")
    def _token_from_file(self):
        if self.admin_token_file is not None:
            self.admin_token = Path(self.admin_token_file).read_text().strip()
        return self


@lru_cache
def get_settings() -> Settings:
    return Settings()
