"""Model-parallel layout of one Megatron model group (actor, critic, reference or reward model).

`tp·pp·cp·dp = world_size`; experts are laid out independently as `etp·ep·edp·pp = world_size`
(megatron-core's "MoE parallel folding"). `dp` and `edp` are derived, never set by hand.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from megarl.config.errors import ConfigError, ConfigIssue


@dataclass(frozen=True)
class ParallelConfig:
    tp: int = 1
    """Tensor-parallel size (attention heads and MLP columns split across ranks)."""
    pp: int = 1
    """Pipeline-parallel size (layers split into stages)."""
    vpp: int | None = None
    """Virtual pipeline stages per rank (interleaved 1F1B schedule); needs pp > 1."""
    ep: int = 1
    """Expert-parallel size for MoE layers."""
    etp: int | None = None
    """Expert tensor-parallel size; None means the same as tp."""
    cp: int = 1
    """Context-parallel size (the sequence split across ranks inside attention)."""
    sp: bool = False
    """Sequence parallel: activations outside attention/MLP are split over the TP ranks."""
    world_size: int | None = field(default=None, compare=False, metadata={"derived": True})
    """Ranks in the group; filled in by `resolve` (from the cluster or torch.distributed)."""

    # ---- derived sizes -------------------------------------------------------------------
    @property
    def expert_tp(self) -> int:
        return self.tp if self.etp is None else self.etp

    @property
    def model_parallel_size(self) -> int:
        return self.tp * self.pp * self.cp

    @property
    def dp(self) -> int:
        """Data-parallel size, derived from the world size."""
        self._require_world()
        return self.world_size // self.model_parallel_size

    @property
    def expert_dp(self) -> int:
        self._require_world()
        return self.world_size // (self.expert_tp * self.ep * self.pp)

    def _require_world(self) -> None:
        if self.world_size is None:
            raise RuntimeError("ParallelConfig.world_size is unset; call resolve(world_size) first")

    # ---- validation ----------------------------------------------------------------------
    def issues(self, prefix: str = "parallel", num_experts: int | None = None) -> list[ConfigIssue]:
        """Every rule this layout breaks, each naming its key (`prefix.field`)."""
        out: list[ConfigIssue] = []

        def bad(key: str, msg: str) -> None:
            out.append(ConfigIssue(f"{prefix}.{key}", msg))

        for name in ("tp", "pp", "ep", "cp"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                bad(name, f"expected an integer >= 1, got {v!r}")
        if self.etp is not None and (not isinstance(self.etp, int) or self.etp < 1):
            bad("etp", f"expected an integer >= 1 or null (= tp), got {self.etp!r}")
        if self.vpp is not None:
            if not isinstance(self.vpp, int) or self.vpp < 1:
                bad("vpp", f"expected an integer >= 1 or null, got {self.vpp!r}")
            elif self.vpp > 1 and self.pp < 2:
                bad("vpp", f"virtual pipeline stages ({self.vpp}) need pp > 1 (pp is {self.pp})")
        if self.sp and self.tp == 1:
            bad("sp", "sequence parallel splits activations over the TP ranks; it needs tp > 1 "
                      "(set sp: false or raise tp)")
        if num_experts and self.tp > 1 and not self.sp:
            bad("sp", "MoE models with tp > 1 need sequence parallel (sp: true), as megatron-core requires")
        if num_experts and num_experts % self.ep:
            bad("ep", f"{num_experts} experts are not divisible by ep={self.ep}")
        if out:  # sizes below assume the integers are sane
            return out
        if self.world_size is not None:
            if self.world_size % self.model_parallel_size:
                bad("tp", f"world size {self.world_size} is not divisible by tp·pp·cp = "
                          f"{self.tp}·{self.pp}·{self.cp} = {self.model_parallel_size}")
            elif num_experts and self.world_size % (self.expert_tp * self.ep * self.pp):
                bad("ep", f"world size {self.world_size} is not divisible by etp·ep·pp = "
                          f"{self.expert_tp}·{self.ep}·{self.pp}")
        return out

    def resolve(self, world_size: int, num_experts: int | None = None) -> ParallelConfig:
        """A copy with `world_size` set, validated; raises ConfigError listing every problem."""
        resolved = replace(self, world_size=world_size)
        ConfigError.raise_if(resolved.issues(num_experts=num_experts))
        return resolved

    def describe(self) -> str:
        vpp = f" vpp={self.vpp}" if self.vpp else ""
        dp = f" dp={self.dp}" if self.world_size is not None else ""
        return (f"tp={self.tp} pp={self.pp}{vpp} cp={self.cp} ep={self.ep} etp={self.expert_tp}"
                f" sp={self.sp}{dp}")
