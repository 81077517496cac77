"""The runtime that reads the artifact's tokenizer here gives the ids the source tokenizer gave at export time."""

from pathlib import Path

import pytest


def _encoder(reader: str, artifact: Path):
    """encode(text) -> ids for `reader`, or a skip where this device lacks it."""
    if reader == "onnxruntime-genai":
        og = pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai is not installed here")
        if not (artifact / "genai_config.json").is_file():
            pytest.skip("the artifact has no genai_config.json (optimum graph): onnxruntime-genai cannot load it")
        tokenizer = og.Tokenizer(og.Config(str(artifact)))  # the tokenizer files only
        if hasattr(tokenizer, "update_options"):  # BOS/EOS as the export encoded them (off by default)
            tokenizer.update_options(add_special_tokens="true")
        return lambda text: [int(i) for i in tokenizer.encode(text)]
    tokenizers = pytest.importorskip("tokenizers", reason="the tokenizers package is not installed here")
    tokenizer = tokenizers.Tokenizer.from_file(str(artifact / "tokenizer.json"))
    return lambda text: tokenizer.encode(text, add_special_tokens=True).ids


def test_tokenizer_matches_golden_ids(tokenizer_reader, artifact, golden, measured):
    cases = golden.get("tokenizer")
    if not cases:
        pytest.fail(f"{artifact}/golden.json has no tokenizer cases (exported before they were recorded?)")
    encode = _encoder(tokenizer_reader, artifact)
    wrong = [case for case in cases if encode(case["text"]) != case["ids"]]
    measured.append(f"tokenizer via {tokenizer_reader}: {len(cases) - len(wrong)}/{len(cases)} texts give the "
                    "recorded ids")
    assert not wrong, (f"{tokenizer_reader} encodes {len(wrong)} of {len(cases)} texts differently from the "
                       f"export, first {wrong[0]['text'][:60]!r}: {encode(wrong[0]['text'])[:12]} vs "
                       f"{wrong[0]['ids'][:12]}")
