"""Rewards: rule-based functions by name, combined with recipe weights into a scalar while every
component (task, format, efficiency, safety) is kept; failures are marked per sample, never fatal."""
