"""The model loads and runs with each execution provider the device profile names."""

import numpy as np
import onnxruntime as ort
import pytest


def test_model_runs_with_provider(provider, model_path, provider_options):
    available = ort.get_available_providers()
    if provider not in available:
        pytest.skip(f"{provider} is not in this onnxruntime {ort.__version__} build (it has {', '.join(available)})")
    from ort_loop import Decoder

    # CPU behind an accelerator runs the nodes it lacks, as apps configure it.
    fallback = [] if provider == "CPUExecutionProvider" else ["CPUExecutionProvider"]
    decoder = Decoder(model_path, [provider, *fallback], provider_options=provider_options)
    active = decoder.session.get_providers()
    assert active[0] == provider, f"{provider} did not load (onnxruntime fell back to {active})"
    logits, _ = decoder.step([1, 2, 3, 4], decoder.empty_cache(), 0)
    assert logits.shape == (4, decoder.vocab_size()) and np.isfinite(logits).all()
