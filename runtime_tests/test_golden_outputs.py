"""The graph reproduces, within the tolerance recorded with them, the outputs it gave at export time."""

import numpy as np


def test_golden_case_reproduced(decoder, golden, golden_case, measured):
    case, tolerance = golden["cases"][golden_case], golden["tolerance"]
    tokens = case["tokens"]
    logits = decoder.replay(case["prompt_ids"], tokens)
    agreement = float(np.mean(np.argmax(logits, axis=-1) == np.asarray(tokens)))
    recorded = np.asarray(case["top_logits"])
    error = float(np.abs(np.take_along_axis(logits, np.asarray(case["top_ids"]), axis=-1) - recorded).max())
    measured.append(f"golden case {golden_case} ({len(case['prompt_ids'])}-token prompt, {golden['weights']}): "
                    f"top-1 agreement {agreement:.0%}, max |logit error| {error:.3g} "
                    f"(tolerance {tolerance['min_top1_agreement']:.0%}, {tolerance['max_abs_logit_diff']:g})")
    assert agreement >= tolerance["min_top1_agreement"] and error <= tolerance["max_abs_logit_diff"], (
        f"golden case {golden_case}: top-1 agreement {agreement:.0%} (need >= {tolerance['min_top1_agreement']:.0%}), "
        f"max |logit error| {error:.3g} (need <= {tolerance['max_abs_logit_diff']:g}) over {len(tokens)} steps")
