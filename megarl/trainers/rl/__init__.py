"""GRPO / PPO-family RL on Ray: `driver.py` is the loop, `step.py` its phases as plain functions,
`gangs.py` the driver's handles on worker gangs, engines and the weight sync."""

from __future__ import annotations


def run(recipe) -> int:
    from megarl.trainers.rl.driver import run as run_driver

    return run_driver(recipe)
