"""Load a YAML recipe into the typed `Recipe`: `defaults:` inheritance, `--set` overrides, explicit
environment interpolation, strict typing with typo suggestions, then validation and derived sizes.

Every problem is collected and reported together, each with its file:line (or `--set`), key path,
what was expected, and the nearest valid key for unknown keys.

    defaults: [../base/grpo.yaml]        # merged first, in order; this file wins
    model: {path: "${env:MODEL_DIR}/llama"}   # interpolation only where written, ${env:X:-default}
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import types
import typing
from typing import Any, Literal

import yaml

from megarl.config.errors import ConfigError, ConfigIssue
from megarl.config.recipe import ModelConfig, Recipe

Path = tuple  # key path, e.g. ("rollout", "n") or ("reward", "functions", 0, "name")
ENV_PATTERN = re.compile(r"\$\{env:([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def dotted(path: Path) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


class _Context:
    """Issues found so far and where each key came from."""

    def __init__(self):
        self.issues: list[ConfigIssue] = []
        self.locations: dict[Path, str] = {}

    def where(self, path: Path) -> str | None:
        for n in range(len(path), -1, -1):
            if path[:n] in self.locations:
                return self.locations[path[:n]]
        return None

    def add(self, path: Path, message: str) -> None:
        self.issues.append(ConfigIssue(dotted(path) or "<recipe>", message, self.where(path)))


# ---- YAML with line numbers -----------------------------------------------------------------
MAX_YAML_VALUES = 100_000
"""A recipe has hundreds of values; anchors and aliases that expand past this are refused (a few
hundred bytes of nested aliases can otherwise expand to millions of values)."""


class _TooLarge(Exception):
    pass


def _read_yaml(file: str, ctx: _Context, base: Path = ()) -> Any:
    with open(file, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        ctx.issues.append(ConfigIssue("<recipe>", f"not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}); "
                                      "save the recipe as UTF-8", file))
        return {}
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f"{file}:{mark.line + 1}" if mark else file
        ctx.issues.append(ConfigIssue("<recipe>", f"not valid YAML: {getattr(e, 'problem', e)}", line))
        return {}
    finally:
        loader.dispose()

    seen = [0]

    def walk(n, path):
        seen[0] += 1
        if seen[0] > MAX_YAML_VALUES:
            raise _TooLarge
        if isinstance(n, yaml.MappingNode):
            out = {}
            for k_node, v_node in n.value:
                key = loader.construct_object(k_node, deep=True)
                if not isinstance(key, str | int | float | bool):
                    ctx.issues.append(ConfigIssue(dotted(path) or "<recipe>", f"key {key!r} is not a name: recipe "
                                                  "keys are plain words", f"{file}:{k_node.start_mark.line + 1}"))
                    continue
                sub = path + (key,)
                if key in out:
                    ctx.locations[sub] = f"{file}:{k_node.start_mark.line + 1}"
                    ctx.add(sub, "duplicate key (YAML would silently keep only the last one)")
                ctx.locations[sub] = f"{file}:{k_node.start_mark.line + 1}"
                out[key] = walk(v_node, sub)
            return out
        if isinstance(n, yaml.SequenceNode):
            items = []
            for i, item in enumerate(n.value):
                ctx.locations[path + (i,)] = f"{file}:{item.start_mark.line + 1}"
                items.append(walk(item, path + (i,)))
            return items
        return loader.construct_object(n, deep=True)

    try:
        return {} if node is None else walk(node, base)
    except _TooLarge:
        ctx.issues.append(ConfigIssue("<recipe>", f"expands to more than {MAX_YAML_VALUES:,} values (anchors and "
                                      "aliases); a recipe is far smaller: remove the nested aliases", file))
        return {}


def _deep_merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in top.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _load_with_defaults(file: str, ctx: _Context, chain: tuple[str, ...] = ()) -> dict:
    file = os.path.abspath(file)
    if file in chain:
        ctx.issues.append(ConfigIssue("defaults", "inheritance cycle: " + " -> ".join(chain + (file,)), file))
        return {}
    if not os.path.isfile(file):
        ctx.issues.append(ConfigIssue("defaults" if chain else "<recipe>", f"file not found: {file}",
                                      chain[-1] if chain else None))
        return {}
    data = _read_yaml(file, ctx)
    if not isinstance(data, dict):
        ctx.issues.append(ConfigIssue("<recipe>", "a recipe must be a YAML mapping", file))
        return {}
    own_locations = {k: v for k, v in ctx.locations.items() if v.startswith(file + ":")}
    bases = data.pop("defaults", []) or []
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        ctx.issues.append(ConfigIssue("defaults", f"expected a recipe file name or a list of them, got {bases!r}",
                                      ctx.where(("defaults",)) or file))
        bases = []
    merged: dict = {}
    for b in bases:
        merged = _deep_merge(merged, _load_with_defaults(os.path.join(os.path.dirname(file), b), ctx,
                                                         chain + (file,)))
    ctx.locations.update(own_locations)  # this file's values win over its bases', so do its lines
    return _deep_merge(merged, data)


# ---- overrides and environment --------------------------------------------------------------
def _apply_overrides(data: dict, overrides: list[str], ctx: _Context) -> None:
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            ctx.issues.append(ConfigIssue(item, "an override must look like a.b.c=value", "--set"))
            continue
        path = tuple(key.strip().split("."))
        try:
            value = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError:
            value = text
        node = data
        for part in path[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[path[-1]] = value
        for replaced in [k for k in ctx.locations if len(k) > len(path) and k[:len(path)] == path]:
            del ctx.locations[replaced]  # keys under the overridden one now come from the override
        ctx.locations[path] = f"--set {item}"


def _interpolate(value: Any, path: Path, env: typing.Mapping[str, str], ctx: _Context) -> Any:
    if isinstance(value, dict):
        return {k: _interpolate(v, path + (k,), env, ctx) for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate(v, path + (i,), env, ctx) for i, v in enumerate(value)]
    if not isinstance(value, str) or "${" not in value:
        return value

    def repl(m):
        name, default = m.group(1), m.group(2)
        if name in env:
            return env[name]
        if default is not None:
            return default
        ctx.add(path, f"environment variable {name} is not set (write ${{env:{name}:-default}} for a default)")
        return m.group(0)

    return ENV_PATTERN.sub(repl, value)


# ---- typed construction ----------------------------------------------------------------------
def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    if origin is list:
        return f"a list of {_describe(typing.get_args(tp)[0])}"
    if origin is dict:
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


_INVALID = object()


def _coerce(tp: Any, value: Any, path: Path, ctx: _Context) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        candidates = [a for a in args if a is not type(None)]
        if len(candidates) == 1:
            return _coerce(candidates[0], value, path, ctx)
        for cand in candidates:
            trial = _Context()
            out = _coerce(cand, value, path, trial)
            if not trial.issues:
                return out
        ctx.add(path, f"expected {_describe(tp)}, got {value!r}")
        return _INVALID
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value in allowed and type(value) is type(allowed[allowed.index(value)]):
            return value
        hint = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1)
        ctx.add(path, f"expected {_describe(tp)}, got {value!r}" + (f" (did you mean {hint[0]!r}?)" if hint else ""))
        return _INVALID
    if dataclasses.is_dataclass(tp):
        return build(tp, value, path, ctx)
    if origin is list:
        if not isinstance(value, list):
            ctx.add(path, f"expected {_describe(tp)}, got {value!r}")
            return _INVALID
        (item_tp,) = typing.get_args(tp)
        return [_coerce(item_tp, v, path + (i,), ctx) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            ctx.add(path, f"expected a mapping, got {value!r}")
            return _INVALID
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-6" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    ctx.add(path, f"expected {_describe(tp)}, got {value!r}")
    return _INVALID


def build(cls: type, data: Any, path: Path, ctx: _Context) -> Any:
    """Construct dataclass `cls` from `data`, recording every problem in `ctx`."""
    if not isinstance(data, dict):
        ctx.add(path, f"expected a mapping for {cls.__name__}, got {data!r}")
        return _INVALID
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    settable = [n for n, f in fields.items() if not f.metadata.get("derived") and n not in ("derived", "source")]
    kwargs = {}
    for key, value in data.items():
        sub = path + (key,)
        if key not in settable:
            if key in fields or key == "dp":
                ctx.add(sub, "is derived from the rest of the recipe; remove it")
            else:
                hint = difflib.get_close_matches(str(key), settable, n=1, cutoff=0.6)
                ctx.add(sub, f"unknown key for {cls.__name__}" + (f"; did you mean {hint[0]!r}?" if hint
                        else f"; valid keys: {', '.join(settable)}"))
            continue
        kwargs[key] = _coerce(hints[key], value, sub, ctx)
    for name, f in fields.items():
        if name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            ctx.add(path + (name,), f"required key is missing (expected {_describe(hints[name])})")
            kwargs[name] = _INVALID
    if any(v is _INVALID for v in kwargs.values()):
        return _INVALID
    return cls(**kwargs)


def load_recipe(file: str, overrides: list[str] | tuple[str, ...] = (),
                env: typing.Mapping[str, str] | None = None, resolve: bool = True) -> Recipe:
    """Parse, type-check, validate and resolve a recipe; raises ConfigError listing every problem."""
    ctx = _Context()
    data = _load_with_defaults(file, ctx)
    _apply_overrides(data, list(overrides), ctx)
    data = _interpolate(data, (), os.environ if env is None else env, ctx)
    recipe = build(Recipe, data, (), ctx)
    if recipe is _INVALID or ctx.issues:
        raise config_error(ctx.issues)
    recipe.source = os.path.abspath(file)
    if resolve:
        from megarl.config.validate import resolve_recipe

        issues = resolve_recipe(recipe)
        for issue in issues:
            ctx.issues.append(dataclasses.replace(issue, location=issue.location or ctx.where(
                tuple(int(p) if p.isdigit() else p for p in re.split(r"[.\[\]]+", issue.key) if p))))
        if ctx.issues:
            raise config_error(ctx.issues)
    return recipe


MAX_RENDERED_ISSUES = 20


def config_error(issues: list[ConfigIssue], limit: int = MAX_RENDERED_ISSUES) -> ConfigError:
    """The ConfigError for `issues`: `.issues` keeps every one, but its message lists the first `limit`
    and counts the rest, so a recipe that is wrong everywhere (a file of the wrong kind) stays readable."""
    error = ConfigError(issues)
    if len(issues) > limit:
        shown = "\n".join(f"  - {i}" for i in issues[:limit])
        error.args = (f"{len(issues)} problem(s) in the configuration:\n{shown}\n"
                      f"  ... and {len(issues) - limit} more",)
    return error


def recipe_to_dict(recipe: Recipe) -> dict:
    """Plain-data form of a resolved recipe (written next to a run's outputs)."""
    return dataclasses.asdict(recipe)


def with_absolute_paths(recipe: Recipe, base: str | None = None) -> Recipe:
    """A copy of `recipe` whose file paths are absolute, relative ones taken from `base` (default: the
    current directory). The RL driver's workers and engines run on other nodes, in other working
    directories; a relative path would name another file there, or none. A model "path" that is
    not a local file (a hub id) is left as it is."""
    base = base or os.getcwd()

    def absolute(path: str | None, must_exist: bool = False) -> str | None:
        if not path or os.path.isabs(path) or (must_exist and not os.path.exists(os.path.join(base, path))):
            return path
        return os.path.normpath(os.path.join(base, path))

    def model(m: ModelConfig | None) -> ModelConfig | None:
        return m and dataclasses.replace(m, path=absolute(m.path, must_exist=True), tokenizer=absolute(m.tokenizer))

    r = dataclasses.replace(recipe, model=model(recipe.model), critic=model(recipe.critic))
    r.data = dataclasses.replace(r.data, train=absolute(r.data.train), eval=absolute(r.data.eval),
                                 rejected_path=absolute(r.data.rejected_path))
    resume = r.trainer.resume if r.trainer.resume in ("auto", "never") else absolute(r.trainer.resume)
    r.trainer = dataclasses.replace(r.trainer, output_dir=absolute(r.trainer.output_dir), resume=resume)
    if r.rollout is not None and r.rollout.multi_turn is not None:
        r.rollout = dataclasses.replace(r.rollout, multi_turn=dataclasses.replace(
            r.rollout.multi_turn, tools=absolute(r.rollout.multi_turn.tools)))
    if r.reward is not None and r.reward.reward_model is not None:
        r.reward = dataclasses.replace(r.reward, reward_model=dataclasses.replace(
            r.reward.reward_model, path=absolute(r.reward.reward_model.path, must_exist=True)))
    return r
