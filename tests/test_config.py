import dataclasses

import pytest

from model.config import LayerSpec, ModelConfig, QuantConfig, shared_kv_layers
from model.presets import PRESETS, get_preset


def test_every_preset_is_valid_and_round_trips_through_json():
    for name, cfg in PRESETS.items():
        again = ModelConfig.from_json(cfg.to_json())
        assert again == cfg, name
        assert sum(len(g.layers) for g in cfg.kv_groups) == cfg.n_layers


def test_shared_kv_layout_five_local_one_global_adjacent_pairs():
    specs = shared_kv_layers(12, window=1024, local_share=2, global_share=2)
    kinds = [s.attention for s in specs]
    assert kinds == ["local"] * 5 + ["global"] + ["local"] * 5 + ["global"]
    # locals pair in layer order, skipping the global in between; globals pair across blocks
    assert [s.kv_source for s in specs] == [0, 0, 2, 2, 4, 5, 4, 7, 7, 9, 9, 5]
    cfg = ModelConfig(name="t", vocab_size=8, dim=8, n_layers=12, n_heads=2, n_kv_heads=1, head_dim=4,
                      ffn_dim=8, layers=specs)
    assert len(cfg.kv_groups) == 6
    assert {g.window for g in cfg.kv_groups if g.attention == "local"} == {1024}


def test_smollm2_skv_is_mqa_with_one_global_layer_in_six():
    cfg = get_preset("smollm2-135m-skv")
    assert cfg.n_kv_heads == 1
    assert sum(s.attention == "global" for s in cfg.layers) == 5
    assert all(s.window == 1024 for s in cfg.layers if s.attention == "local")


def test_kv_bytes_shared_kv_13b_is_over_20x_smaller_at_8k():
    skv, gqa = get_preset("cai-13b-skv"), get_preset("cai-13b-gqa8")
    assert skv.kv_bytes_per_token_per_group == 264  # 2 x (128 int8 + 4-byte scale), MQA
    assert gqa.kv_bytes_per_token_per_group == 2 * 8 * 128 * 2
    assert gqa.kv_bytes(8192) / skv.kv_bytes(8192) > 20
    # local groups stop growing past the window
    assert skv.kv_bytes(32768) - skv.kv_bytes(16384) < (skv.kv_bytes(16384) - skv.kv_bytes(1024)) * 1.2


def test_local_group_holds_only_the_blocks_its_window_covers():
    cfg = get_preset("skv-tiny")  # window 24, block 16
    local = next(g for g in cfg.kv_groups if g.attention == "local")
    glob = next(g for g in cfg.kv_groups if g.attention == "global")
    assert cfg.kv_blocks(local, 16) == 1 and cfg.kv_blocks(glob, 16) == 1
    assert cfg.kv_blocks(local, 40) == 2  # positions 16..39
    assert cfg.kv_blocks(local, 41) == 2  # positions 17..40: blocks 1, 2
    assert cfg.kv_blocks(local, 55) == 3  # positions 31..54: blocks 1, 2, 3
    assert cfg.kv_blocks(glob, 100) == 7


@pytest.mark.parametrize("change, message", [
    (dict(n_heads=3, n_kv_heads=2), "multiple of n_kv_heads"),
    (dict(layers=(LayerSpec("local", 0, None), LayerSpec())), "positive window"),
    (dict(layers=(LayerSpec(), LayerSpec("global", 2))), "kv_source=2 must name this layer or an earlier one"),
    (dict(layers=(LayerSpec("local", 0, 8), LayerSpec("local", 0, 16))), "another attention kind or window"),
    (dict(layers=(LayerSpec(), LayerSpec("local", 0, 8))), "another attention kind or window"),
    (dict(dim=0), "dim must be positive"),
])
def test_invalid_configs_are_refused_naming_the_problem(change, message):
    base = dict(name="bad", vocab_size=8, dim=8, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=4, ffn_dim=8)
    with pytest.raises(ValueError, match=message):
        ModelConfig(**{**base, **change})


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown model preset 'nope'.*smollm2-135m"):
        get_preset("nope")


def test_quant_tags():
    assert QuantConfig().tag == "w8-a8-kv8"
    assert QuantConfig.off().tag == "float32"
    assert dataclasses.replace(QuantConfig(), activations=False).tag == "w8-kv8"


# -- the topology config's GPU keys (pdserve/config.py) ------------------------------------------
def test_gpu_keys_default_to_no_gpu_and_parse_from_toml(tmp_path):
    from pdserve.config import load_config

    assert load_config(None).cluster.device == "auto"
    assert (load_config(None).cluster.prefill_num_gpus, load_config(None).cluster.num_gpus) == (0.0, 0)
    f = tmp_path / "c.toml"
    f.write_text('[cluster]\ndevice = "cuda"\nprefill_num_gpus = 0.5\ndecode_num_gpus = 1\nnum_gpus = 2\n')
    c = load_config(f).cluster
    assert (c.device, c.prefill_num_gpus, c.decode_num_gpus, c.num_gpus) == ("cuda", 0.5, 1.0, 2)


@pytest.mark.parametrize("cluster, message", [
    ({"device": "gpu"}, "config key cluster.device must be one of auto, cpu, cuda, got 'gpu'"),
    ({"prefill_num_gpus": 1.5}, "config key cluster.prefill_num_gpus must be in 0..1"),
    ({"decode_num_gpus": -0.5}, "config key cluster.decode_num_gpus must be in 0..1"),
    ({"decode_num_gpus": "half"}, "config key cluster.decode_num_gpus must be float"),
    ({"num_gpus": -1}, "config key cluster.num_gpus must be >= 0"),
    ({"num_gpus": 0.5}, "config key cluster.num_gpus must be int"),
    ({"device": "cuda", "prefill_num_gpus": 0.5}, "cluster.device = 'cuda' needs a GPU share for every worker"),
])
def test_gpu_key_errors_name_the_key(cluster, message):
    import re

    from pdserve.config import ConfigError, parse

    with pytest.raises(ConfigError, match=re.escape(message)):
        parse({"cluster": cluster})
