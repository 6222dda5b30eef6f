"""`import megarl` is cheap and device-neutral; the CPU runtime never loads GPU-only code."""

import subprocess
import sys


def run(code: str) -> str:
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def test_import_megarl_imports_no_torch():
    out = run("import sys, megarl, megarl.config, megarl.runtime; "
              "heavy = ('torch', 'megatron', 'vllm', 'transformer_engine', 'ray'); "
              "print(sorted(m for m in heavy if m in sys.modules))")
    assert out == "[]"


def test_cpu_runtime_loads_no_gpu_only_code():
    out = run("import sys; import megarl.runtime.distributed, megarl.models.gpt, megarl.models.train, "
              "megarl.checkpoint.dist; import torch; "
              "print(torch.cuda.is_available(), sorted(m for m in sys.modules if m.split('.')[0] in "
              "('transformer_engine', 'apex', 'triton', 'flash_attn')))")
    assert out == "False []"


def test_validating_a_recipe_imports_no_torch():
    out = run("import sys; from megarl.cli import main; code = main(['validate', 'configs/grpo_70b.yaml']); "
              "print(code, 'torch' in sys.modules)")
    assert out.splitlines()[-1] == "0 False"
