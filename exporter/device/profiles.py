"""Device profiles: the hardware, runtime and budget of each deployment target.

Built-in profiles are TOML files in ``device_profiles/`` (one per device, the file stem is the name);
users may also pass a path to their own ``.toml`` with the same schema.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from exporter.errors import ExporterError, ProfileError
from exporter.graph.onnxruntime_releases import OLDEST, parse_release
from exporter.graph.onnxruntime_releases import name as release_name

# A checkout's device_profiles/ beside the package; an installed wheel carries them as exporter/device_profiles
_CHECKOUT_PROFILES = Path(__file__).resolve().parents[2] / "device_profiles"
PROFILES_DIR = _CHECKOUT_PROFILES if _CHECKOUT_PROFILES.is_dir() else Path(__file__).resolve().parents[1] / "device_profiles"
PROFILES_DIR_ENV = "EXPORTER_PROFILES_DIR"  # read at each call, so tests and users can point elsewhere

WEIGHT_PRECISIONS = ("fp32", "fp16", "int8", "int4")
COMPUTE_PRECISIONS = ("fp32", "fp16", "int8")
HARDWARE_FIGURES = ("memory_gb", "memory_bandwidth_gbs", "compute_tflops")


@dataclass(frozen=True)
class Hardware:
    memory_gb: float
    memory_bandwidth_gbs: float
    compute_tflops: dict[str, float]  # precision -> peak TFLOP/s (int8: TOPS)
    sources: dict[str, str]  # figure name -> where it comes from
    # Measured profiles only: ONNX Runtime decode costs (exporter.device.cost_model.DECODE_COST_KEYS), measured by
    # measure_host(); other profiles use exporter.device.cost_model's labelled estimates.
    decode_costs: dict[str, float] = dataclasses.field(default_factory=dict)


@dataclass(frozen=True)
class Runtime:
    execution_providers: tuple[str, ...]
    weight_precision: str
    # Ranks are rounded to multiples of this: matrix kernels run full tiles only at such sizes.
    rank_multiple: int = 16
    # Provider name -> its ONNX Runtime provider options (strings), for every session on the device
    # (runtime_tests, docs/deploying.md's app snippets), e.g. CUDA's attention kernel choice.
    provider_options: dict[str, dict[str, str]] = dataclasses.field(default_factory=dict)
    # The ONNX Runtime release the app bundles ("1.20"): the writer emits only what it runs. None: the newest.
    onnxruntime_version: str | None = None


@dataclass(frozen=True)
class Budget:
    model_ram_mb: float
    decode_ms_per_token: float
    prefill_ms: float
    prefill_prompt_tokens: int
    max_context: int


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    description: str
    aliases: tuple[str, ...]
    measured: bool
    hardware: Hardware
    runtime: Runtime
    budget: Budget
    path: Path

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serializable copy, for manifests."""
        d = dataclasses.asdict(self)
        d["aliases"] = list(self.aliases)
        d["runtime"]["execution_providers"] = list(self.runtime.execution_providers)
        d["path"] = str(self.path)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DeviceProfile:
        """The profile `to_dict` wrote (a manifest's `profile`)."""
        runtime = {**d["runtime"], "execution_providers": tuple(d["runtime"]["execution_providers"])}
        return cls(name=d["name"], description=d["description"], aliases=tuple(d["aliases"]),
                   measured=bool(d["measured"]), hardware=Hardware(**d["hardware"]), runtime=Runtime(**runtime),
                   budget=Budget(**d["budget"]), path=Path(d["path"]))


# ---------------------------------------------------------------------------------------------
# Validation: every error names the file and the dotted field.

_MISSING = object()


def _is_number(v: Any) -> bool:
    # bool is an int subclass: `true` must not pass for a number.
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _positive(v: Any) -> bool:
    return _is_number(v) and v > 0


def _non_negative(v: Any) -> bool:
    return _is_number(v) and v >= 0


def _release(value) -> bool:
    try:
        return isinstance(value, str) and parse_release(value) is not None
    except ExporterError:
        return False


def _positive_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _text(v: Any) -> bool:
    return isinstance(v, str) and v.strip() != ""


def _text_list(v: Any) -> bool:
    return isinstance(v, list) and all(_text(x) for x in v)


def _short_repr(v: Any) -> str:
    r = repr(v)
    return r if len(r) <= 60 else r[:57] + "..."


class _Table:
    """One TOML table of a profile file: rejects unknown keys and reads typed fields.

    Missing fields are reported by get()/sub(), which know what was expected.
    """

    def __init__(self, path: Path, data: Any, prefix: str, keys: tuple[str, ...]):
        self.path, self.data, self.prefix = path, data, prefix
        if not isinstance(data, dict):
            self.fail(prefix, "expected a table", data)
        unknown = sorted(set(data) - set(keys))  # typo protection
        if unknown:
            valid = ", ".join(sorted(keys))
            raise ProfileError(
                f"{path}: unknown key '{self.dotted(unknown[0])}' (valid keys: {valid})"
            )

    def dotted(self, key: str) -> str:
        return f"{self.prefix}.{key}" if self.prefix else key

    def fail(self, field: str, expected: str, value: Any) -> None:
        raise ProfileError(f"{self.path}: field '{field}': {expected}, got {_short_repr(value)}")

    def get(self, key: str, check: Callable[[Any], bool], expected: str, default: Any = _MISSING):
        value = self.data.get(key, default)
        if value is _MISSING:
            raise ProfileError(f"{self.path}: missing field '{self.dotted(key)}' ({expected})")
        if not check(value):
            self.fail(self.dotted(key), expected, value)
        return value

    def sub(self, key: str, keys: tuple[str, ...]) -> "_Table":
        if key not in self.data:
            raise ProfileError(f"{self.path}: missing field '{self.dotted(key)}' (expected a table)")
        return _Table(self.path, self.data[key], self.dotted(key), keys)


def _parse(path: Path, builtin: bool) -> DeviceProfile:
    """Read and validate one profile file (hardware of measured profiles left as placeholders)."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ProfileError(f"{path}: invalid TOML: {e}") from None
    except UnicodeDecodeError as e:
        raise ProfileError(f"{path}: invalid TOML: not UTF-8 ({e})") from None
    except OSError as e:
        raise ProfileError(f"{path}: cannot read device profile: {e.strerror or e}") from None

    top = _Table(path, data, "", ("name", "aliases", "description", "measured",
                                  "hardware", "runtime", "budget"))
    name = top.get("name", _text, "expected a non-empty string")
    if builtin and name != path.stem:
        top.fail("name", f"expected the file stem '{path.stem}' for a built-in profile", name)
    aliases = top.get("aliases", _text_list, "expected a list of non-empty strings", default=[])
    description = top.get("description", _text, "expected a non-empty string")
    measured = top.get("measured", lambda v: isinstance(v, bool), "expected true or false")

    # Measured profiles carry 0.0 placeholders until measure_host() replaces them, and need no
    # sources: the measurement is the source. Every other figure must say where it comes from.
    if measured:
        figure, figure_msg, needs_source = _non_negative, "expected a number >= 0", ()
    else:
        figure, figure_msg, needs_source = _positive, "expected a positive number", HARDWARE_FIGURES

    hw = top.sub("hardware", (*HARDWARE_FIGURES, "sources"))
    compute = hw.sub("compute_tflops", COMPUTE_PRECISIONS)
    if not compute.data:
        hw.fail("hardware.compute_tflops",
                f"expected at least one of {', '.join(COMPUTE_PRECISIONS)}", compute.data)
    sources = {}
    if "sources" in hw.data or needs_source:
        src = hw.sub("sources", HARDWARE_FIGURES)
        for k in (*needs_source, *src.data):
            sources[k] = src.get(k, _text, "expected a string naming where the figure comes from")
    hardware = Hardware(
        memory_gb=float(hw.get("memory_gb", figure, figure_msg)),
        memory_bandwidth_gbs=float(hw.get("memory_bandwidth_gbs", figure, figure_msg)),
        compute_tflops={k: float(compute.get(k, figure, figure_msg)) for k in compute.data},
        sources=sources,
    )

    rt = top.sub("runtime", ("execution_providers", "weight_precision", "rank_multiple", "provider_options",
                             "onnxruntime_version"))
    providers = tuple(rt.get("execution_providers", lambda v: _text_list(v) and len(v) > 0,
                             "expected a non-empty list of provider names"))
    options = rt.get("provider_options", lambda v: isinstance(v, dict) and all(k in providers for k in v),
                     f"expected a table keyed by the profile's execution providers ({', '.join(providers)})",
                     default={})
    for provider, values in options.items():
        field = f"runtime.provider_options.{provider}"
        if not isinstance(values, dict) or not all(isinstance(v, (str, int, float, bool)) for v in values.values()):
            raise ProfileError(f"{path}: field '{field}': expected a table of option = value, got "
                               f"{_short_repr(values)}")
    runtime = Runtime(
        execution_providers=providers,
        weight_precision=rt.get(
            "weight_precision", lambda v: v in WEIGHT_PRECISIONS,
            f"expected one of {', '.join(WEIGHT_PRECISIONS)}"),
        rank_multiple=rt.get("rank_multiple", _positive_int, "expected a positive integer", default=16),
        # ONNX Runtime takes provider options as strings (TOML booleans as its "1"/"0").
        provider_options={provider: {key: str(int(v)) if isinstance(v, bool) else str(v) for key, v in values.items()}
                          for provider, values in options.items()},
        onnxruntime_version=rt.get("onnxruntime_version", lambda v: v is None or _release(v),
                                   f"expected a release such as \"1.20\" (oldest supported: {release_name(OLDEST)})",
                                   default=None),
    )

    bd = top.sub("budget", (
        "model_ram_mb", "decode_ms_per_token", "prefill_ms", "prefill_prompt_tokens", "max_context"))
    pos, pos_msg = _positive, "expected a positive number"
    budget = Budget(
        model_ram_mb=float(bd.get("model_ram_mb", pos, pos_msg)),
        decode_ms_per_token=float(bd.get("decode_ms_per_token", pos, pos_msg)),
        prefill_ms=float(bd.get("prefill_ms", pos, pos_msg)),
        prefill_prompt_tokens=bd.get("prefill_prompt_tokens", _positive_int, "expected a positive integer"),
        max_context=bd.get("max_context", _positive_int, "expected a positive integer"),
    )
    return DeviceProfile(
        name=name, description=description, aliases=tuple(aliases), measured=measured,
        hardware=hardware, runtime=runtime, budget=budget, path=path,
    )


def _with_measurements(profile: DeviceProfile) -> DeviceProfile:
    """Replace a measured profile's placeholder hardware by this machine's figures."""
    if not profile.measured:
        return profile
    from exporter.device.host_probes import measure_host

    return dataclasses.replace(profile, hardware=measure_host())


def _profiles_dir() -> Path:
    return Path(os.environ.get(PROFILES_DIR_ENV) or PROFILES_DIR)


def _builtin_profiles() -> list[DeviceProfile]:
    """All profiles of the profiles directory, unmeasured, sorted by name; names and aliases unique."""
    directory = _profiles_dir()
    if not directory.is_dir():
        raise ProfileError(f"device profile directory not found: {directory}")
    profiles = sorted((_parse(p, builtin=True) for p in directory.glob("*.toml")),
                      key=lambda p: p.name)
    owner: dict[str, Path] = {}
    for p in profiles:
        for key in (p.name, *p.aliases):
            if key in owner:
                raise ProfileError(f"{p.path}: device name '{key}' is already used by {owner[key]}")
            owner[key] = p.path
    return profiles


# ---------------------------------------------------------------------------------------------
# Public API


def list_profiles() -> list[DeviceProfile]:
    """Every built-in profile, sorted by name (measured profiles measured)."""
    return [_with_measurements(p) for p in _builtin_profiles()]


def profile_names() -> list[str]:
    """Every name and alias a user may pass as a device, sorted."""
    return sorted(key for p in _builtin_profiles() for key in (p.name, *p.aliases))


def _looks_like_path(s: str) -> bool:
    seps = {"/", os.sep, os.altsep} - {None}
    return s.endswith(".toml") or any(sep in s for sep in seps)


def load_profile(name_or_path: str) -> DeviceProfile:
    """A built-in profile by name or alias, or a user's profile from a path to a .toml file."""
    if _looks_like_path(name_or_path):
        path = Path(name_or_path).expanduser()
        if not path.is_file():
            what = "is not a file" if path.exists() else "not found"
            raise ProfileError(f"device profile file {what}: {path}")
        return _with_measurements(_parse(path, builtin=False))
    profiles = _builtin_profiles()
    for p in profiles:
        if name_or_path == p.name or name_or_path in p.aliases:
            return _with_measurements(p)
    valid = ", ".join(sorted(k for p in profiles for k in (p.name, *p.aliases)))
    raise ProfileError(
        f"unknown device '{name_or_path}'; valid devices: {valid} (or a path to a .toml profile)"
    )


def _tflops_text(compute: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:g}" for k, v in compute.items())


def format_profile(p: DeviceProfile) -> str:
    """Multi-line description of one profile, with each hardware figure's source."""
    hw, rt, bd = p.hardware, p.runtime, p.budget
    src = hw.sources
    aliases = f"  (aliases: {', '.join(p.aliases)})" if p.aliases else ""
    lines = [
        f"{p.name}{aliases}",
        f"  {p.description}",
        f"  file: {p.path}",
        "hardware:" + ("  (measured on this machine)" if p.measured else ""),
        f"  memory:            {hw.memory_gb:g} GB",
        f"      source: {src.get('memory_gb', '-')}",
        f"  memory bandwidth:  {hw.memory_bandwidth_gbs:g} GB/s",
        f"      source: {src.get('memory_bandwidth_gbs', '-')}",
        f"  compute (TFLOP/s, int8 TOPS): {_tflops_text(hw.compute_tflops)}",
        f"      source: {src.get('compute_tflops', '-')}",
        "runtime:",
        f"  execution providers: {', '.join(rt.execution_providers)}",
        f"  weight precision:    {rt.weight_precision}",
        f"  rank multiple:       {rt.rank_multiple}",
        *(f"  {provider} options: " + ", ".join(f"{k}={v}" for k, v in values.items())
          for provider, values in rt.provider_options.items()),
        "budget:",
        f"  model RAM:   {bd.model_ram_mb:g} MB (weights + KV cache + runtime)",
        f"  decode:      {bd.decode_ms_per_token:g} ms/token",
        f"  prefill:     {bd.prefill_ms:g} ms for {bd.prefill_prompt_tokens} prompt tokens",
        f"  max context: {bd.max_context} tokens",
    ]
    return "\n".join(lines)


def format_profile_table(profiles: list[DeviceProfile]) -> str:
    """One line per profile: name, aliases, RAM, bandwidth, precision and budgets."""
    header = ("device", "aliases", "RAM GB", "BW GB/s", "weights", "model MB", "decode ms/tok")
    rows = [header] + [
        (
            p.name,
            ", ".join(p.aliases) or "-",
            f"{p.hardware.memory_gb:g}",
            f"{p.hardware.memory_bandwidth_gbs:g}",
            p.runtime.weight_precision,
            f"{p.budget.model_ram_mb:g}",
            f"{p.budget.decode_ms_per_token:g}",
        )
        for p in profiles
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    # Text columns left-aligned, numbers right-aligned.
    left = {0, 1, 4}
    return "\n".join(
        "  ".join(c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
        for r in rows
    )
