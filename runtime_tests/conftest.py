"""Options and fixtures of the on-device suite: `pytest runtime_tests --artifact DIR [--device X]`.

Needs only onnxruntime (or onnxruntime-gpu), numpy and the artifact. Without --artifact every test
here is skipped, so a plain `pytest` of the whole repository stays green.
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
PROFILES_DIR = HERE.parent / "device_profiles"  # present in a checkout of the exporter; optional
DECODE_TOKENS = 64
REQUIRED = {"runtime": ("execution_providers",),
            "budget": ("model_ram_mb", "decode_ms_per_token", "prefill_ms", "prefill_prompt_tokens")}
TOKENIZER_READERS = ("onnxruntime-genai", "tokenizers")  # what apps and Python services read tokenizer.json with
MEASURED: list[str] = []  # figures the tests measured, printed in the terminal summary
if str(HERE) not in sys.path:  # ort_loop.py, whatever pytest's import mode
    sys.path.insert(0, str(HERE))


def pytest_addoption(parser):
    group = parser.getgroup("runtime_tests", "on-device regression suite")
    group.addoption("--artifact", help="exported artifact directory (with manifest.json) to check")
    group.addoption("--device", help="device profile: a .toml file, or a name in device_profiles/ "
                    "(default: the profile recorded in the artifact's manifest)")


def _read_toml(path: Path) -> dict:
    try:
        import tomllib
    except ImportError:  # Python < 3.11
        try:
            import tomli as tomllib
        except ImportError:
            raise pytest.UsageError("--device FILE.toml needs Python 3.11+ or `pip install tomli`") from None
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise pytest.UsageError(f"--device {path}: cannot read the profile: {exc}") from None


def _device_profile(spec: str) -> dict:
    path = Path(spec).expanduser()
    if path.suffix == ".toml" or path.exists():
        if not path.is_file():
            raise pytest.UsageError(f"--device {spec}: no such profile file")
        return _read_toml(path)
    for candidate in sorted(PROFILES_DIR.glob("*.toml")):
        data = _read_toml(candidate)
        if spec == data.get("name") or spec in data.get("aliases", []):
            return data
    raise pytest.UsageError(f"--device {spec}: not a .toml file and no profile of that name in {PROFILES_DIR}")


def pytest_configure(config):
    """Check --artifact and the profile once, up front, so bad input is one clear line."""
    config.runtime_suite = None
    spec = config.getoption("--artifact", default=None)
    if not spec:
        return
    artifact = Path(spec).expanduser()
    manifest_path = artifact / "manifest.json"
    if not manifest_path.is_file():
        raise pytest.UsageError(f"--artifact {spec}: not an artifact directory (no manifest.json)")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as exc:
        raise pytest.UsageError(f"{manifest_path}: not valid JSON ({exc.msg})") from None
    device = config.getoption("--device")
    profile = _device_profile(device) if device else manifest.get("profile")
    source = device or "the artifact's manifest"
    if not isinstance(profile, dict):
        raise pytest.UsageError(f"{manifest_path}: no 'profile' recorded; pass --device")
    for table, keys in REQUIRED.items():
        for key in keys:
            if key not in profile.get(table, {}):
                raise pytest.UsageError(f"profile from {source}: missing field '{table}.{key}'")
    config.runtime_suite = {"artifact": artifact, "manifest": manifest, "profile": profile}


def pytest_collection_modifyitems(config, items):
    if config.runtime_suite is not None:
        return
    skip = pytest.mark.skip(reason="no artifact given: run `pytest runtime_tests --artifact DIR [--device X]`")
    for item in items:
        if HERE in Path(str(item.fspath)).parents:
            item.add_marker(skip)


def pytest_generate_tests(metafunc):
    """One test per profile provider and per golden case, named after it."""
    suite = metafunc.config.runtime_suite
    if "provider" in metafunc.fixturenames:
        names = list(suite["profile"]["runtime"]["execution_providers"]) if suite else []
        metafunc.parametrize("provider", names or [None], ids=names or ["no-artifact"])
    if "golden_case" in metafunc.fixturenames:
        golden = _golden(suite["artifact"]) if suite else None
        cases = golden["cases"] if golden else []
        ids = [f"case{i}-{len(c['prompt_ids'])}tok" for i, c in enumerate(cases)]
        metafunc.parametrize("golden_case", list(range(len(cases))) or [None], ids=ids or ["no-golden"])
    if "tokenizer_reader" in metafunc.fixturenames:
        metafunc.parametrize("tokenizer_reader", TOKENIZER_READERS)


def _golden(artifact: Path) -> dict | None:
    path = artifact / "golden.json"
    return json.loads(path.read_text()) if path.is_file() else None


def pytest_terminal_summary(terminalreporter):
    if MEASURED:
        terminalreporter.section(f"measured on {platform.machine()} {platform.node()}")
        for line in MEASURED:
            terminalreporter.write_line(line)


@pytest.fixture(scope="session")
def suite(request) -> dict:
    return request.config.runtime_suite


@pytest.fixture(scope="session")
def measured() -> list[str]:
    """Lines of measured figures for the terminal summary."""
    return MEASURED


@pytest.fixture(scope="session")
def artifact(suite) -> Path:
    return suite["artifact"]


@pytest.fixture(scope="session")
def manifest(suite) -> dict:
    return suite["manifest"]


@pytest.fixture(scope="session")
def profile(suite) -> dict:
    return suite["profile"]


@pytest.fixture(scope="session")
def model_path(artifact, manifest) -> Path:
    return artifact / manifest.get("onnx", {}).get("file", "model.onnx")


@pytest.fixture(scope="session")
def golden(artifact) -> dict:
    golden = _golden(artifact)
    if golden is None:
        pytest.fail(f"{artifact}: no golden.json (exported before golden outputs were recorded?)")
    return golden


@pytest.fixture(scope="session")
def providers(profile) -> list[str]:
    """The profile's providers that this onnxruntime build has, in the profile's order."""
    import onnxruntime as ort

    wanted = list(profile["runtime"]["execution_providers"])
    available = [p for p in wanted if p in ort.get_available_providers()]
    if not available:
        pytest.skip(f"none of the profile's providers {wanted} is in this onnxruntime build "
                    f"({ort.get_available_providers()})")
    return available


@pytest.fixture(scope="session")
def provider_options(profile) -> dict:
    """The profile's runtime.provider_options: {provider: {option: value}} (may be empty)."""
    return profile["runtime"].get("provider_options") or {}


@pytest.fixture(scope="session")
def decoder(model_path, providers, provider_options):
    from ort_loop import Decoder

    return Decoder(model_path, providers, provider_options=provider_options)


@pytest.fixture(scope="session")
def probe(model_path, providers, provider_options, profile) -> dict:
    """Latency and peak RSS of a fresh process that loads the model and decodes (ort_loop.py)."""
    prompt = int(profile["budget"]["prefill_prompt_tokens"])
    command = [sys.executable, str(HERE / "ort_loop.py"), str(model_path), "--providers", ",".join(providers),
               "--provider-options", json.dumps(provider_options),
               "--prompt-tokens", str(prompt), "--new-tokens", str(DECODE_TOKENS)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        pytest.fail(f"the latency probe failed: {done.stderr.strip().splitlines()[-1:]}")
    result = json.loads(done.stdout)
    MEASURED.append(
        f"{model_path.parent.name} on {', '.join(result['providers'])} (profile "
        f"{profile.get('name', '?')}): load {result['load_s']:.2f} s, time to first token "
        f"{result['ttft_ms']:.1f} ms, prefill {result['prefill_ms']:.1f} ms at {result['prompt_tokens']} tokens, "
        f"decode p50 {result['decode_ms_p50']:.2f} / p95 {result['decode_ms_p95']:.2f} ms/token over "
        f"{result['new_tokens']} tokens, peak RSS {result['peak_rss_mb']:.0f} MB")
    return result
