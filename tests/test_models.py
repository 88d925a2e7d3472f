"""Model presets, builders, FLOP count and deterministic initialization."""

import json

import pytest
import torch

from launch import python
from tp_bench.models import get_model_builder
from tp_bench.models.resolve import list_presets

REQUIRED_PRESETS = {"Qwen/Qwen3-0.6B", "Qwen/Qwen3-1.7B", "Qwen/Qwen3-4B", "Qwen/Qwen3-8B",
                    "Qwen/Qwen3-14B", "Qwen/Qwen3-32B", "Qwen/Qwen2.5-7B-Instruct",
                    "meta-llama/Llama-3.1-8B", "tiny"}


def test_required_presets_ship():
    assert REQUIRED_PRESETS <= {p.name for p in list_presets()}


@pytest.mark.parametrize("name, billions", [("Qwen/Qwen3-0.6B", 0.596), ("Qwen/Qwen3-8B", 8.19),
                                            ("Qwen/Qwen3-32B", 32.76),
                                            ("meta-llama/Llama-3.1-8B", 8.03),
                                            ("Qwen/Qwen2.5-7B-Instruct", 7.62)])
def test_preset_parameter_counts_match_published_sizes(name, billions):
    assert get_model_builder(name).get_config().num_parameters / 1e9 == pytest.approx(billions,
                                                                                     rel=0.01)


def test_lookup_by_short_name_local_dir_and_json(tmp_path):
    assert get_model_builder("qwen3-1.7b").hf_config.hidden_size == 2048
    config = json.loads(next(p for p in list_presets() if p.key == "tiny").path.read_text())
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert get_model_builder(str(tmp_path)).hf_config.hidden_size == 256
    assert get_model_builder(str(tmp_path / "config.json")).hf_config.hidden_size == 256


def test_tiny_flops_hand_count():
    mc = get_model_builder("tiny").get_config()
    h, inter, layers, heads, kv, hd, vocab = 256, 512, 4, 16, 8, 16, 8192
    per_layer = (h * heads * hd + 2 * h * kv * hd + heads * hd * h   # q, k, v, o
                 + 3 * h * inter                                     # gate, up, down
                 + 2 * hd + 2 * h)                                   # q/k norm, 2 layer norms
    total = layers * per_layer + vocab * h + h + vocab * h           # embed, final norm, lm_head
    assert mc.num_parameters == total
    non_embedding = total - vocab * h
    assert mc.flops_per_token(128) == 6 * non_embedding + 12 * layers * heads * hd * 128


def test_tied_embeddings_count_the_lm_head_matmul():
    mc = get_model_builder("Qwen/Qwen3-1.7B").get_config()
    assert mc.tie_word_embeddings
    assert mc.matmul_parameters == mc.num_parameters   # embedding lookup out, tied head back in


def test_num_layers_and_attn_impl_are_honoured():
    builder = get_model_builder("tiny")
    model = builder.create_model("meta", torch.float32, num_layers=2, attn_impl="eager")
    assert len(builder.get_transformer_layers(model)) == 2
    assert model.config._attn_implementation == "eager"
    assert builder.model_config(num_layers=2).num_layers == 2


def test_sdpa_builds_without_the_per_forward_mask(monkeypatch):
    """--attn_impl sdpa on an all-causal model skips transformers' mask building (whose packed-
    sequence check reads a tensor on the host every forward) and computes what HuggingFace's
    masked attention computes; a model with a sliding window keeps HuggingFace's masks."""
    import transformers.masking_utils as masking

    from tp_bench.models.causal_attention import CAUSAL_SDPA

    checks = []
    real = masking.find_packed_sequence_indices
    monkeypatch.setattr(masking, "find_packed_sequence_indices",
                        lambda *a, **k: checks.append(1) or real(*a, **k))
    builder = get_model_builder("tiny")
    ids = torch.randint(0, 8192, (2, 24))
    logits, models = {}, {}
    for impl in ("sdpa", "eager"):
        models[impl] = model = builder.create_model("cpu", torch.float32, num_layers=2,
                                                    attn_impl=impl)
        builder.init_weights(model, seed=3)
        logits[impl] = model(input_ids=ids, use_cache=False).logits
        assert len(checks) == (0 if impl == "sdpa" else 1)
        checks.clear()
    assert models["sdpa"].config._attn_implementation == CAUSAL_SDPA
    torch.testing.assert_close(logits["sdpa"], logits["eager"], rtol=1e-5, atol=1e-5)
    later = ids.clone()
    later[:, -1] = (ids[:, -1] + 1) % 8192        # causal: the last token changes no earlier logit
    changed = models["sdpa"](input_ids=later, use_cache=False).logits
    torch.testing.assert_close(changed[:, :-1], logits["sdpa"][:, :-1], rtol=0, atol=0)
    assert not torch.allclose(changed[:, -1], logits["sdpa"][:, -1])
    builder.hf_config.use_sliding_window, builder.hf_config.sliding_window = True, 8
    try:
        assert builder.hf_config_for(2, "sdpa")._attn_implementation == "sdpa"
    finally:
        builder.hf_config.use_sliding_window, builder.hf_config.sliding_window = False, None


def test_fused_norm_is_huggingfaces_norm_in_one_kernel():
    """--norm_impl fused swaps every RMSNorm (two per layer, q/k norms, the final norm) for
    F.rms_norm: same parameter names, same output in float32; a mixed-dtype input keeps
    HuggingFace's forward (type promotion)."""
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

    builder = get_model_builder("tiny")
    hf = builder.create_model("cpu", torch.float32, num_layers=2, norm_impl="hf")
    fused = builder.create_model("cpu", torch.float32, num_layers=2)
    builder.init_weights(hf, seed=3)
    builder.init_weights(fused, seed=3)
    with torch.no_grad():
        for p in hf.parameters():      # norms away from 1, so the weight enters
            if p.dim() == 1:
                p.uniform_(0.5, 1.5)
        fused.load_state_dict(hf.state_dict())
    norms = [m for m in fused.modules() if isinstance(m, Qwen3RMSNorm)]
    assert len(norms) == 2 * 4 + 1 and all(type(m) is not Qwen3RMSNorm for m in norms)
    assert all(type(m) is Qwen3RMSNorm for m in hf.modules() if isinstance(m, Qwen3RMSNorm))
    assert [n for n, _ in hf.named_parameters()] == [n for n, _ in fused.named_parameters()]
    ids = torch.randint(0, 8192, (2, 16))
    diff = (fused(input_ids=ids).logits - hf(input_ids=ids).logits).abs().max().item()
    assert diff < 1e-5
    x = torch.randn(3, 256, dtype=torch.bfloat16)
    assert torch.equal(norms[-1](x), Qwen3RMSNorm.forward(norms[-1], x))   # float32 weight
    with torch.no_grad():
        assert torch.equal(norms[-1](x.float()), torch.nn.functional.rms_norm(
            x.float(), (256,), norms[-1].weight, norms[-1].variance_epsilon))


@pytest.mark.parametrize("name", ["tiny", "tests/data/tiny_qwen2.json",
                                  "tests/data/tiny_llama.json"])
def test_fused_qkv_is_the_separate_projections(name):
    """--fused_qkv: one projection (Qwen3 with q/k norms, Qwen2 with biases, Llama) computes
    what the three separate ones compute, from the same initial values, built on the meta
    device and materialized, or fused from a model with values; its gradient split back
    under the separate names is theirs."""
    import copy

    from tp_bench.models.fused_qkv import QKVProjection, fuse_qkv, split_fused_gradients

    builder = get_model_builder(name)
    separate = builder.create_model("cpu", torch.float32, num_layers=2)
    builder.init_weights(separate, seed=3)
    with torch.no_grad():
        for p in separate.parameters():
            if p.dim() == 1:            # biases and norms away from 0 and 1, so they enter
                p.uniform_(0.5, 1.5)
    fused_copy = copy.deepcopy(separate)
    assert fuse_qkv(fused_copy) == 2
    meta = builder.create_model("meta", torch.float32, num_layers=2)
    fuse_qkv(meta)
    builder.materialize(meta, torch.device("cpu"), seed=3)
    ids = torch.randint(0, separate.config.vocab_size, (2, 24))
    losses = {}
    for kind, model in (("separate", separate), ("fused", fused_copy)):
        losses[kind] = model(input_ids=ids, labels=ids, use_cache=False).loss
        losses[kind].backward()
    torch.testing.assert_close(losses["fused"], losses["separate"], rtol=1e-6, atol=1e-6)
    assert "q_proj" not in dict(meta.named_modules())["model.layers.0.self_attn"]._modules
    projections = {n: m for n, m in fused_copy.named_modules() if isinstance(m, QKVProjection)}
    grads = split_fused_gradients(projections, {n: p.grad for n, p in
                                                fused_copy.named_parameters()})
    expected = {n: p.grad for n, p in separate.named_parameters()}
    assert grads.keys() == expected.keys()
    for key, grad in expected.items():
        torch.testing.assert_close(grads[key], grad, rtol=1e-5, atol=1e-7)
    # Built on the meta device: every value as the separate model's initial one.
    reference = builder.create_model("cpu", torch.float32, num_layers=2)
    builder.init_weights(reference, seed=3)
    meta_values = split_fused_gradients(
        {n: m for n, m in meta.named_modules() if isinstance(m, QKVProjection)},
        {n: p.detach() for n, p in meta.named_parameters()})
    for key, value in reference.state_dict().items():
        if key in meta_values:
            torch.testing.assert_close(meta_values[key], value, rtol=0, atol=0)


def test_fused_qkv_saves_no_more_for_backward_than_the_separate_projections():
    """q, k and v leave the fused output as copies: views of it would keep the whole output
    alive for backward (1.1% more saved bytes on this model, 0.22 GB on Qwen3-1.7B)."""
    import copy

    from tp_bench.models.fused_qkv import fuse_qkv

    def saved_bytes(model, ids):
        storages = {}

        def pack(t):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(input_ids=ids, labels=ids, use_cache=False)
        return sum(storages.values())

    builder = get_model_builder("tiny")
    separate = builder.create_model("cpu", torch.float32, num_layers=2)
    fused = copy.deepcopy(separate)
    fuse_qkv(fused)
    ids = torch.randint(0, 8192, (2, 64))
    assert saved_bytes(fused, ids) <= saved_bytes(separate, ids)


def test_fused_qkv_rows_split_over_tp_into_whole_head_groups():
    """A colwise TP shard of the fused weight is the fused weight of that rank's shards of the
    separate projections: its query heads with the key and value heads they attend with."""
    from tp_bench.models.fused_qkv import QKVProjection

    proj = QKVProjection(8, num_heads=8, num_kv_heads=4, head_dim=2, bias=False)
    q, k, v = torch.randn(16, 8), torch.randn(8, 8), torch.randn(8, 8)
    fused = proj.join(q, k, v)
    for tp in (2, 4):
        shards = zip(*(t.chunk(tp) for t in (q, k, v)))
        rank_proj = QKVProjection(8, num_heads=8 // tp, num_kv_heads=4 // tp, head_dim=2,
                                  bias=False)
        for rank, (qs, ks, vs) in enumerate(shards):
            torch.testing.assert_close(fused.chunk(tp)[rank], rank_proj.join(qs, ks, vs))
    assert all(torch.equal(a, b) for a, b in zip(proj.unjoin(fused), (q, k, v)))


def test_the_causal_loss_is_huggingfaces():
    """strategies.causal_loss computes what model(labels=...).loss does, and ignores what
    HuggingFace ignores."""
    from tp_bench.core.data import Batch
    from tp_bench.strategies.causal_loss import eager_causal_lm_loss

    builder = get_model_builder("tiny")
    model = builder.create_model("cpu", torch.float32, num_layers=1)
    builder.init_weights(model, seed=1)
    ids = torch.randint(0, 8192, (2, 16))
    labels = ids.clone()
    labels[0, 5:9] = -100
    ours = eager_causal_lm_loss(model, Batch(ids, labels))
    theirs = model(input_ids=ids, labels=labels).loss
    assert abs(ours.item() - theirs.item()) < 1e-6
    labels[1, 3] = 7                                      # a changed label changes the loss
    assert abs(eager_causal_lm_loss(model, Batch(ids, labels)).item() - theirs.item()) > 1e-4


def test_init_weights_is_deterministic_and_follows_the_model_init():
    builder = get_model_builder("tiny")
    a = builder.create_model("cpu", torch.float32, num_layers=1)
    b = builder.create_model("cpu", torch.float32, num_layers=1)
    torch.manual_seed(123)  # global RNG state must not matter
    builder.init_weights(a, seed=7)
    builder.init_weights(b, seed=7)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa, pb), name
    norm = a.model.layers[0].input_layernorm.weight
    assert torch.equal(norm, torch.ones_like(norm))
    std = a.model.layers[0].mlp.up_proj.weight.std().item()
    assert std == pytest.approx(0.02, rel=0.05)
    c = builder.create_model("cpu", torch.float32, num_layers=1)
    builder.init_weights(c, seed=8)
    assert not torch.equal(a.lm_head.weight, c.lm_head.weight)


def test_models_command_lists_presets():
    proc = python("-m", "tp_bench", "models")
    assert proc.returncode == 0, proc.stderr
    for name in REQUIRED_PRESETS:
        assert name in proc.stdout
