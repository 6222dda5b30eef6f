"""The one place a recipe's tokenizer is loaded, so `model.tokenizer` and `model.trust_remote_code`
mean the same thing to every stage, the rollout engines and `megarl data check`.

transformers is imported only when a tokenizer is actually loaded (validation stays torch-free).
"""

from __future__ import annotations

from megarl.config.recipe import ModelConfig


def tokenizer_dir(model_cfg: ModelConfig, fallback_dir: str) -> str:
    """`model.tokenizer` when set, else `fallback_dir` (the converted checkpoint's hf/ or model.path)."""
    return model_cfg.tokenizer or fallback_dir


def load_tokenizer(model_cfg: ModelConfig, fallback_dir: str):
    """The recipe's tokenizer: from `tokenizer_dir(model_cfg, fallback_dir)`, running the model's own
    code only when `model.trust_remote_code` allows it."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir(model_cfg, fallback_dir),
                                         trust_remote_code=model_cfg.trust_remote_code)
