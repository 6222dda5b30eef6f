"""Checkpoints: megatron dist-checkpoint save/resume (any layout in, any layout out) and, later,
HF <-> Megatron conversion."""
