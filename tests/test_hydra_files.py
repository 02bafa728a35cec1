"""Hydra head files (minispec's format and zankner/Hydra's, names written here by hand from Hydra's code), the
proposer finding its heads, device discipline and the command line."""
import json
import re
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from conftest import SHIPPED, random_tensors, rel_err, tiny_config
import minispec
from minispec import generate
from minispec.decoders.hydra import HydraProposer
from minispec.decoders.hydra_heads import prefix_forward
from minispec.decoders.hydra_files import load_heads, read_hydra, save, write_hydra
from minispec.decoders.registry import make_proposer
from minispec.mistral.model import Model
from minispec.errors import UserError
from minispec.mistral.weights import CheckpointError
from test_hydra import ARCHS, BRANCHING, random_heads, shared_output_heads, tiny_model


# ---------------------------------------------------------------------------------------------------------
# Files: zankner/Hydra's names (written here by hand from its hydra/model/hydra_heads/*.py) and round trips
# ---------------------------------------------------------------------------------------------------------
def hydra_names(arch, K, L, D, V, H, Hkv, Dh, F):
    """The state dict of zankner/Hydra's HydraMLP / HydraPrefixMLP, by hand: hydra_mlp[i] is a Sequential of
    ResBlock(D, i+1) then L-1 ResBlock(D) (prefix-mlp: a Dropout before each, so blocks at 1, 3, 5, ...);
    ResBlock(D, c>0) has linear + res_connection, ResBlock(D) only linear; hydra_lm_head[i] is a Linear
    (prefix-mlp: Sequential(Dropout, Linear)); `input_embed_fn` (the base nn.Embedding) is a submodule;
    prefix-mlp adds a 1-layer LlamaModel `prefix_embeding_layer` with embed_tokens and the rotary inv_freq."""
    names = {"input_embed_fn.weight": (V, D)}
    for i in range(K):
        idx = [2 * l + 1 for l in range(L)] if arch == "prefix-mlp" else list(range(L))
        names[f"hydra_mlp.{i}.{idx[0]}.linear.weight"] = (D, (i + 2) * D)
        names[f"hydra_mlp.{i}.{idx[0]}.linear.bias"] = (D,)
        names[f"hydra_mlp.{i}.{idx[0]}.res_connection.weight"] = (D, (i + 2) * D)
        names[f"hydra_mlp.{i}.{idx[0]}.res_connection.bias"] = (D,)
        for j in idx[1:]:
            names[f"hydra_mlp.{i}.{j}.linear.weight"] = (D, D)
            names[f"hydra_mlp.{i}.{j}.linear.bias"] = (D,)
        lm = f"hydra_lm_head.{i}.1" if arch == "prefix-mlp" else f"hydra_lm_head.{i}"
        names[lm + ".weight"], names[lm + ".bias"] = (V, D), (V,)
    if arch == "prefix-mlp":
        pl = "prefix_embeding_layer.layers.0."
        names.update({"prefix_embeding_layer.embed_tokens.weight": (V, D), "prefix_embeding_layer.norm.weight": (D,),
                      pl + "self_attn.q_proj.weight": (H * Dh, D), pl + "self_attn.k_proj.weight": (Hkv * Dh, D),
                      pl + "self_attn.v_proj.weight": (Hkv * Dh, D), pl + "self_attn.o_proj.weight": (D, H * Dh),
                      pl + "self_attn.rotary_emb.inv_freq": (Dh // 2,), pl + "mlp.gate_proj.weight": (F, D),
                      pl + "mlp.up_proj.weight": (F, D), pl + "mlp.down_proj.weight": (D, F),
                      pl + "input_layernorm.weight": (D,), pl + "post_attention_layernorm.weight": (D,)})
    return names


def shared_copy(heads):
    """The heads with blocks 2..L of every head set equal (what zankner/Hydra's shared module holds)."""
    for p in heads.heads:
        p["ws"][...] = p["ws"][:1]
        p["bs"][...] = p["bs"][:1]
    return heads


@pytest.mark.parametrize("arch", ARCHS)
def test_zankner_hydra_format_has_its_names_shapes_and_config_and_round_trips(tmp_path, arch):
    model = tiny_model(V=24)
    c = model.config
    heads = shared_copy(random_heads(model, arch, num_heads=3, num_layers=3))
    write_hydra(heads, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert {k: cfg[k] for k in ("hydra_num_heads", "hydra_num_layers", "hydra_head_arch", "grounded_heads")} == \
        {"hydra_num_heads": 3, "hydra_num_layers": 3, "hydra_head_arch": arch, "grounded_heads": True}
    raw = load_file(str(tmp_path / "hydra_lm_head.safetensors"))
    want = hydra_names(arch, 3, 3, c.dim, c.vocab_size, c.n_heads, c.n_kv_heads, c.head_dim, c.hidden_dim)
    assert {k: tuple(v.shape) for k, v in raw.items()} == want
    b0 = "hydra_mlp.1.1" if arch == "prefix-mlp" else "hydra_mlp.1.0"
    assert np.allclose(raw[b0 + ".res_connection.weight"], heads.heads[1]["res_w"].T)   # nn.Linear: x W^T + b
    assert np.allclose(raw["input_embed_fn.weight"], model.tok_embeddings)
    back = read_hydra(tmp_path, model)
    assert back.arch == arch and (back.K, back.L) == (3, 3)
    a = np.random.default_rng(0).standard_normal((4, 4 * c.dim))
    assert rel_err(back.logits(2, a), heads.logits(2, a)) < 1e-6          # float32 on disk
    if arch == "prefix-mlp":
        X = np.random.default_rng(1).standard_normal((6, c.dim))
        assert rel_err(prefix_forward(back.prefix, c, X), prefix_forward(heads.prefix, c, X)) < 1e-5


def test_writing_hydras_format_refuses_independent_blocks_that_its_shared_module_cannot_hold(tmp_path):
    model = tiny_model()
    heads = random_heads(model, num_heads=2, num_layers=3)
    with pytest.raises(ValueError, match=r"head 0's blocks 2\.\.3 have different weights.*shared module"):
        write_hydra(heads, tmp_path)
    write_hydra(random_heads(model, num_heads=2, num_layers=2), tmp_path)      # one block after the first: fine


@pytest.mark.parametrize("arch", ARCHS)
def test_writing_hydras_format_refuses_heads_sharing_the_output_layer_and_writes_nothing(tmp_path, arch):
    model = tiny_model()
    with pytest.raises(UserError, match=r"share the base model's output layer.*own an lm head"):
        write_hydra(shared_output_heads(model, arch, num_heads=2, num_layers=1), tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("arch", ARCHS)
def test_a_file_of_heads_sharing_the_output_layer_loads_heads_whose_projection_is_the_models_output_layer(tmp_path,
                                                                                                          arch):
    model = tiny_model()
    heads = shared_output_heads(model, arch, num_heads=3, num_layers=2)
    save(heads, tmp_path)
    assert json.loads((tmp_path / "hydra_config.json").read_text())["shared_output"] is True
    names = set(load_file(str(tmp_path / "hydra_heads.safetensors")))
    assert names and not any("lm_head" in n for n in names)             # the blocks only
    back = load_heads(tmp_path, model)
    D = model.config.dim
    a = np.random.default_rng(0).standard_normal((4, 4 * D))
    for i, p in enumerate(back.heads):
        assert p["proj_w"] is model.output and "proj_b" not in p
        assert rel_err(back.logits(i, a[:, :(i + 2) * D]), heads.logits(i, a[:, :(i + 2) * D])) < 1e-6
    own = tmp_path / "own"                                              # heads with their own projections: as before
    save(random_heads(model, arch, num_heads=2), own)
    assert "shared_output" not in json.loads((own / "hydra_config.json").read_text())
    assert all(p["proj_w"] is not model.output and "proj_b" in p for p in load_heads(own, model).heads)
    cfg = json.loads((tmp_path / "hydra_config.json").read_text())      # blocks without lm heads, flag dropped
    del cfg["shared_output"]
    (tmp_path / "hydra_config.json").write_text(json.dumps(cfg))
    lm = "hydra_lm_head.0.1" if arch == "prefix-mlp" else "hydra_lm_head.0"
    with pytest.raises(CheckpointError, match=rf"missing tensor '{re.escape(lm)}\.weight'"):
        load_heads(tmp_path, model)
    cfg["shared_output"] = "yes"
    (tmp_path / "hydra_config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="shared_output"):
        load_heads(tmp_path, model)


def test_minispec_format_keeps_trees_and_accuracies_and_the_proposer_picks_the_cpu_tree(tmp_path):
    model = tiny_model()
    heads = random_heads(model, "prefix-mlp", num_heads=2)
    heads.choices, heads.choices_cuda, heads.accuracies = [[0], [1], [0, 0]], [[0], [1], [0, 0], [1, 0]], [[.5, .2], [.3, .1]]
    save(heads, tmp_path)
    back = load_heads(tmp_path, model)
    assert back.choices == heads.choices and back.choices_cuda == heads.choices_cuda and back.accuracies == heads.accuracies
    assert back.arch == "prefix-mlp" and back.kind == "hydra++"
    assert HydraProposer(model, heads=back).tree.choices == ((), (0,), (1,), (0, 0))
    assert "input_embed_fn.weight" not in load_file(str(tmp_path / "hydra_heads.safetensors"))


def test_a_pickle_file_is_refused_with_the_torch_conversion_line(tmp_path):
    model = tiny_model()
    write_hydra(random_heads(model, num_heads=2, num_layers=1), tmp_path)
    (tmp_path / "hydra_lm_head.safetensors").rename(tmp_path / "hydra_lm_head.pt")
    for where in (tmp_path, tmp_path / "hydra_lm_head.pt"):
        with pytest.raises(CheckpointError, match=r"torch\.load\(.*weights_only=True.*st\.save_file\(\{k: v\.clone\(\)\.contiguous\(\)"):
            read_hydra(where, model)


def test_a_misshaped_missing_or_foreign_tensor_is_named(tmp_path):
    model = tiny_model()
    write_hydra(random_heads(model, num_heads=2, num_layers=1), tmp_path)
    f = tmp_path / "hydra_lm_head.safetensors"
    sd = load_file(str(f))
    sd["hydra_mlp.1.0.linear.weight"] = np.zeros((32, 95), np.float32)
    save_file(sd, str(f))
    with pytest.raises(CheckpointError, match=r"'hydra_mlp\.1\.0\.linear\.weight' has shape \[32, 95\], expected \[32, 96\]"):
        read_hydra(tmp_path, model)
    del sd["hydra_mlp.1.0.linear.weight"]
    save_file(sd, str(f))
    with pytest.raises(CheckpointError, match=r"missing tensor 'hydra_mlp\.1\.0\.linear\.weight' \(expected shape \[32, 96\]"):
        read_hydra(tmp_path, model)
    sd["hydra_mlp.1.0.linear.weight"] = np.zeros((32, 96), np.float32)
    sd["input_embed_fn.weight"] = sd["input_embed_fn.weight"][::-1].copy()          # another base model's table
    save_file(sd, str(f))
    with pytest.raises(CheckpointError, match=r"input_embed_fn\.weight .* differs from this model's tok_embeddings"):
        read_hydra(tmp_path, model)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "grounded_heads": False}))
    with pytest.raises(CheckpointError, match="grounded_heads is false"):
        read_hydra(tmp_path, model)


def test_missing_heads_say_how_to_train_them(tmp_path):
    model = tiny_model()
    model.path = str(tmp_path)
    for kind in ("hydra", "hydra++"):
        k = re.escape(kind)
        with pytest.raises(FileNotFoundError, match=rf"no {k} heads next to .*minispec train-heads --kind {k} --model"):
            generate(model, [1, 2], decoder=kind)
    save(random_heads(model, "prefix-mlp", num_heads=2), tmp_path / "hydra++")
    assert generate(model, [1, 2], decoder="hydra++", max_new_tokens=9).tokens == \
        generate(model, [1, 2], max_new_tokens=9).tokens
    assert make_proposer("hydra++", model).heads is make_proposer("hydra++", model).heads   # loaded once per model


# ---------------------------------------------------------------------------------------------------------
# Device discipline and the command line
# ---------------------------------------------------------------------------------------------------------
def test_hydra_and_hydra_plus_plus_run_without_implicit_host_conversions_and_match_numpy(tmp_path):
    from hostguard import GUARD
    cfg = tiny_config(sliding_window=5, vocab_size=24)
    t = random_tensors(cfg, seed=2)
    plain, guarded = Model(cfg, t, device="cpu"), Model(cfg, t, device=GUARD)
    for arch in ARCHS:
        save(random_heads(plain, arch, seed=2), tmp_path / arch)
        outs = [generate(m, [1, 2, 3], decoder=HydraProposer(m, heads=load_heads(tmp_path / arch, m), tree=BRANCHING),
                         max_new_tokens=12, eos_id=None).tokens for m in (guarded, plain)]
        assert outs[0] == outs[1] == generate(plain, [1, 2, 3], max_new_tokens=12, eos_id=None).tokens


def test_cli_generate_takes_hydra_and_hydra_plus_plus_from_the_decoder_registry(capsys, cli_model):
    from minispec.cli import main
    folder, cfg, tensors = cli_model
    m = Model(cfg, tensors, device="cpu")
    save(random_heads(m, "mlp", num_heads=2), folder / "hydra")
    save(random_heads(m, "prefix-mlp", num_heads=2), folder / "hydra++")
    texts = []
    for decoder in ("ar", "hydra", "hydra++"):
        main(["generate", "--model", str(folder), "--device", "cpu", "--decoder", decoder, "-n", "12", "--prompt", "x"])
        out = capsys.readouterr()
        assert f"[{decoder}] " in out.err
        texts.append(out.out)
    assert texts[0] == texts[1] == texts[2]
    with pytest.raises(SystemExit):
        main(["generate", "--model", str(folder), "--decoder", "hydra+++"])
    assert "invalid choice" in capsys.readouterr().err


def test_an_inf_in_a_hydra_head_file_is_refused_at_load_naming_the_tensor(tmp_path):
    from minispec.decoders.hydra_files import WEIGHTS_NAME
    model = minispec.load(SHIPPED, device="cpu")
    folder = tmp_path / "hydra"
    shutil.copytree(SHIPPED / "hydra", folder)
    t = load_file(str(folder / WEIGHTS_NAME))
    name = sorted(t)[0]
    t[name] = t[name].copy()
    t[name].reshape(-1)[0] = np.inf
    save_file(t, str(folder / WEIGHTS_NAME))
    with pytest.raises(ValueError, match=re.escape(repr(name)) + ".*inf"):
        load_heads(folder, model)
