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
