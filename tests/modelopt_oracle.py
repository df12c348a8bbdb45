"""Run NVIDIA ModelOpt itself (the conformance oracle) on a checkpoint, in its own process.

usage: python tests/modelopt_oracle.py SRC OUT {nvfp4|fp8} CALIB_TOKENS.json
ModelOpt patches transformers' classes on import, so it never runs inside the test process.
"""

import copy
import json
import sys
import warnings

import torch

warnings.filterwarnings("ignore")


def main(src: str, out: str, fmt: str, tokens: str) -> None:
    import modelopt.torch.quantization as mtq
    from modelopt.torch.export import export_hf_checkpoint
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16).eval()
    cfg = copy.deepcopy(mtq.NVFP4_DEFAULT_CFG if fmt == "nvfp4" else mtq.FP8_DEFAULT_CFG)
    cfg["quant_cfg"] = list(cfg["quant_cfg"]) + list(mtq.FP8_KV_CFG["quant_cfg"])
    cfg["algorithm"] = "max"
    batches = [torch.tensor(b) for b in json.load(open(tokens))["batches"]]

    def forward_loop(m):
        with torch.no_grad():
            for ids in batches:
                m(input_ids=ids)

    mtq.quantize(model, cfg, forward_loop)
    with torch.no_grad():
        export_hf_checkpoint(model, export_dir=out)


if __name__ == "__main__":
    main(*sys.argv[1:])
