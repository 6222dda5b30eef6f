"""Where every process of an RL run goes: the recipe's `cluster`, `parallel` and `rollout` turned
into a map of slots (one per GPU, or per CPU share on CPU clusters), node-ordered.

    slots          node-major: slot g is device g % per_node of node g // per_node
    training pool  the first train_world_size slots: actor rank r on slot r, and the reference,
                   critic (and reward model, without GPUs of its own) ranks beside it on the same
                   slot: they run one after another in a step
    rollout        engine e on engine_tp consecutive slots inside one node: from slot 0 when
                   colocated (sharing the training slots), after the training pool when separate
    reward model   its own reward_model_gpus slots after the rollout pool, when the recipe has them

Every process on a slot asks for an equal share of it (Ray's fractional GPUs / CPUs), so a slot is
never oversubscribed. Tensor-parallel groups (megatron's consecutive ranks, and an engine's
engine_tp) never span nodes: a layout where they would is refused here, by name.

`megarl plan`, `megarl launch --dry-run` and the run itself print `PlacementMap.lines()`; the run
builds its Ray placement group from the same map (`megarl.trainers.rl.gangs`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from megarl.workers import ACTOR, CRITIC, REFERENCE, REWARD_MODEL

ROLLOUT = "rollout"   # the engines; the megatron gangs keep their worker role names


class PlacementError(ValueError):
    """The recipe's layout cannot be placed on its cluster."""


@dataclass(frozen=True, order=True)
class Slot:
    node: int
    device: int
    """The accelerator index on its node (GPU id; on CPU clusters, the CPU share's index)."""

    def __str__(self) -> str:
        return f"node {self.node} dev {self.device}"


@dataclass
class PlacementMap:
    nodes: int
    per_node: int
    mode: str
    accelerator: str
    """"gpu" or "cpu": what a slot is."""
    roles: dict[str, list[Slot]] = field(default_factory=dict)
    """Role -> the slot of each of its ranks, in rank order (training gangs)."""
    engines: list[list[Slot]] = field(default_factory=list)
    """Engine e -> the slots of its engine_tp ranks."""

    @property
    def slots(self) -> list[Slot]:
        return [Slot(n, d) for n in range(self.nodes) for d in range(self.per_node)]

    def residents(self, slot: Slot) -> list[str]:
        """Which roles have a process on `slot` ("rollout" for an engine rank)."""
        names = [role for role, slots in self.roles.items() if slot in slots]
        return names + [ROLLOUT] * sum(slot in e for e in self.engines)

    def share(self, slot: Slot) -> float:
        """The fraction of `slot` each of its processes asks for."""
        return 1.0 / max(1, len(self.residents(slot)))

    def local_rank(self, role: str, rank: int) -> int:
        """Rank `rank` of `role` counted among that gang's ranks on the same node (torchrun's LOCAL_RANK)."""
        slots = self.roles[role]
        return sum(s.node == slots[rank].node for s in slots[:rank])

    def used_slots(self) -> list[Slot]:
        return [s for s in self.slots if self.residents(s)]

    def engine_cpu_threads(self, engine: int, alone: bool, cores_per_slot: int) -> int | None:
        """OpenMP threads of CPU engine `engine` (one rank), or None to keep its share of its slot
        (Ray's default). `alone`: no training rank computes while the engines generate
        (synchronous rollouts), so every core of the engine's node is free then, shared out among
        that node's engines; rollouts that overlap training keep the slot's share."""
        group = self.engines[engine]
        if self.accelerator != "cpu" or not alone or len(group) != 1:
            return None
        neighbours = sum(g[0].node == group[0].node for g in self.engines)
        return max(1, self.per_node * cores_per_slot // neighbours)

    def lines(self) -> list[str]:
        """The map as printed by `megarl plan`, `launch --dry-run` and the run."""
        unit = "GPU" if self.accelerator == "gpu" else "CPU slot"
        out = [f"{self.nodes} node(s) × {self.per_node} {unit}(s), {self.mode}:"]
        for role, slots in self.roles.items():
            out.append(f"  {role:<13} " + _ranges(slots))
        for e, slots in enumerate(self.engines):
            out.append(f"  engine {e:<6} " + _ranges(slots))
        rows = [" ".join(f"{d}:{'+'.join(_short(r) for r in self.residents(Slot(n, d))) or '-'}"
                         for d in range(self.per_node)) for n in range(self.nodes)]
        n = 0
        while n < self.nodes:  # identical consecutive nodes on one line
            last = n
            while last + 1 < self.nodes and rows[last + 1] == rows[n]:
                last += 1
            out.append(f"  {'node ' + str(n) if last == n else f'nodes {n}-{last}'}: {rows[n]}")
            n = last + 1
        out.append("  (A actor, R reference, C critic, M reward model, E engine; each process on a slot asks "
                   "for an equal share of it)")
        return out


def _short(role: str) -> str:
    return {ACTOR: "A", REFERENCE: "R", CRITIC: "C", REWARD_MODEL: "M", ROLLOUT: "E"}[role]


def _ranges(slots: list[Slot]) -> str:
    """"ranks 0-15 on nodes 0-1, dev 0-7 each; ranks 16-19 on node 2, dev 0-3": runs of whole
    consecutive device ranges, merged across consecutive nodes that hold the same range."""
    runs, start = [], 0  # (first rank, last rank, node, first dev, last dev)
    for i in range(1, len(slots) + 1):
        if i == len(slots) or slots[i].node != slots[i - 1].node or slots[i].device != slots[i - 1].device + 1:
            runs.append([start, i - 1, slots[start].node, slots[start].node, slots[start].device, slots[i - 1].device])
            start = i
    merged = []
    for run in runs:
        last = merged[-1] if merged else None
        if last and last[1] + 1 == run[0] and last[3] + 1 == run[2] and last[4:] == run[4:]:
            last[1], last[3] = run[1], run[2]
        else:
            merged.append(run)
    parts = []
    for r0, r1, n0, n1, d0, d1 in merged:
        ranks = f"rank {r0}" if r0 == r1 else f"ranks {r0}-{r1}"
        nodes = f"node {n0}" if n0 == n1 else f"nodes {n0}-{n1}"
        devs = (f"dev {d0}" if d0 == d1 else f"dev {d0}-{d1}") + (" each" if n0 != n1 else "")
        parts.append(f"{ranks} on {nodes}, {devs}")
    return "; ".join(parts)


def build_placement(recipe) -> PlacementMap:
    """The map for a validated recipe (derived sizes set). Raises PlacementError naming the field."""
    c, d, p = recipe.cluster, recipe.derived, recipe.parallel
    accelerator = "cpu" if c.device == "cpu" else "gpu"
    m = PlacementMap(c.nodes, c.gpus_per_node, c.placement.mode, accelerator)
    slots = m.slots
    train = d.train_world_size
    if train > len(slots):
        raise PlacementError(f"parallel: {train} training ranks need more than the cluster's {len(slots)} slots")
    _check_groups("parallel.tp", [slots[i:i + p.tp] for i in range(0, train, p.tp)], c.gpus_per_node)
    m.roles[ACTOR] = slots[:train]
    if d.needs_reference:
        m.roles[REFERENCE] = slots[:train]
    if d.needs_critic:
        m.roles[CRITIC] = slots[:train]
    next_free = train if c.placement.mode == "separate" else 0
    if recipe.rollout is not None:
        ro = recipe.rollout
        need = ro.engines * ro.engine_tp
        if next_free + need > len(slots):
            raise PlacementError(f"rollout.engines: {ro.engines} engines × engine_tp {ro.engine_tp} need slots "
                                 f"{next_free}-{next_free + need - 1}, the cluster has {len(slots)}")
        m.engines = [slots[next_free + e * ro.engine_tp: next_free + (e + 1) * ro.engine_tp] for e in range(ro.engines)]
        _check_groups("rollout.engine_tp", m.engines, c.gpus_per_node)
        next_free = train + (c.placement.rollout_gpus if c.placement.mode == "separate" else 0)
    rm = recipe.reward.reward_model if recipe.reward is not None else None
    if rm is not None:
        own = c.placement.reward_model_gpus if c.placement.mode == "separate" else 0
        if own and own != train:
            raise PlacementError(f"cluster.placement.reward_model_gpus: the reward model runs with the training "
                                 f"layout ({train} ranks), so it needs {train} GPUs of its own or 0 (then it shares "
                                 f"the training GPUs), not {own}")
        m.roles[REWARD_MODEL] = slots[next_free: next_free + train] if own else slots[:train]
    return m


def _check_groups(key: str, groups: list[list[Slot]], per_node: int) -> None:
    """A tensor-parallel group talks at every layer: each must sit inside one node."""
    for group in groups:
        if len({s.node for s in group}) > 1:
            raise PlacementError(f"{key}: the group on {group[0]} .. {group[-1]} would span nodes of {per_node} "
                                 f"slots; use a {key.split('.')[1]} that divides {per_node} (and, for engines, "
                                 "a training pool that ends on a node boundary)")
