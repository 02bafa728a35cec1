"""Reading model configs: both config.json layouts seen in the wild, and Mistral's params.json."""
import pytest

from minispec.mistral.config import MistralConfig

MISTRAL_7B_V01 = {  # the released Mistral-7B-v0.1 config.json (top-level rope_theta)
    "architectures": ["MistralForCausalLM"], "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
    "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 14336, "max_position_embeddings": 32768,
    "model_type": "mistral", "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8,
    "rms_norm_eps": 1e-05, "rope_theta": 10000.0, "sliding_window": 4096, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "transformers_version": "4.34.0.dev0", "use_cache": True, "vocab_size": 32000}


def test_hf_config_of_mistral_7b_v01_gives_the_papers_table_1():
    c = MistralConfig.from_hf_config(MISTRAL_7B_V01)
    assert (c.dim, c.n_layers, c.head_dim, c.hidden_dim, c.n_heads, c.n_kv_heads) == (4096, 32, 128, 14336, 32, 8)
    assert (c.sliding_window, c.vocab_size, c.rope_theta, c.n_rep, c.cache_slots) == (4096, 32000, 10000.0, 4, 4096)


def test_transformers_5_layout_reads_rope_theta_from_rope_parameters():
    cfg = dict(MISTRAL_7B_V01, head_dim=64, sliding_window=None)
    del cfg["rope_theta"]
    cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": 1000000.0}
    c = MistralConfig.from_hf_config(cfg)
    assert c.rope_theta == 1e6 and c.head_dim == 64 and c.sliding_window is None and c.cache_slots == 32768


def test_params_json_without_rope_theta_means_theta_10000_as_mistral_7b_v01_was_trained():
    params = {"dim": 4096, "n_layers": 32, "head_dim": 128, "hidden_dim": 14336, "n_heads": 32, "n_kv_heads": 8,
              "norm_eps": 1e-05, "sliding_window": 4096, "vocab_size": 32000}
    c = MistralConfig.from_params_json(params)
    assert c.rope_theta == 10000.0 and c.sliding_window == 4096 and c.n_kv_heads == 8
    assert MistralConfig.from_params_json(dict(params, rope_theta=1e6)).rope_theta == 1e6


def test_config_is_frozen():
    c = MistralConfig.from_hf_config(MISTRAL_7B_V01)
    with pytest.raises(Exception):
        c.dim = 8


@pytest.mark.parametrize("change,message", [
    ({"num_key_value_heads": 3}, "'num_attention_heads' \\(32\\) must be a multiple of 'num_key_value_heads' \\(3\\)"),
    ({"sliding_window": 0}, "sliding_window"),
    ({"hidden_size": -1}, "'hidden_size' must be a positive integer, got -1"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4}}, "yarn"),
])
def test_bad_configs_raise_one_error_naming_the_field(change, message):
    with pytest.raises(ValueError, match=message):
        MistralConfig.from_hf_config(dict(MISTRAL_7B_V01, **change))


def test_missing_key_is_named_with_the_file(tmp_path):
    cfg = dict(MISTRAL_7B_V01)
    del cfg["vocab_size"]
    with pytest.raises(ValueError, match="config.json.*vocab_size"):
        MistralConfig.from_hf_config(cfg)
