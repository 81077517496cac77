"""manifest.json: what an export did, one typed record that the exporter writes and its readers read.

`Manifest.from_dict(d).to_dict() == d`, key order included, for every manifest the exporter writes. Keys that
some manifests lack (written only sometimes, like `ort_format` and int4's `onnx.block_size`, or added to format 1
after its first artifacts, which readers take as absent) are None when absent and stay absent; keys this version
does not know (a newer exporter's) are kept in `extra`. A missing key that readers cannot do without is a one-line
ExporterError naming it. Parts whose shape another module owns (the profile, budget, parity, ...) stay dicts.
The file table is computed here, last, over every other file. No torch.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from exporter.errors import ExporterError

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


def nested(kind: type, shape: str = "one", key: str | None = None, optional: bool = False):
    """A field holding `kind` records: one, a list of them ("list"), or a {name: record} table ("table")."""
    metadata = {"kind": kind, "shape": shape, "key": key, "optional": optional}
    return field(default=None, metadata=metadata) if optional else field(metadata=metadata)


def sometimes(key: str | None = None):
    """A plain field written only sometimes: None when absent, and then not written."""
    return field(default=None, metadata={"key": key, "optional": True})


def renamed(key: str):
    """A plain field whose JSON key is not a Python name (`in`)."""
    return field(metadata={"key": key})


@dataclass(kw_only=True)
class Record:
    """A JSON object as a dataclass: its declared fields (in the order the exporter writes them: keyword-only, so
    a field written only sometimes may stand between required ones), the keys it does not declare (`extra`), and
    the order the keys were read in (so writing a read record gives back the same JSON)."""

    extra: dict[str, Any] = field(default_factory=dict)
    read_order: tuple[str, ...] = field(default=(), repr=False, compare=False)

    @classmethod
    def _declared(cls):
        return [(f, f.metadata.get("key") or f.name) for f in fields(cls) if f.name not in ("extra", "read_order")]

    @classmethod
    def from_dict(cls, data: dict, at: str = ""):
        if not isinstance(data, dict):
            raise ExporterError(f"{at or cls.__name__!r} is not a JSON object")
        values, known = {}, set()
        for f, key in cls._declared():
            known.add(key)
            where = f"{at}.{key}" if at else key
            if key in data:
                values[f.name] = _decode(f, data[key], where)
            elif not f.metadata.get("optional"):
                raise ExporterError(f"missing key {where!r}")
        return cls(**values, extra={k: v for k, v in data.items() if k not in known}, read_order=tuple(data))

    def to_dict(self) -> dict:
        out = {}
        for f, key in self._declared():
            value = getattr(self, f.name)
            if value is None and f.metadata.get("optional") and key not in self.read_order:
                continue
            out[key] = _encode(f, value)
        out.update(self.extra)
        position = {key: i for i, key in enumerate(self.read_order)}
        return dict(sorted(out.items(), key=lambda item: position.get(item[0], len(position))))  # stable sort


def _decode(f, value, where: str):
    kind, shape = f.metadata.get("kind"), f.metadata.get("shape")
    if kind is None or (value is None and f.metadata.get("optional")):
        return value
    if shape == "list":
        if not isinstance(value, list):
            raise ExporterError(f"{where!r} is not a JSON list")
        return [kind.from_dict(item, f"{where}[{i}]") for i, item in enumerate(value)]
    if shape == "table":
        if not isinstance(value, dict):
            raise ExporterError(f"{where!r} is not a JSON object")
        return {name: kind.from_dict(item, f"{where}[{name!r}]") for name, item in value.items()}
    return kind.from_dict(value, where)


def _encode(f, value):
    shape = f.metadata.get("shape")
    if f.metadata.get("kind") is None or value is None:
        return value
    if shape == "list":
        return [item.to_dict() for item in value]
    if shape == "table":
        return {name: item.to_dict() for name, item in value.items()}
    return value.to_dict()


@dataclass(kw_only=True)
class SourceModel(Record):
    name: str
    path: str  # what `exporter validate` reloads as the PyTorch reference
    architecture: str
    model_type: str
    hub_id: str | None = sometimes()  # org/name@revision where the model came from the Hugging Face Hub


@dataclass(kw_only=True)
class Method(Record):
    factorization: str  # whitened-svd, svd or none
    allocation: str  # fisher, uniform or none
    budget_source: str
    projection_params_target: int | None
    rank_multiple: int | None
    allocation_details: dict | None  # Allocation.to_dict(); null when no ranks were allocated
    allocation_curve: dict | None  # compress.allocate.allocation_curve
    calibration: str | None
    seed: int
    correctives: dict | None
    formats: dict | None = sometimes()  # --weights auto: the budget and every MatMulNBits' menu and choice
    error_correction: dict | None = sometimes()  # --error-correction: rank, formats, output error kept
    scale_tuning: dict | None = sometimes()  # --tune-scales: steps, held-out KL before and after, kept
    compute: str | None = sometimes()  # where the torch stages ran (--compute): cpu, cuda:0 (NVIDIA H200)
    world_size: int | None = sometimes()  # data-parallel processes (torchrun), where more than one
    sharding: str | None = sometimes()  # how those processes split the calibration windows


@dataclass(kw_only=True)
class Parameters(Record):
    total_params_dense: int
    total_params: int
    projection_params_dense: int
    projection_params: int
    projection_fraction_removed: float
    total_fraction_removed: float


@dataclass(kw_only=True)
class RankEntry(Record):
    rank: int | None  # None: kept dense
    corrective_rank: int
    out_features: int = renamed("out")
    in_features: int = renamed("in")


@dataclass(kw_only=True)
class OnnxGraph(Record):
    file: str  # the full level's graph
    task: str
    graph: str | None = sometimes()  # fused or optimum (absent: optimum, before the fused writer)
    weights: str
    activations: str | None = sometimes()  # absent: fp32, before fp16 activations
    block_size: int | None = sometimes()  # int4 only
    accuracy_level: int | None = sometimes()  # int4 only
    quantization: dict | None = sometimes()  # int4: quantizer, default grid, MatMulNBits per format
    # absent before ONNX Runtime targets: the default-domain opset and IR version written, the release the
    # export targeted (--onnxruntime-version; None: the newest) and the oldest release that runs every level
    opset: int | None = sometimes()
    ir_version: int | None = sometimes()
    target_onnxruntime: str | None = sometimes()
    oldest_onnxruntime: str | None = sometimes()


@dataclass(kw_only=True)
class Level(Record):
    name: str
    fraction: float
    file: str
    # rank levels of a factorized model only:
    rank_multiple: int | None = sometimes()
    active_factor_params: int | None = sometimes()
    weight_bytes: int | None = sometimes()
    parity: dict | None = sometimes()
    nll_increase: float | None = sometimes()


@dataclass(kw_only=True)
class ScheduleEntry(Record):
    level: str
    start: int  # the first generated token the level produces


@dataclass(kw_only=True)
class OrtFormat(Record):
    file: str
    source: str  # the .onnx it was converted from
    bytes: int
    check: dict  # its logits against the .onnx's


@dataclass(kw_only=True)
class FileEntry(Record):
    sha256: str
    bytes: int


@dataclass(kw_only=True)
class Manifest(Record):
    format_version: int
    exporter_version: str
    source_model: SourceModel = nested(SourceModel)
    profile: dict  # DeviceProfile.to_dict()
    method: Method = nested(Method)
    precision: str
    budget: dict  # WeightBudget.to_dict()
    parameters: Parameters = nested(Parameters)
    ranks: dict[str, RankEntry] = nested(RankEntry, "table")
    onnx: OnnxGraph = nested(OnnxGraph)
    # absent before rank levels: one full-rank level, the onnx file
    levels: list[Level] | None = nested(Level, "list", optional=True)
    schedule: list[ScheduleEntry] | None = nested(ScheduleEntry, "list", optional=True)
    schedule_derivation: dict | None = sometimes()
    ort_format: OrtFormat | None = nested(OrtFormat, optional=True)  # with --ort
    parity: dict  # ParityReport.to_dict(), and its `quantized` twin
    tokenizer_check: dict | None = sometimes()  # absent before the export checked the tokenizer's readers
    versions: dict
    timings_s: dict[str, float]
    files: dict[str, FileEntry] | None = nested(FileEntry, "table", optional=True)  # write_manifest adds it

    @classmethod
    def from_dict(cls, data: dict, source: str = "manifest") -> Manifest:
        """Raises one line naming `source` and the first missing or malformed key."""
        try:
            return super().from_dict(data)
        except ExporterError as exc:
            raise ExporterError(f"{source}: {exc}") from None


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def file_table(directory: Path) -> dict[str, dict]:
    """{relative path: {sha256, bytes}} for every file but the manifest itself."""
    table = {}
    for path in sorted(Path(directory).rglob("*")):
        if path.is_file() and path.name != MANIFEST:
            table[path.relative_to(directory).as_posix()] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    return table


def write_manifest(directory: Path, manifest: Manifest) -> None:
    """manifest.json, with the file table of everything already in `directory` (write it last)."""
    data = {**manifest.to_dict(), "files": file_table(directory)}
    (Path(directory) / MANIFEST).write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def read_manifest(directory: Path) -> Manifest:
    path = Path(directory) / MANIFEST
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ExporterError(f"{directory} is not an artifact (no {MANIFEST})") from None
    except json.JSONDecodeError as exc:
        raise ExporterError(f"{path} is not valid JSON: {exc.msg}") from None
    return Manifest.from_dict(data, source=str(path))
