"""Run one function on N local ranks joined in a torch.distributed group (gloo on CPU).

Used by the distributed tests, the converter at TP/PP > 1 and benchmarks. Each rank is a fresh
spawned process (no inherited OpenMP/thread state), gets one intra-op thread per core share,
installs the CPU compatibility layer before importing the function's module, joins the group
through a file store (no port races), and sends back its return value. The first failing rank's
traceback is raised in the caller and the other ranks are stopped, so a failure never turns into
a hang; a hang past `timeout` kills the group and reports which ranks were still running.
"""

from __future__ import annotations

import faulthandler
import importlib
import io
import multiprocessing as mp
import os
import queue
import tempfile
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any


class LocalGroupError(RuntimeError):
    pass


def _function_ref(fn: str | Callable) -> str:
    if isinstance(fn, str):
        return fn
    if "<locals>" in fn.__qualname__:
        raise ValueError(f"{fn.__qualname__} is not importable by name; define it at module level")
    return f"{fn.__module__}:{fn.__qualname__}"


def _resolve(ref: str) -> Callable:
    module, _, name = ref.partition(":")
    obj: Any = importlib.import_module(module)
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


def to_bytes(value: Any) -> bytes:
    # torch.save, not the queue's pickler: torch's multiprocessing reductions pass tensors as shared
    # file descriptors that vanish when the rank exits before the parent reads them.
    import torch

    from megarl.runtime.device import to_host

    buf = io.BytesIO()
    torch.save(to_host(value), buf)   # a rank's device tensors reach the parent on the host
    return buf.getvalue()


def from_bytes(data: bytes) -> Any:
    import torch

    return torch.load(io.BytesIO(data), weights_only=False, map_location="cpu")


def _isolated_entry(fn_ref, args, kwargs, results, env):
    os.environ.update(env)
    try:
        results.put((0, "ok", to_bytes(_resolve(fn_ref)(*args, **kwargs))))
    except BaseException:  # noqa: BLE001 - reported to the parent with the traceback
        results.put((0, "error", traceback.format_exc()))


def run_isolated(fn: str | Callable, args: tuple = (), kwargs: dict | None = None, timeout: float = 600.0,
                 env: dict[str, str] | None = None):
    """Call `fn` in one fresh spawned process with no process group and no megatron layer (e.g. a
    vLLM engine, which must not share a process with megatron's CUDA-as-CPU mode)."""
    ref = _function_ref(fn)
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    proc = ctx.Process(target=_isolated_entry, args=(ref, args, kwargs or {}, results, env or {}), daemon=True)
    proc.start()
    try:
        _, status, value = results.get(timeout=timeout)
    except queue.Empty:
        raise LocalGroupError(f"{ref}: timed out after {timeout:.0f}s") from None
    finally:
        proc.join(timeout=30)
        if proc.is_alive():
            proc.kill()
        results.close()
    if status == "error":
        raise LocalGroupError(f"{ref} failed:\n{value}")
    return from_bytes(value)


def _actor_entry(cls_ref, args, kwargs, conn, env):
    os.environ.update(env)
    try:
        obj = _resolve(cls_ref)(*args, **kwargs)
        conn.send(("ok", b""))
    except BaseException:  # noqa: BLE001 - reported to the parent with the traceback
        conn.send(("error", traceback.format_exc()))
        return
    while True:
        try:
            method, margs, mkwargs = conn.recv()
        except EOFError:
            return
        if method is None:
            conn.send(("ok", b""))
            return
        try:
            conn.send(("ok", to_bytes(getattr(obj, method)(*margs, **mkwargs))))
        except BaseException:  # noqa: BLE001 - reported to the parent with the traceback
            conn.send(("error", traceback.format_exc()))


class IsolatedActor:
    """An object living in its own spawned process with no process group and no megatron layer
    (e.g. a vLLM engine next to a megatron trainer group), driven by method calls: `call` waits
    for the result, `call_async(...).result()` lets the caller run something else meanwhile
    (another collective participant). A call past its timeout kills the process and raises."""

    def __init__(self, cls: str | Callable, args: tuple = (), kwargs: dict | None = None,
                 env: dict[str, str] | None = None, timeout: float = 600.0):
        self.ref = _function_ref(cls)
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_actor_entry, args=(self.ref, args, kwargs or {}, child, env or {}),
                                 daemon=True, name=f"actor:{self.ref}")
        self._proc.start()
        child.close()
        self._pending = None
        self._wait(timeout, "start")

    def _wait(self, timeout: float, what: str):
        if not self._conn.poll(timeout):
            self.kill()
            raise LocalGroupError(f"{self.ref}.{what}: no answer within {timeout:.0f}s (process killed)")
        try:
            status, value = self._conn.recv()
        except EOFError:
            raise LocalGroupError(f"{self.ref}.{what}: the process died (exit code {self._proc.exitcode})") from None
        if status == "error":
            raise LocalGroupError(f"{self.ref}.{what} failed:\n{value}")
        return from_bytes(value) if value else None

    def call_async(self, method: str, *args, timeout: float = 600.0, **kwargs) -> _PendingCall:
        if self._pending is not None:
            raise RuntimeError(f"{self.ref}: a call to {self._pending.method} is still pending")
        self._conn.send((method, args, kwargs))
        self._pending = _PendingCall(self, method, timeout)
        return self._pending

    def call(self, method: str, *args, timeout: float = 600.0, **kwargs):
        return self.call_async(method, *args, timeout=timeout, **kwargs).result()

    def kill(self) -> None:
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(timeout=5)

    def close(self, timeout: float = 30.0) -> None:
        if self._proc.is_alive() and self._pending is None:
            try:
                self._conn.send((None, (), {}))
                self._conn.poll(timeout)
            except (BrokenPipeError, OSError):
                pass
        self._proc.join(timeout=timeout)
        self.kill()
        self._conn.close()


class _PendingCall:
    def __init__(self, actor: IsolatedActor, method: str, timeout: float):
        self.actor, self.method, self.timeout = actor, method, timeout

    def result(self):
        try:
            return self.actor._wait(self.timeout, self.method)
        finally:
            self.actor._pending = None


def _rank_entry(rank, world_size, store_path, fn_ref, args, kwargs, results, threads, env, timeout):
    os.environ.update(env)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world_size))
    # A hung rank prints every thread's stack before the parent kills it.
    faulthandler.dump_traceback_later(max(timeout - 3, 1), exit=False)
    try:
        from megarl.runtime.quiet import quiet_third_party

        quiet_third_party()
        import torch

        torch.set_num_threads(threads)
        import torch.distributed as dist

        from megarl.runtime import cpu_compat
        from megarl.runtime.device import select_device

        cpu_compat.install()
        dist.init_process_group(backend=select_device().backend, init_method=f"file://{store_path}",
                                rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout))
        from megarl.runtime.strict_device import discipline

        with discipline():   # strict device mode (tests): a no-op otherwise
            value = _resolve(fn_ref)(*args, **kwargs)
        results.put((rank, "ok", to_bytes(value)))
    except BaseException:  # noqa: BLE001 - reported to the parent with the traceback
        results.put((rank, "error", traceback.format_exc()))
    finally:
        try:
            from megarl.runtime.distributed import destroy_distributed

            destroy_distributed()
        except Exception:  # noqa: BLE001 - best effort at exit
            pass


def run_local_group(
    fn: str | Callable,
    world_size: int,
    args: tuple = (),
    kwargs: dict | None = None,
    timeout: float = 300.0,
    env: dict[str, str] | None = None,
    threads: int | None = None,
) -> list[Any]:
    """Call `fn(*args, **kwargs)` on ranks 0..world_size-1; return their results in rank order.

    `fn` is a module-level function or a "module:function" string; `threads` is each rank's torch
    thread count (unset: the machine's usable CPUs shared out). Raises LocalGroupError with the
    failing rank's traceback, or on timeout.
    """
    ref = _function_ref(fn)
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    from megarl.runtime.device import threads_per_rank

    threads = threads_per_rank(world_size, threads)
    child_env = {"OMP_NUM_THREADS": str(threads), **(env or {})}
    with tempfile.TemporaryDirectory(prefix="megarl-group-") as tmp:
        store = os.path.join(tmp, "store")
        procs = [ctx.Process(target=_rank_entry, name=f"rank{r}", daemon=True,
                             args=(r, world_size, store, ref, args, kwargs or {}, results, threads,
                                   child_env, timeout))
                 for r in range(world_size)]
        for p in procs:
            p.start()
        out: dict[int, Any] = {}
        deadline = time.monotonic() + timeout
        try:
            while len(out) < world_size:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    missing = sorted(set(range(world_size)) - set(out))
                    raise LocalGroupError(f"{ref}: timed out after {timeout:.0f}s; ranks {missing} "
                                          "still running (their stacks are on stderr)")
                try:
                    rank, status, value = results.get(timeout=min(remaining, 1.0))
                except queue.Empty:
                    dead = [p for r, p in enumerate(procs) if r not in out and p.exitcode not in (None, 0)]
                    if dead:
                        time.sleep(0.5)  # its error report may still be in flight
                        if results.empty():
                            raise LocalGroupError(f"{ref}: {dead[0].name} died with exit code "
                                                  f"{dead[0].exitcode} without reporting") from None
                    continue
                if status == "error":
                    raise LocalGroupError(f"{ref} failed on rank {rank}:\n{value}")
                out[rank] = from_bytes(value)
            for p in procs:
                p.join(timeout=30)
        finally:
            for p in procs:
                if p.is_alive():
                    p.kill()
                    p.join(timeout=5)
            results.close()
        return [out[r] for r in range(world_size)]
