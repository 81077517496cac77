"""Latency and memory within the device profile's budgets. The budgets are the contract wherever the
suite runs; the figures are printed in the summary so a run on another machine still informs."""

import platform


def _where(profile) -> str:
    return f"measured on {platform.machine()} {platform.node()}, budget of profile {profile.get('name', '?')}"


def test_decode_latency_p95(probe, profile):
    budget = profile["budget"]["decode_ms_per_token"]
    p95 = probe["decode_ms_p95"]
    assert probe["new_tokens"] >= 64
    assert p95 <= budget, (f"decode p95 {p95:.2f} ms/token over {probe['new_tokens']} tokens exceeds the budget "
                           f"{budget:g} ms/token (p50 {probe['decode_ms_p50']:.2f}; {_where(profile)})")


def test_prefill_latency(probe, profile):
    budget, asked = profile["budget"]["prefill_ms"], profile["budget"]["prefill_prompt_tokens"]
    note = "" if probe["prompt_tokens"] == asked else f" (the model's context limits the prompt to {probe['prompt_tokens']} of {asked})"
    assert probe["prefill_ms"] <= budget, (
        f"prefill {probe['prefill_ms']:.1f} ms at {probe['prompt_tokens']} tokens exceeds the budget {budget:g} ms"
        f"{note}; {_where(profile)}")


def test_peak_rss(probe, profile):
    budget = profile["budget"]["model_ram_mb"]
    assert probe["peak_rss_mb"] <= budget, (
        f"peak RSS {probe['peak_rss_mb']:.0f} MB (a process holding onnxruntime and the model, decoding) exceeds "
        f"the budget {budget:g} MB; {_where(profile)}")
