"""--model as a Hugging Face Hub id (exporter.source.model.resolve_model), with a mocked hub: no network in tests.
Parsing org/name[@revision], safetensors-only snapshots, one-line errors, and trust_remote_code off by default."""

from __future__ import annotations

import json

import pytest

from exporter.errors import ModelError
from exporter.source.model import HUB_FILES, load_model, resolve_model


@pytest.fixture()
def hub(monkeypatch, llama_dir):
    """snapshot_download mocked to serve the tiny Llama's directory; records each call's arguments."""
    import huggingface_hub

    calls = []

    def snapshot_download(repo_id, revision=None, allow_patterns=None, **kwargs):
        calls.append({"repo_id": repo_id, "revision": revision, "allow_patterns": allow_patterns, **kwargs})
        return str(llama_dir)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return calls


@pytest.mark.parametrize("text, repo, revision", [
    ("org/tiny", "org/tiny", None),
    ("org/tiny@v1.0", "org/tiny", "v1.0"),
    ("Org-2/tiny.model_x@refs/pr/3", "Org-2/tiny.model_x", "refs/pr/3"),
])
def test_hub_ids_are_parsed_and_fetched_safetensors_only(hub, llama_dir, text, repo, revision):
    source = resolve_model(text)
    assert hub == [{"repo_id": repo, "revision": revision, "allow_patterns": list(HUB_FILES)}]
    assert not any(p.endswith((".bin", ".pt", ".pth", ".ckpt")) for p in HUB_FILES)
    assert source.path == llama_dir and source.gguf_file is None
    assert source.hub_id == text and source.name == repo.rsplit("/", 1)[-1]
    assert source.trust_remote_code is False


@pytest.mark.parametrize("text", ["./org/tiny", "/org/tiny", "org", "org/tiny/extra"])
def test_paths_are_not_hub_ids(hub, text):
    with pytest.raises(ModelError, match="model not found"):
        resolve_model(text)
    assert hub == []


def test_a_snapshot_without_safetensors_is_refused(monkeypatch, tmp_path):
    import huggingface_hub

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (tmp_path / "pytorch_model.bin").write_bytes(b"\0")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: str(tmp_path))
    with pytest.raises(ModelError, match="no safetensors weights"):
        resolve_model("org/pickled")


@pytest.mark.parametrize("trust", [False, True])
def test_remote_code_runs_only_when_asked(hub, monkeypatch, trust):
    import transformers

    seen = {}

    def from_pretrained(directory, **kwargs):
        seen.update(kwargs)
        raise RuntimeError("stop here")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", from_pretrained)
    with pytest.raises(ModelError, match="cannot load model"):
        load_model(resolve_model("org/tiny", trust_remote_code=trust))
    assert seen["trust_remote_code"] is trust and seen["use_safetensors"] is True and seen["local_files_only"]


def test_export_from_a_hub_id_records_it(hub, calib_file, tmp_path):
    from exporter.cli import main

    out = tmp_path / "art"
    assert main(["export", "--model", "org/tiny@main", "--calib", str(calib_file), "--calib-samples", "4",
                 "--calib-seq-len", "32", "--ratio", "0.3", "--device", "host", "--no-progress", "--levels", "1.0",
                 "--out", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["source_model"]["hub_id"] == "org/tiny@main" and manifest["source_model"]["name"] == "tiny"
    assert hub[0]["revision"] == "main"
