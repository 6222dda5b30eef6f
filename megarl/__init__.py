"""megarl: Megatron-core based RL post-training for large language models.

Importing the package is cheap and device-neutral: nothing here imports torch, megatron-core,
vLLM or Transformer Engine. Each stage package imports its heavy dependencies itself.
"""

__version__ = "0.1.0"
