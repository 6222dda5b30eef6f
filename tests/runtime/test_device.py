import pytest

from megarl.runtime.device import CPU, CUDA, DEVICE_ENV, select_device


def test_auto_picks_cuda_nccl_when_gpus_exist():
    assert select_device("auto", cuda_available=True) == CUDA
    assert CUDA.backend == "nccl" and CUDA.is_cuda


def test_auto_picks_cpu_gloo_without_gpus():
    assert select_device("auto", cuda_available=False) == CPU
    assert CPU.backend == "gloo" and not CPU.is_cuda


def test_cpu_can_be_forced_on_a_gpu_machine():
    assert select_device("cpu", cuda_available=True) == CPU


def test_cuda_request_without_gpu_says_what_to_do():
    with pytest.raises(RuntimeError, match=f"{DEVICE_ENV}=cpu"):
        select_device("cuda", cuda_available=False)


def test_environment_override(monkeypatch):
    monkeypatch.setenv(DEVICE_ENV, "cpu")
    assert select_device(cuda_available=True) == CPU
    monkeypatch.setenv(DEVICE_ENV, "tpu")
    with pytest.raises(ValueError, match="auto, cpu, cuda"):
        select_device()


def test_this_machine_runs_cpu_gloo():
    assert select_device() == CPU
    assert str(CPU.torch_device()) == "cpu"


def test_gpus_torch_cannot_use_are_an_error_not_a_cpu_run():
    with pytest.raises(RuntimeError, match="NVIDIA GPUs but torch .* cannot use them .* cluster.device: cpu"):
        select_device("auto", cuda_available=False, gpus_present=True)
    assert select_device("cpu", cuda_available=False, gpus_present=True) == CPU   # on purpose
    assert select_device("auto", cuda_available=False, gpus_present=False) == CPU


def test_megatron_ranks_on_gpus_keep_one_cuda_queue():
    from megarl.runtime.device import rank_env

    assert rank_env(CUDA) == {"CUDA_DEVICE_MAX_CONNECTIONS": "1"} and rank_env(CPU) == {}


def test_bf16_on_a_cpu_without_bf16_matmuls_is_warned_about():
    from megarl.runtime.device import bf16_on_cpu_warning, cpu_has_bf16_matmul

    epyc = "processor\t: 0\nflags\t\t: fpu sse sse2 avx2 avx512f avx512bw\n"
    sapphire = "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n"
    assert not cpu_has_bf16_matmul(epyc) and cpu_has_bf16_matmul(sapphire)
    message = bf16_on_cpu_warning("bf16", "cpu", epyc)
    assert "avx512_bf16" in message and "model.dtype: fp32" in message
    assert bf16_on_cpu_warning("bf16", "cpu", sapphire) is None      # hardware bf16: nothing to say
    assert bf16_on_cpu_warning("bf16", "cuda", epyc) is None         # GPUs compute bf16 natively
    assert bf16_on_cpu_warning("fp32", "cpu", epyc) is None
    # this machine: the answer follows its own flags
    flags = open("/proc/cpuinfo").read()
    assert (bf16_on_cpu_warning("bf16", "cpu") is None) == ("avx512_bf16" in flags or "amx_bf16" in flags)
