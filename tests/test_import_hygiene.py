"""`import megarl` is cheap and device-neutral; the CPU runtime never loads GPU-only code."""

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest


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


def test_a_cpu_rank_imports_no_compiler_and_no_wandb():
    """A megatron rank on CPU starts without torch._dynamo/_inductor (megatron wraps kernels in
    torch.compile at import; the compile is deferred to a first call that never comes with fusions
    off) and without wandb (megatron's timers import it for a writer megarl never uses): ~2 s of CPU
    per rank. Deferred functions still compute, torch.compile is torch's own again afterwards, and
    wandb imports normally later (the logging rank needs it)."""
    out = run("import sys, torch; import megarl.runtime.megatron, megarl.workers.actor; "
              "heavy = sorted(m for m in ('torch._dynamo', 'torch._inductor', 'wandb') if m in sys.modules); "
              "f = sys.modules['megatron.core.jit'].jit_fuser(lambda x: x * 2, backend='eager'); "
              "before = 'torch._dynamo' in sys.modules; y = float(f(torch.tensor(3.0))); "
              "print(heavy, torch.compile.__module__, before, y, 'torch._dynamo' in sys.modules); "
              "import wandb; print(wandb.__name__)")
    assert out.splitlines()[-2:] == ["[] torch False 6.0 True", "wandb"], out


# ---- megatron has one way in: megarl.runtime.megatron -------------------------------------------
ROOT = Path(__file__).resolve().parents[1]
GATEWAY_EXEMPT = {"megarl/runtime/megatron.py", "megarl/runtime/cpu_compat.py", "tests/runtime/compat_checks.py"}


def ruff_check(source: str, filename: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "--output-format", "concise",
                           "--config", str(ROOT / "ruff.toml"), "--stdin-filename", filename, "-"],
                          input=source, capture_output=True, text=True, cwd=ROOT, timeout=60)


def test_ruff_bans_direct_megatron_imports():
    """The project's ruff config flags a direct megatron import anywhere under the repo (TID251),
    and not an import through the gateway: the rule cannot silently disappear."""
    for source in ("from megatron.core import parallel_state\n\nprint(parallel_state)\n",
                   "import megatron.core.transformer\n\nprint(megatron.core.transformer)\n"):
        for filename in ("megarl/x.py", "tests/x.py"):
            proc = ruff_check(source, filename)
            assert proc.returncode == 1 and "TID251" in proc.stdout and "megarl.runtime.megatron" in proc.stdout, (
                filename, source, proc.stdout, proc.stderr)
    proc = ruff_check("from megarl.runtime.megatron import parallel_state as ps\n\nprint(ps)\n", "megarl/x.py")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_only_the_gateway_imports_megatron():
    """Exemptions from the ban are exactly the gateway, the CPU layer (it patches megatron internals)
    and its per-patch checks; no other file imports megatron directly (the same rule as ruff's
    TID251, checked here too so that pytest alone catches it)."""
    config = tomllib.loads((ROOT / "ruff.toml").read_text())["lint"]
    assert "TID251" in config["select"] or "TID" in config["select"]
    exempt = {f for f, codes in config.get("per-file-ignores", {}).items() if {"TID251", "TID"} & set(codes)}
    assert exempt == GATEWAY_EXEMPT
    direct = []
    for top in ("megarl", "tests", "examples", "bench", "tools"):
        for path in sorted((ROOT / top).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            if rel in GATEWAY_EXEMPT:
                continue
            for node in ast.walk(ast.parse(path.read_text(), rel)):
                names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                         [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
                direct += [f"{rel}:{node.lineno} {n}" for n in names if n.split(".")[0] == "megatron"]
    assert direct == [], "import these through megarl.runtime.megatron:\n" + "\n".join(direct)


def test_driver_side_modules_import_no_megatron():
    """What the RL driver process imports stays megatron-free (and the CPU layer uninstalled): the
    driver, the workers package and role classes (Ray pickles them there), HF conversion calls."""
    out = run("import sys; import megarl.trainers.rl.driver, megarl.trainers, megarl.workers.actor, "
              "megarl.workers.critic, megarl.workers.scorer, megarl.checkpoint.hf, megarl.checkpoint.stream, "
              "megarl.models.hf_config, megarl.models.optim, megarl.models.packing, megarl.sync.sender; "
              "compat = sys.modules.get('megarl.runtime.cpu_compat'); "
              "print(sorted(m for m in sys.modules if m.startswith(('megatron', 'megarl.runtime.megatron'))), "
              "compat is None or compat._applied is None)")
    assert out.splitlines()[-1] == "[] True"


# ---- the megarl import graph: no cycles, layers depend one way ----------------------------------
def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """{megarl module: the megarl modules it imports}, at any depth (top level and inside functions).
    `from a.b import c` is an edge to a.b.c when that is a module, else to a.b; the implicit import
    of parent packages is not an edge (every submodule would otherwise 'import' its package)."""
    files = {module_name(p): p for p in (ROOT / "megarl").rglob("*.py")}

    def resolve(name: str) -> str | None:
        while name and name not in files:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for mod, path in files.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the package, one level up per extra dot
                    anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                    base = f"{anchor}.{base}" if base else anchor
                targets |= {f"{base}.{a.name}" for a in node.names}
        graph[mod] = {r for t in targets if t.split(".")[0] == "megarl" and (r := resolve(t)) and r != mod}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = 2
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_megarl_import_graph_has_no_cycles():
    graph = import_graph()
    assert "megarl.checkpoint.stream" in graph["megarl.checkpoint.hf"]  # imports inside functions count
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_find_cycle_reports_the_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def package_of(module: str) -> str:
    return ".".join(module.split(".")[:2])


# Known exceptions to the layer rules, each with its reason (a new one needs a decision, not an edit here).
LAYER_EXCEPTIONS = {
    ("megarl.config.validate", "megarl.reward.functions"):
        "validation checks reward.functions names against the (torch-free) reward-function registry",
}


@pytest.mark.parametrize("package, may_import", [
    ("megarl.config", {"megarl.config"}),
    ("megarl.algorithms", {"megarl.algorithms", "megarl.registry"}),
    ("megarl.report", {"megarl.report"}),   # reads what runs wrote; no training code
])
def test_lower_layers_import_only_themselves(package, may_import):
    graph = import_graph()
    bad = sorted(f"{m} -> {t}" for m, targets in graph.items() if package_of(m) == package for t in targets
                 if package_of(t) not in may_import and (m, t) not in LAYER_EXCEPTIONS)
    assert bad == [], f"{package} may import only {sorted(may_import)}:\n" + "\n".join(bad)


@pytest.mark.parametrize("package, must_not_import", [
    ("megarl.workers", {"megarl.trainers"}),
    ("megarl.rollout", {"megarl.sync", "megarl.trainers"}),
])
def test_layers_depend_one_way(package, must_not_import):
    graph = import_graph()
    bad = sorted(f"{m} -> {t}" for m, targets in graph.items() if package_of(m) == package for t in targets
                 if package_of(t) in must_not_import)
    assert bad == [], f"{package} must not import {sorted(must_not_import)}:\n" + "\n".join(bad)
