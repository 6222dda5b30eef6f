"""The one way in to megatron-core: every megarl module imports megatron names from here.

Why a gateway:
- Import order. The CPU compatibility layer (`cpu_compat.install()`) must patch megatron before its
  first import (the first patch stubs a module that `import megatron.core` itself pulls in). This
  module installs it and only then imports megatron, so importing a megatron name from here is
  always safe, in any process and in any order. ruff enforces it (TID251 bans `megatron` everywhere
  else; see ruff.toml).
- One place to see which megatron-core APIs megarl depends on, grouped by megatron package: what to
  check when upgrading megatron-core (cpu_compat.MEGATRON_VERSION_VERIFIED), including the private
  names marked below.

Importing this module imports torch and megatron-core and installs the CPU layer (process-wide).
Modules the driver process imports (trainers, workers, checkpoint.hf, ...) therefore import from
here inside functions only; modules that only ever run in a megatron rank import it at the top.
"""

from megarl.runtime import cpu_compat

cpu_compat.install()

# ---- parallel state and dist checkpointing (modules) --------------------------------------------
from megatron.core import dist_checkpointing, parallel_state

# ---- dist checkpointing internals: the streaming HF -> megatron converter (checkpoint/stream.py) --
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor
from megatron.core.dist_checkpointing.state_dict_utils import save_preprocess
from megatron.core.dist_checkpointing.strategies.torch import (
    MCoreSavePlanner,
    _replace_state_dict_keys_with_sharded_keys,  # private in megatron-core
    mcore_to_pyt_state_dict,
)
from megatron.core.dist_checkpointing.utils import extract_sharded_tensors

# ---- DDP and gradient finalisation ----------------------------------------------------------------
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.distributed.param_and_grad_buffer import shard_buffer  # tests/dist only

# ---- the GPT model and its layer specs ------------------------------------------------------------
from megatron.core.models.gpt import (
    GPTModel,
    gpt_layer_specs,  # tests: the TE spec's structure (TE parameter names)
)
from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
)

# ---- optimizer and LR schedule --------------------------------------------------------------------
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

# ---- sequence packing (THD) -----------------------------------------------------------------------
from megatron.core.packed_seq_params import PackedSeqParams

# ---- pipeline schedules ---------------------------------------------------------------------------
from megatron.core.pipeline_parallel import get_forward_backward_func

# ---- tensor parallelism: vocab-parallel CE, region mappings, the TP RNG tracker -------------------
from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region, vocab_parallel_cross_entropy
from megatron.core.tensor_parallel.mappings import (
    gather_from_sequence_parallel_region,
    reduce_from_tensor_model_parallel_region,
)
from megatron.core.tensor_parallel.random import get_cuda_rng_tracker, model_parallel_cuda_manual_seed

# ---- transformer config, specs, attention ---------------------------------------------------------
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.spec_utils import ModuleSpec

# ---- utilities ------------------------------------------------------------------------------------
from megatron.core.utils import get_batch_on_this_cp_rank

__all__ = [
    "DistributedDataParallel",
    "DistributedDataParallelConfig",
    "DotProductAttention",
    "GPTModel",
    "MCoreSavePlanner",
    "ModuleSpec",
    "OptimizerConfig",
    "OptimizerParamScheduler",
    "PackedSeqParams",
    "ShardedObject",
    "ShardedTensor",
    "TransformerConfig",
    "_replace_state_dict_keys_with_sharded_keys",
    "dist_checkpointing",
    "extract_sharded_tensors",
    "finalize_model_grads",
    "gather_from_sequence_parallel_region",
    "gather_from_tensor_model_parallel_region",
    "get_batch_on_this_cp_rank",
    "get_cuda_rng_tracker",
    "get_forward_backward_func",
    "get_gpt_layer_local_spec",
    "gpt_layer_specs",
    "get_gpt_layer_with_transformer_engine_spec",
    "get_megatron_optimizer",
    "mcore_to_pyt_state_dict",
    "model_parallel_cuda_manual_seed",
    "nested_values",
    "parallel_state",
    "reduce_from_tensor_model_parallel_region",
    "save_preprocess",
    "shard_buffer",
    "vocab_parallel_cross_entropy",
]
