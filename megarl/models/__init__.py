"""Megatron-core models: layer specs (local on CPU, Transformer Engine on GPU), builders, heads.

Submodules import megatron-core after installing the runtime's CPU compatibility layer.
"""
