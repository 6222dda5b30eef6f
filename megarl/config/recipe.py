"""The recipe: one typed dataclass tree for every stage (sft, rm, dpo, kto, ppo, grpo).

YAML is parsed into these classes by `megarl.config.loader`, validated once by
`megarl.config.validate`, and every derived size (world size, dp, gradient accumulation, samples
and mini-batches per step) is computed there into `Recipe.derived`. Field docstrings are the
reference documentation of each key. Nothing here imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from megarl.config.parallel import ParallelConfig

Stage = Literal["sft", "rm", "dpo", "kto", "ppo", "grpo"]
RL_STAGES = ("ppo", "grpo")
PREFERENCE_STAGES = ("dpo", "kto")


@dataclass
class ModelShape:
    """Architecture facts validation and planning need. Read from the model's config.json when the
    path is local; otherwise from `model.shape_preset` or given here."""

    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_kv_heads: int
    ffn_hidden_size: int
    vocab_size: int
    max_position_embeddings: int
    num_experts: int | None = None
    moe_topk: int | None = None
    moe_ffn_hidden_size: int | None = None
    tie_embeddings: bool = False


@dataclass
class ModelConfig:
    path: str = ""
    """HF model directory/name or a converted megatron checkpoint directory."""
    tokenizer: str | None = None
    """Tokenizer directory (must exist); defaults to the model's own (the converted checkpoint's
    hf/ or `path`). Every tokenizer load goes through megarl.data.tokenizer.load_tokenizer."""
    trust_remote_code: bool = False
    """Let transformers and vLLM run Python code shipped with the model/tokenizer (off by default)."""
    architecture: Literal["llama", "mistral", "qwen2", "qwen3", "qwen3_moe", "mixtral"] | None = None
    """Filled from config.json when available."""
    shape_preset: str | None = None
    """Name of a known shape (see megarl.config.shapes) when config.json is not reachable."""
    shape: ModelShape | None = None
    dtype: Literal["bf16", "fp16", "fp32"] = "bf16"
    transformer_impl: Literal["auto", "local", "transformer_engine"] = "auto"
    """Layer implementation: TE on GPUs (required for FP8), megatron-core local on CPU."""
    fp8: Literal["e4m3", "hybrid"] | None = None
    fp8_recipe: Literal["delayed", "tensorwise", "mxfp8", "blockwise"] = "delayed"
    finetuning: Literal["full", "lora"] = "full"
    """lora is not implemented yet (refused at load)."""
    lora_rank: int = 0
    """Not implemented yet: anything but 0 is refused at load."""
    recompute: Literal["none", "selective", "full"] = "selective"
    """Activation recomputation: trades compute for activation memory."""


@dataclass
class DataConfig:
    train: str = ""
    """Training dataset (jsonl or parquet)."""
    eval: str | None = None
    format: Literal["auto", "jsonl", "parquet"] = "auto"
    kind: Literal["sft", "prompts", "preference", "kto"] | None = None
    """Row schema; defaults from the stage (sft/rm... see validate)."""
    on_bad_row: Literal["reject", "fail"] = "reject"
    """Rows that fail checks are written to `rejected_path` and reported, or stop the run."""
    rejected_path: str | None = None
    max_length: int | None = None
    """Token budget of one training sequence for sft/rm/dpo/kto (prompt + response)."""
    shuffle: bool = True
    seed: int = 1234


@dataclass
class MultiTurnConfig:
    tools: str | None = None
    """YAML file declaring the tools (OpenAI function schema + python callable)."""
    max_turns: int = 4
    tool_call_format: Literal["hermes"] = "hermes"
    max_total_tokens: int | None = None
    """Cap on prompt + all turns; defaults to max_prompt_length + max_response_length."""
    max_tool_output_tokens: int = 512
    loop: Literal["lock_step", "per_trajectory"] = "lock_step"
    """lock_step: every conversation advances one turn at a time together (one engine call per turn
    for the batch); per_trajectory: each conversation's next turn goes to the engine as soon as its
    tool results are back, turns of all conversations batched continuously, tool calls concurrent.
    The same tokens either way (rollout/agent.py). lock_step is the default because its engine
    batches do not depend on timing, so a run repeats exactly and resumes bitwise; per_trajectory's
    engine log-probs depend on which turns share an engine step (within 1e-5); it is the faster
    loop where tool calls take time."""


@dataclass
class WeightSyncConfig:
    """How new actor weights reach the engines after each update (megarl.sync)."""

    bucket_mb: int = 512
    """Tensors travel in buckets of at most this size; peak extra memory is about two buckets
    (plus the largest single tensor) on the sender and on each engine."""
    verify_logprobs: bool = False
    """After every sync, score fixed token sequences on the trainer and on every engine and fail
    the step if they differ by more than `logprob_tolerance` (per-bucket checksums are always on)."""
    logprob_tolerance: float = 1e-3
    """Largest allowed |trainer - engine| log-prob difference for verify_logprobs (fp32: ~1e-5;
    bf16 needs ~5e-2: the tiny GRPO run measures 0.016, tests/trainers/test_rl.py)."""
    timeout_s: float = 600.0
    """A sync that makes no progress for this long (a peer died) fails instead of waiting."""
    transport: Literal["auto", "broadcast", "shared_memory"] = "auto"
    """How the bytes travel (megarl.sync.transport). broadcast: over the sync group (NCCL/gloo),
    works across nodes. shared_memory: TP ranks write their shards into shared buffers the
    engines read in place (/dev/shm on CPU; CUDA IPC on GPUs, untested on hardware), one node
    only. auto (settled when the run starts, megarl.sync.choice): shared_memory on one CPU node
    without FP8, else broadcast."""


@dataclass
class RolloutConfig:
    engine: Literal["vllm"] = "vllm"
    engines: int = 1
    """Number of vLLM engines in the fleet."""
    engine_tp: int = 1
    """Tensor-parallel size of each engine (GPUs per engine)."""
    n: int = 1
    """Samples per prompt (the GRPO group size)."""
    temperature: float = 1.0
    eval_temperature: float | None = None
    """Sampling temperature of the held-out evaluation (trainer.eval_freq); unset = `temperature`,
    0 = greedy (what the policy's most likely answer does, not what the sampling policy does)."""
    eval_n: int = 1
    """Samples per held-out prompt; the eval metrics average over all of them (more samples, less
    noise in the eval curve: its standard error shrinks with sqrt(prompts × eval_n))."""
    top_p: float = 1.0
    top_k: int = -1
    max_prompt_length: int = 1024
    max_response_length: int = 1024
    gpu_memory_utilization: float = 0.6
    """Fraction of an engine GPU vLLM may use (weights + KV cache)."""
    kv_cache_bytes: int | None = None
    """Explicit KV-cache budget per engine (CPU engines need one)."""
    engine_cpu_threads: int | None = None
    """OpenMP threads of each CPU engine. Unset: with synchronous rollouts (the training ranks wait
    while the engines generate) the engines share their node's cores; when rollouts overlap
    training, or with cluster.cpu_pinning, each keeps its slot's share (PlacementMap.engine_cpu_threads)."""
    quantization: Literal["fp8"] | None = None
    """fp8: the engines run FP8 linear layers; the trainer quantizes weights while syncing (GPUs)."""
    weight_sync: WeightSyncConfig = field(default_factory=WeightSyncConfig)
    multi_turn: MultiTurnConfig | None = None


RewardComponent = Literal["task", "format", "efficiency", "safety", "process"]
"""Where a reward's weighted value is summed and logged (reward/<component>): "task" is what the run
is judged on; "process" is partial credit for intermediate steps (e.g. a correct tool call)."""


@dataclass
class RewardFunctionConfig:
    name: str
    weight: float = 1.0
    component: RewardComponent = "task"
    args: dict[str, Any] = field(default_factory=dict)


@dataclass
class RewardModelConfig:
    path: str
    type: Literal["full", "lora"] = "full"
    """lora is not implemented yet (refused at load)."""
    weight: float = 1.0
    component: RewardComponent = "task"


@dataclass
class RemoteRewardConfig:
    url: str
    weight: float = 1.0
    component: RewardComponent = "task"
    timeout_s: float = 30.0
    retries: int = 2
    max_concurrency: int = 16


@dataclass
class RewardConfig:
    functions: list[RewardFunctionConfig] = field(default_factory=list)
    reward_model: RewardModelConfig | None = None
    remote: RemoteRewardConfig | None = None

    @property
    def has_source(self) -> bool:
        return bool(self.functions or self.reward_model or self.remote)


@dataclass
class KLConfig:
    coef: float = 0.0
    """0 disables the KL term (and the reference model unless another consumer needs it)."""
    placement: Literal["loss", "reward"] = "loss"
    """reward needs coef > 0 (with 0 it would subtract nothing)."""
    estimator: Literal["k1", "k2", "k3"] = "k3"
    clamp: float | None = 10.0
    controller: Literal["fixed", "adaptive"] = "fixed"
    target: float | None = None
    """Adaptive controller: target KL per token."""
    horizon: int = 10000


@dataclass
class RolloutCorrectionConfig:
    mode: Literal["none", "tis", "sequence_is", "token_mask", "sequence_mask"] = "tis"
    """Train/rollout log-prob mismatch correction (on by default)."""
    threshold: float = 2.0


@dataclass
class OverlongConfig:
    """DAPO's handling of responses that hit the length limit."""

    mode: Literal["none", "filter", "shaping"] = "none"
    """filter: truncated samples are left out of the loss; shaping: a soft length penalty is added
    to the reward over the last `buffer` tokens before max_response_length."""
    buffer: int = 0
    penalty: float = 1.0


# The papers' defaults of each policy loss, filled in at load for the algorithm keys a recipe leaves
# unset; kept here so that validation stays torch-free. The clip values are the keyword defaults of
# megarl.algorithms.losses (a test keeps the two equal).
POLICY_LOSS_DEFAULTS: dict[str, dict[str, Any]] = {
    # Schulman et al. 2017, "Proximal Policy Optimization Algorithms"
    "ppo": {"clip_ratio_low": 0.2, "clip_ratio_high": 0.2, "loss_agg_mode": "token-mean"},
    # Zheng et al. 2025, "Group Sequence Policy Optimization"
    "gspo": {"clip_ratio_low": 3e-4, "clip_ratio_high": 4e-4, "loss_agg_mode": "seq-mean-token-mean"},
    # MiniMax 2025, "MiniMax-M1": no lower bound on the IS weight (1 − 1.0 = 0)
    "cispo": {"clip_ratio_low": 1.0, "clip_ratio_high": 0.28, "loss_agg_mode": "token-mean"},
}
# Recipe keys of `preference` each loss uses, with the paper's default for an unset key (SimPO,
# Meng et al. 2024: β = 2.0, γ = 0.5; the DPO family and KTO: β = 0.1). The stage rm trains with
# the Bradley–Terry loss, which uses none of them.
PREFERENCE_LOSS_OPTIONS: dict[str, dict[str, float]] = {
    "sigmoid": {"beta": 0.1, "label_smoothing": 0.0}, "robust": {"beta": 0.1, "label_smoothing": 0.1},
    "simpo": {"beta": 2.0, "simpo_gamma": 0.5}, "hinge": {"beta": 0.1}, "ipo": {"beta": 0.1}, "orpo": {"beta": 0.1},
    "kto": {"beta": 0.1},
}


@dataclass
class AlgorithmConfig:
    advantage_estimator: Literal["gae", "grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline", "remax"] = "grpo"
    """remax is not implemented yet (it needs a greedy baseline rollout; refused at load)."""
    norm_adv_by_std: bool = True
    """GRPO: divide by the group std (false = Dr.GRPO)."""
    policy_loss: Literal["ppo", "gspo", "cispo"] = "ppo"
    clip_ratio_low: float | None = None
    """Lower clip ε_low (the ratio's lower bound is 1 − ε_low): in [0, 1), for cispo [0, 1]; unset = the
    policy_loss's paper default (POLICY_LOSS_DEFAULTS), set at load."""
    clip_ratio_high: float | None = None
    """Upper clip ε_high (> clip_ratio_low is DAPO's clip-higher; below it is refused except for cispo,
    whose ε_low only drops the lower bound); unset = the paper default."""
    dual_clip: float | None = None
    """Dual-clip constant c > 1 for negative advantages (None = off)."""
    loss_agg_mode: Literal["token-mean", "seq-mean-token-sum", "seq-mean-token-mean",
                           "seq-mean-token-sum-norm"] | None = None
    """Unset = the policy_loss's paper default (POLICY_LOSS_DEFAULTS), set at load."""
    kl: KLConfig = field(default_factory=KLConfig)
    entropy_coef: float = 0.0
    rollout_correction: RolloutCorrectionConfig = field(default_factory=RolloutCorrectionConfig)
    gamma: float = 1.0
    lam: float = 1.0
    ppo_epochs: int = 1
    old_logprobs: Literal["auto", "recompute"] = "auto"
    """auto: when the update is exactly on-policy (ppo_epochs 1, one mini-batch per step, a rollout
    correction that only reweights, no KL in the reward) the old log-probs are the detached ones of
    the update's own forward (the ratio is 1 by construction) and the separate forward pass is
    skipped; recompute: always run that pass first."""
    value_clip: float | None = 0.2
    dynamic_sampling: bool = False
    """DAPO: drop groups whose rewards are all equal and refill."""
    dynamic_sampling_max_rounds: int = 3
    """Extra rollout rounds to refill dropped groups; if still short, uninformative groups fill
    the batch (they get zero advantage) so the batch size stays fixed."""
    overlong: OverlongConfig = field(default_factory=lambda: OverlongConfig())


@dataclass
class PreferenceConfig:
    loss_type: Literal["sigmoid", "hinge", "ipo", "robust", "orpo", "simpo", "kto"] = "sigmoid"
    beta: float | None = None
    """Strength of the implicit reward / KL regularisation; unset: the loss's paper default (simpo 2.0,
    the others 0.1; PREFERENCE_LOSS_OPTIONS). The rm stage does not use it."""
    label_smoothing: float | None = None
    """sigmoid: cDPO smoothing ε (unset: 0); robust: the label-flip rate ε (unset: 0.1). Refused
    (when not 0) for losses that do not use it; after load it is a number (0 = none)."""
    ftx: float = 0.0
    """Weight of an SFT term on the chosen response."""
    simpo_gamma: float | None = None
    """SimPO's target margin γ (unset: 0.5); refused for other losses (stays unset for them)."""
    kto_desirable_weight: float = 1.0
    kto_undesirable_weight: float = 1.0
    reference: Literal["auto", "model", "precomputed", "none"] = "auto"
    """auto: none for orpo/simpo, a frozen model copy otherwise."""
    margin: bool = False
    """Reward model: use the per-pair margin column in the Bradley-Terry loss."""


@dataclass
class OptimConfig:
    optimizer: Literal["adam"] = "adam"
    lr: float = 1e-6
    min_lr: float = 0.0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    lr_scheduler: Literal["constant", "cosine", "linear"] = "constant"
    warmup_steps: int = 0
    distributed_optimizer: bool = True
    critic_lr: float | None = None
    """PPO critic learning rate (defaults to lr)."""


@dataclass
class TrainerConfig:
    steps: int | None = None
    """Optimizer steps (RL: one step = one batch of prompts); or give `epochs`."""
    epochs: int | None = None
    prompts_per_step: int | None = None
    """RL: prompts sampled per step (each yields rollout.n samples)."""
    samples_per_step: int | None = None
    """sft/rm/dpo/kto: sequences (pairs for dpo/rm) per optimizer step."""
    samples_per_minibatch: int | None = None
    """RL: samples per optimizer update; a step has samples_per_step / samples_per_minibatch
    updates per ppo epoch. Defaults to all samples of the step (one update)."""
    micro_batch_per_rank: int = 1
    """Sequences one data-parallel rank processes per forward/backward."""
    save_freq: int = 0
    """Checkpoint every N steps (0 = only at the end and before stopping)."""
    eval_freq: int = 0
    """Evaluate on data.eval every N steps (0 = no periodic evaluation; preference stages still
    evaluate after the last step)."""
    resume: str = "auto"
    """auto (the newest checkpoint in output_dir that matches the manifest written at save; a damaged
    one is named and skipped), never, or a checkpoint path (it must exist when the recipe is loaded,
    and is refused if it does not match its manifest)."""
    max_steps_this_run: int | None = None
    """Stop (after checkpointing) once this invocation has taken this many steps; the schedule still
    targets `steps`. For time-limited allocations: the next run resumes where this one stopped."""
    output_dir: str = "runs/default"
    existing_run: Literal["refuse", "resume", "overwrite"] = "refuse"
    """What `megarl train` does when output_dir already holds a run whose resolved recipe differs
    from this one (or megarl outputs without a recipe): refuse (the default: nothing is written, the
    differing keys are listed), resume (continue that run with this recipe; the old one is kept as
    recipe.resolved.prev.yaml) or overwrite (delete that run's megarl outputs, nothing else in the
    directory, and start fresh). An identical recipe always resumes; keys that may change between
    invocations of one run (trainer.resume, max_steps_this_run, layout, ...) are listed in
    megarl.trainers.run_dir.SAME_RUN_KEYS."""
    seed: int = 1234
    rollout_mode: Literal["sync", "one_step_off", "async"] = "sync"
    """RL: sync (each step generates on the current weights, then trains); one_step_off (step k+1's
    rollouts are generated on step k's weights while step k trains: engines and trainers overlap,
    every sample after the first step is one weight version old and rollout correction reweights
    it; trainers/rl/ahead.py); async (a producer keeps the engines generating into a bounded
    buffer, weight syncs land between engine calls, samples at most max_staleness versions old;
    trainers/rl/producer.py)."""
    max_staleness: int = 1
    """RL, rollout_mode async: the most weight versions a trained sample may lag the weights being
    updated."""
    stale_policy: Literal["wait", "drop"] = "wait"
    """RL, rollout_mode async: wait (the producer starts a round only when its samples cannot exceed
    max_staleness: nothing is dropped) or drop (the producer runs ahead up to the buffer's capacity;
    groups over the bound are dropped, counted, and their prompts generated again)."""


@dataclass
class LoggingConfig:
    sinks: list[Literal["jsonl", "wandb", "tensorboard"]] = field(default_factory=lambda: ["jsonl"])
    project: str = "megarl"
    run_name: str | None = None
    wandb_mode: Literal["offline", "online", "disabled"] = "offline"
    samples_every: int = 10
    """Write sample trajectories every N steps."""


@dataclass
class PlacementConfig:
    mode: Literal["colocated", "separate"] = "colocated"
    """colocated: training and rollout share every GPU; separate: disjoint GPU pools (training,
    rollout, and the reward model's own when reward_model_gpus > 0). The RL driver places its Ray
    workers and engines by it (megarl.launch.placement; `megarl plan` prints the map). Colocated on
    GPUs the trainers and the engines take turns (trainers/rl/gangs.MemoryHandOff: trainers offloaded
    while the engines generate, engines asleep while the trainers train; not yet run on a GPU);
    colocated on CPU they stay resident together."""
    rollout_gpus: int = 0
    """GPUs reserved for rollout engines when mode=separate."""
    reward_model_gpus: int = 0


@dataclass
class ClusterConfig:
    nodes: int = 1
    gpus_per_node: int = 8
    gpu_type: str = "h100-80gb"
    """For `megarl plan` memory estimates (see megarl.config.plan.GPU_TYPES)."""
    device: Literal["auto", "cuda", "cpu"] = "auto"
    placement: PlacementConfig = field(default_factory=PlacementConfig)
    cpu_threads_per_rank: int | None = None
    """torch threads of each training rank (SFT/DPO/KTO/RM ranks; RL actor, reference, critic,
    reward model); unset = the CPUs this process may use divided by the training world size
    (runtime.device.threads_per_rank). Changes the floating-point reduction order, so it is also
    how to check that a result does not hang on it."""
    cpu_pinning: bool = False
    """CPU clusters, RL: pin each Ray worker and engine process (all its threads) to the core of its
    slot (slot d of a node -> the d-th CPU the process may use), so that separately placed roles do
    not compete for cores, as separate GPU pools do not (runtime.device.pin_to_slot)."""

    @property
    def total_gpus(self) -> int:
        return self.nodes * self.gpus_per_node


@dataclass
class Derived:
    """Sizes computed once at load; never set in YAML."""

    train_world_size: int = 0
    rollout_gpus: int = 0
    dp: int = 0
    samples_per_step: int = 0
    minibatches_per_step: int = 0
    samples_per_minibatch: int = 0
    grad_accumulation: int = 0
    """Micro-batches per data-parallel rank per optimizer update."""
    needs_reference: bool = False
    needs_critic: bool = False
    shape_source: str = ""


@dataclass
class Recipe:
    stage: Stage
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig | None = None
    reward: RewardConfig | None = None
    algorithm: AlgorithmConfig | None = None
    preference: PreferenceConfig | None = None
    critic: ModelConfig | None = None
    """PPO: the critic model (defaults to the actor's path with a value head)."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    derived: Derived = field(default_factory=Derived)
    source: str = ""
    """The recipe file this came from."""


def handoff(r: Recipe) -> bool:
    """Colocated RL on GPUs: the trainers and the engines take turns on each GPU (the rule `megarl
    plan` sizes memory by, validation refuses overlapping rollouts under, and the driver follows)."""
    return r.stage in RL_STAGES and r.cluster.placement.mode == "colocated" and r.cluster.device != "cpu"
