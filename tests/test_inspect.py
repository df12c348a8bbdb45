from stepquant.inspect import format_report, inspect_checkpoint


def test_modelopt_nvfp4_reference(ref):
    r = inspect_checkpoint(ref / "nvfp4")
    assert r["family"] == "qwen3_moe"
    assert r["quant_algo"] == "NVFP4"
    assert r["kv_cache_quant_algo"] == "FP8"
    assert r["group_size"] == 16
    assert r["moe_layout"] == "per-expert"
    assert r["num_experts"] == 8
    assert "model.layers.0.mlp.gate" in r["exclude_modules"]
    assert r["dtypes"]["U8"]["tensors"] == 56 and r["dtypes"]["F8_E4M3"]["tensors"] == 56
    # totals agree with TENSORS.txt, which ModelOpt's export listed
    listed = [line.split("\t") for line in (ref / "nvfp4" / "TENSORS.txt").read_text().splitlines()]
    assert r["tensors"] == len(listed)


def test_modelopt_fp8_reference(ref):
    r = inspect_checkpoint(ref / "fp8")
    assert (r["quant_algo"], r["kv_cache_quant_algo"], r["family"]) == ("FP8", "FP8", "qwen3_moe")


def test_quant_config_from_config_json_only(tmp_path, ref):
    """Block-FP8 releases carry only config.json's quantization_config."""
    import json
    import shutil

    shutil.copy(ref / "bf16" / "model.safetensors", tmp_path)
    cfg = json.loads((ref / "bf16" / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                  "weight_block_size": [128, 128]}  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    r = inspect_checkpoint(tmp_path)
    assert r["quant_algo"] == "FP8_BLOCK" and r["kv_cache_quant_algo"] is None


def test_demo(demo_ckpt):
    r = inspect_checkpoint(demo_ckpt)
    assert (r["family"], r["moe_layout"], r["naming"]) == ("step3p7", "stacked", "step-hub")
    assert r["num_experts"] == 8 and r["num_layers"] == 4 and r["mtp_layers"] == 1 and r["layers_in_weights"] == 5
    assert r["quant_algo"] is None
    assert "tokenizer.json" in r["sidecars"]
    text = format_report(r)
    assert "stacked, 8 experts" in text and "step3p7" in text
