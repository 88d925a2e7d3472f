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
