"""vLLM arguments per device, resolved in one place (rollout/engine.py: vllm_kwargs); no vLLM needed."""

from megarl.rollout.engine import EngineConfig, engine_worker_env, vllm_kwargs


def test_cpu_engines_run_eager_with_an_unchunked_prefill_budget():
    kw = vllm_kwargs(EngineConfig("m", max_model_len=512))
    assert kw["enforce_eager"] is True and kw["max_num_seqs"] == 64
    assert kw["max_num_batched_tokens"] == 64 * 512 and kw["kv_cache_memory_bytes"] == 256 << 20


def test_gpu_engines_use_cuda_graphs_and_vllms_own_token_budget():
    kw = vllm_kwargs(EngineConfig("m", max_model_len=4096, kv_cache_bytes=None, device="cuda"))
    assert kw["enforce_eager"] is False and kw["max_num_seqs"] == 256
    assert "max_num_batched_tokens" not in kw and kw["gpu_memory_utilization"] == 0.6
    assert vllm_kwargs(EngineConfig("m", device="cuda", enforce_eager=True))["enforce_eager"] is True


def test_sleep_mode_only_for_a_colocated_gpu_handoff():
    assert vllm_kwargs(EngineConfig("m", device="cuda", sleep_mode=True))["enable_sleep_mode"] is True
    assert "enable_sleep_mode" not in vllm_kwargs(EngineConfig("m", device="cuda"))


def test_engine_tensor_parallelism_uses_rays_executor_on_gpus_and_processes_on_cpu():
    """GPU workers go to the engine's own bundles (Ray executor, bundle indices and per-worker
    share handed over in the environment); CPU workers are processes on the engine's node, with
    vLLM's NUMA thread binding off (a CPU slot is not a NUMA node: vLLM refuses to start)."""
    assert vllm_kwargs(EngineConfig("m"))["distributed_executor_backend"] == "uni"
    gpu = EngineConfig("m", device="cuda", tensor_parallel_size=4)
    assert vllm_kwargs(gpu)["distributed_executor_backend"] == "ray"
    assert engine_worker_env(gpu, [4, 5, 6, 7], 0.5) == {"VLLM_RAY_BUNDLE_INDICES": "4,5,6,7",
                                                          "VLLM_RAY_PER_WORKER_GPUS": "0.5"}
    cpu = EngineConfig("m", tensor_parallel_size=2)
    assert vllm_kwargs(cpu)["distributed_executor_backend"] == "mp"
    assert engine_worker_env(cpu, [2, 3], 1.0) == {"VLLM_CPU_OMP_THREADS_BIND": "nobind"}
    assert engine_worker_env(EngineConfig("m", device="cuda"), [0], 1.0) == {}
