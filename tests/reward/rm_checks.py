"""Rank function: megatron reward-model scores of token sequences at a layout."""

from megarl.checkpoint.hf import load_converted
from megarl.config.parallel import ParallelConfig
from megarl.reward.rm_scorer import score_sequences


def rm_scores(ckpt_dir: str, parallel: dict, sequences: list[list[int]]):
    chunks, _, _ = load_converted(ckpt_dir, ParallelConfig(**parallel))
    return score_sequences(chunks, sequences)
