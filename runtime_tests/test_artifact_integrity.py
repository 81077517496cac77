"""Every file of the artifact is the one the exporter wrote: size and sha256 as in the manifest."""

import hashlib


def _sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def test_every_file_matches_the_manifest(artifact, manifest):
    files = manifest.get("files") or {}
    assert files, "manifest.json has no 'files' table"
    problems = []
    for name, entry in sorted(files.items()):
        path = artifact / name
        if not path.is_file():
            problems.append(f"{name}: missing")
        elif path.stat().st_size != entry["bytes"]:
            problems.append(f"{name}: {path.stat().st_size} bytes, the manifest says {entry['bytes']}")
        elif _sha256(path) != entry["sha256"]:
            problems.append(f"{name}: sha256 differs from the manifest (corrupted or modified)")
    assert not problems, "artifact does not match its manifest: " + "; ".join(problems)


def test_manifest_lists_the_model_and_its_golden_outputs(manifest, model_path):
    files = manifest.get("files") or {}
    assert model_path.name in files, f"the manifest's file table lacks the model {model_path.name}"
    assert "golden.json" in files, "the manifest's file table lacks golden.json"
