"""Scalar heads that replace the LM output layer: the critic's per-token value and the reward
model's score (read at the last token). One weight row [1, hidden], replicated on every TP rank.

With sequence parallelism the hidden states arrive split over the TP ranks; the head gathers the
sequence first. Its backward *splits* the gradient (tensor_parallel_output_grad=False) because the
loss is replicated on every TP rank, so each rank's gradient of the gathered tensor is already
complete. Both heads are the `score.weight` of HF's *ForTokenClassification /
*ForSequenceClassification (num_labels=1) checkpoints.
"""

from __future__ import annotations

import math

import torch

from megarl.runtime.megatron import gather_from_sequence_parallel_region

LM, SCALAR, SCALAR_WITH_BIAS = "lm", "scalar", "scalar_bias"


class ScalarHead(torch.nn.Module):
    def __init__(self, hidden_size: int, sequence_parallel: bool, dtype: torch.dtype, bias: bool = False,
                 init_std: float | None = None):
        super().__init__()
        self.sequence_parallel = sequence_parallel
        self.weight = torch.nn.Parameter(torch.empty(1, hidden_size, dtype=dtype))
        torch.nn.init.normal_(self.weight, std=init_std if init_std is not None else 1 / math.sqrt(hidden_size))
        self.bias = torch.nn.Parameter(torch.zeros(1, dtype=dtype)) if bias else None

    def forward(self, hidden_states, weight=None, runtime_gather_output=None):
        if self.sequence_parallel:
            hidden_states = gather_from_sequence_parallel_region(hidden_states, tensor_parallel_output_grad=False)
        return torch.nn.functional.linear(hidden_states, self.weight, self.bias), None


def attach_scalar_head(model, config, bias: bool = False) -> None:
    """Swap a last-stage GPTModel's output layer for a ScalarHead (values: model(...) -> [b, s, 1]).
    HF token classification heads carry a bias, sequence classification (reward) heads do not."""
    if getattr(model, "post_process", False):
        model.output_layer = ScalarHead(config.hidden_size, config.sequence_parallel, config.params_dtype, bias)
