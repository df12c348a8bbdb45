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


def test_expert_statistics_equal_a_direct_computation():
    """Per expert: the amax of the gate/up input (the hidden states of the tokens routed to it), the amax of
    the down input (act(gate) * up of those tokens) and the token count, computed here from the routing the
    experts module received, equal what the recording gathered; and the outputs are the model's own."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    from stepquant.calibrate import calibrate

    torch.manual_seed(0)
    cfg = Qwen3MoeConfig(hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=100)  # fmt: skip
    cfg._experts_implementation = "eager"
    model = Qwen3MoeForCausalLM(cfg).eval()
    routed: dict = {}

    def keep(module, args, kwargs):
        hidden, index = (args[0], args[1]) if len(args) > 1 else (kwargs["hidden_states"], kwargs["top_k_index"])
        routed.setdefault(module, []).append((hidden.detach().clone(), index.detach().clone()))

    experts = {n: m for n, m in model.named_modules() if type(m).__name__.endswith("Experts")}
    hooks = [m.register_forward_pre_hook(keep, with_kwargs=True) for m in experts.values()]
    batches = [torch.randint(0, 100, (2, 12)), torch.randint(0, 100, (3, 5))]
    stats = calibrate(model, batches)
    for h in hooks:
        h.remove()
    assert len(experts) == 2
    for name, m in experts.items():
        amax_in, amax_mid, count = torch.zeros(8), torch.zeros(8), torch.zeros(8, dtype=torch.int64)
        with torch.no_grad():
            for hidden, index in routed[m]:
                for e in range(8):
                    x = hidden[(index == e).any(-1)]
                    if len(x):
                        gate, up = torch.nn.functional.linear(x, m.gate_up_proj[e]).chunk(2, dim=-1)
                        amax_in[e] = max(amax_in[e], x.abs().max().float())
                        amax_mid[e] = max(amax_mid[e], (m.act_fn(gate) * up).abs().max().float())
                        count[e] += len(x)
        assert torch.equal(stats.experts_in[name], amax_in), name
        assert torch.equal(stats.experts_mid[name], amax_mid), name
        assert torch.equal(stats.expert_tokens[name], count) and count.sum() == 2 * (24 + 15)
