"""Rollout: the vLLM engine fleet, the multi-turn agent loop and the tools it calls."""
