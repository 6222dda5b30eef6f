"""Pure parts of the RL loop: aggregation weights reproduce every loss aggregation exactly, and the
trajectory batch puts each generated token's mask and rollout log-prob on its label position."""

import pytest
import torch

from megarl.algorithms.losses import LOSS_AGGREGATIONS, aggregate_loss, loss_weights
from megarl.rollout.agent import Trajectory
from megarl.rollout.batch import TrajectoryBatch


@pytest.mark.parametrize("mode", LOSS_AGGREGATIONS)
def test_loss_weights_reproduce_each_aggregation_across_any_split(mode):
    g = torch.Generator().manual_seed(0)
    loss = torch.randn(8, 12, generator=g)
    mask = (torch.rand(8, 12, generator=g) > 0.3).float()
    mask[3] = 0.0  # a sample with nothing to train on contributes nothing
    w = loss_weights(mask, mode, norm_length=12)
    want = aggregate_loss(loss, mask, mode, norm_length=12)
    assert torch.allclose((w * loss).sum() / mask.sum(), want, atol=1e-6)
    # megatron sums Σ w·ℓ over micro-batches / DP ranks and divides by the total token count once
    halves = sum((w[i:i + 4] * loss[i:i + 4]).sum() for i in (0, 4)) / mask.sum()
    assert torch.allclose(halves, want, atol=1e-6)


def test_batch_aligns_masks_and_logprobs_with_labels():
    a = Trajectory([1, 2, 3], [10, 11, 12, 13], [1, 1, 0, 1], [-0.1, -0.2, 0.0, -0.4])
    b = Trajectory([1, 2], [20], [1], [-0.5])
    batch = TrajectoryBatch.from_trajectories([a, b], [0, 0], pad_id=0, multiple=4)
    assert batch.tokens.shape == (2, 9) and batch.mask.shape == (2, 8)   # S-1 = 8, a multiple of 4
    assert batch.tokens[0, :7].tolist() == [1, 2, 3, 10, 11, 12, 13]
    # label position t predicts token t+1: response token j of a is at p + j, label position p + j - 1
    assert batch.mask[0].tolist() == [0, 0, 1, 1, 0, 1, 0, 0]
    assert torch.allclose(batch.rollout_logp[0, 2:6], torch.tensor([-0.1, -0.2, 0.0, -0.4]))
    assert batch.mask[1].tolist() == [0, 1, 0, 0, 0, 0, 0, 0]
    assert batch.response_lengths == [4, 1] and batch.prompt_lengths == [3, 2]


def test_request_seeds_differ_per_prompt_and_are_reproducible():
    from megarl.rollout.engine import request_seed

    a, b = request_seed(7, [1, 2, 3]), request_seed(7, [1, 2, 4])
    assert a != b and a == request_seed(7, [1, 2, 3]) and request_seed(8, [1, 2, 3]) != a
    assert request_seed(None, [1, 2, 3]) is None and 0 <= a < 2**31 - 1
