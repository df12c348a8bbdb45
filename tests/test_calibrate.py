"""The calibration hooks observe the model without changing what it computes."""

import torch

from stepquant.calibrate import load_model, wrapped_attention


def test_wrapped_attention_keeps_sliding_windows(demo_ckpt):
    """With K/V observed through the attention interface, the logits are the model's own: transformers
    builds no mask at all for an attention name without a mask function, which would let the demo's
    sliding-window layers see the whole context (a sequence longer than the window shows it)."""
    import json

    model = load_model(demo_ckpt, json.loads((demo_ckpt / "config.json").read_text()))
    window = model.config.get_text_config().sliding_window
    ids = torch.arange(3 * window).remainder(500).unsqueeze(0) + 7
    with torch.no_grad():
        plain = model(input_ids=ids).logits
        seen = []
        with wrapped_attention(model, lambda m, k, v: (seen.append(m), (k, v))[1]):
            observed = model(input_ids=ids).logits
    assert seen and torch.equal(plain, observed)
