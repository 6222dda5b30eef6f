"""Silence third-party noise in rank processes: megatron-core and torch.distributed warn about
TE/Apex being absent, deprecations and experimental modules on every import of every rank. Our
own warnings and errors are untouched; MEGARL_VERBOSE=1 keeps everything."""

from __future__ import annotations

import logging
import os
import warnings

NOISY_MODULES = r"(megatron|torch|megarl\.runtime\.cpu_compat)(\..*)?"


def quiet_third_party() -> None:
    if os.environ.get("MEGARL_VERBOSE"):
        return
    for category in (UserWarning, FutureWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category, module=NOISY_MODULES)
    logging.getLogger("megatron").setLevel(logging.ERROR)
