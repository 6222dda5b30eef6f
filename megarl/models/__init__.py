"""Megatron-core models: layer specs (local on CPU, Transformer Engine on GPU), builders, heads.

Submodules import megatron-core through `megarl.runtime.megatron` (which installs the runtime's CPU
compatibility layer first).
"""
