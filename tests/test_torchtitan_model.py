"""The torchtitan stack's model, single process on CPU: torchtitan's Qwen3 / Llama3 built from
the HF config computes the HF model's function on the same weights; the weight mapping agrees
with torchtitan's own state-dict adapter and fused-q/k/v load and save hooks, both ways; and
what the stack cannot run is refused with one clear ConfigError before any model is built."""

import json

import pytest
import torch

from tp_bench.core.config import BenchConfig
from tp_bench.core.data import SyntheticData
from tp_bench.core.dist import DistContext
from tp_bench.core.errors import ConfigError
from tp_bench.engine.session import prepare
from tp_bench.models import get_model_builder
from tp_bench.strategies import registry

TINY_TIED = "tests/data/tiny_qwen3_tied.json"
TINY_LLAMA = "tests/data/tiny_llama.json"
TINY_QWEN2 = "tests/data/tiny_qwen2.json"


def _ctx():
    return DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"),
                       backend="gloo")


def _models(model_name):
    """The HF model with perturbed weights (norms away from 1, so a swapped norm would show),
    and torchtitan's model loaded by torchtitan's own adapter and load hooks."""
    pytest.importorskip("torchtitan")
    from tp_bench.strategies.torchtitan import torchtitan_model

    builder = get_model_builder(model_name)
    cfg = BenchConfig(impl="torchtitan", model_name=model_name, num_layers=2, seq_length=32,
                      tp_size=1)
    hf = builder.create_model("cpu", torch.float32, num_layers=2)
    builder.init_weights(hf, cfg.seed)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in hf.parameters():
            p.mul_(1 + 0.1 * torch.randn(p.shape, generator=generator))
    tt = torchtitan_model(cfg, builder)
    model = tt.build()
    model.to_empty(device="cpu")
    with torch.no_grad():
        model.init_states(buffer_device=None)
    hf_state = {k: v.detach().clone() for k, v in hf.state_dict().items()}
    model.load_state_dict(tt.adapter.from_hf(dict(hf_state)), strict=True)
    return hf, tt, model, hf_state


@pytest.mark.parametrize("model_name", ["tiny", TINY_TIED, TINY_LLAMA])
def test_mapping_agrees_with_torchtitans_adapter_and_hooks(model_name):
    from tp_bench.strategies.torchtitan_model import layer_groups

    hf, tt, model, hf_state = _models(model_name)
    hf_params = {n: p.detach() for n, p in hf.named_parameters()}
    ours = {}
    for group in layer_groups(list(hf_params)):   # as the stack maps them: layer by layer
        ours.update(tt.from_hf({n: hf_params[n] for n in group}))
    params = dict(model.named_parameters())
    assert set(params) <= set(ours)
    for name, param in params.items():
        assert torch.equal(ours[name], param.detach()), name
    # Back: our split + adapter equals the HF values, as does torchtitan's own save hook.
    back = tt.to_hf({n: p.detach() for n, p in params.items()})
    theirs = tt.adapter.to_hf(model.state_dict())
    for name, value in hf.named_parameters():
        assert torch.equal(back[name], value.detach()), name
        assert torch.equal(theirs[name], value.detach()), name
    if tt.tied:
        assert model.tok_embeddings.weight is model.lm_head.weight


@pytest.mark.parametrize("model_name", ["tiny", TINY_TIED, TINY_LLAMA])
def test_torchtitans_model_computes_the_hf_function(model_name):
    """Same logits to float32 rounding (HF and torchtitan order a few float ops differently),
    and the stack's loss equals HF's mean causal loss."""
    from torchtitan.components.loss import CrossEntropyLoss

    from tp_bench.strategies.torchtitan import causal_lm_loss

    hf, tt, model, _ = _models(model_name)
    batch = SyntheticData(hf.config.vocab_size, 2, 32, seed=1).batch(0)
    with torch.no_grad():
        ref = hf(input_ids=batch.input_ids, labels=batch.labels, use_cache=False)
        logits = model(batch.input_ids)
        loss = causal_lm_loss(CrossEntropyLoss(CrossEntropyLoss.Config()), model, batch)
    assert (logits - ref.logits).abs().max().item() <= 1e-5
    assert abs(loss.item() - ref.loss.item()) <= 1e-5
    # The check has power: Llama's q rows without the adapter's rotary permutation differ.
    if tt.family == "llama":
        state = dict(model.state_dict())   # the save hook splits wqkv into wq, wk, wv
        for key in [k for k in state if k.endswith("qkv_linear.wq.weight")]:
            layer = key.split(".")[1]
            state[key] = hf.state_dict()[f"model.layers.{layer}.self_attn.q_proj.weight"]
        model.load_state_dict(state)
        with torch.no_grad():
            assert (model(batch.input_ids) - ref.logits).abs().max().item() > 1e-3


@pytest.mark.parametrize("kwargs, message", [
    (dict(model_name=TINY_QWEN2), "torchtitan's own Qwen3 and Llama3 models; 'qwen2' is neither"),
    (dict(attn_impl="eager"), "--attn_impl eager does not apply to --impl torchtitan"),
    (dict(norm_impl="hf"), "--norm_impl hf does not apply to --impl torchtitan"),
    (dict(dtype="float16"), "casts parameters to bfloat16 only"),
    (dict(async_tp=True, compile=True), "--async_tp needs CUDA, --compile and tp_size > 1"),
    (dict(use_vocab_parallel=False), "--use_vocab_parallel false is not offered by --impl "
                                     "torchtitan"),
    (dict(meta_init=False), "--meta_init does not apply to --impl torchtitan"),
])
def test_what_torchtitan_cannot_run_is_refused(kwargs, message):
    pytest.importorskip("torchtitan")
    cfg = BenchConfig(**{"impl": "torchtitan", "model_name": "tiny", "num_layers": 2,
                         "seq_length": 32, **kwargs})
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        prepare(cfg, _ctx())


def test_async_tp_is_torchtitans_alone():
    with pytest.raises(ConfigError, match="--async_tp does not apply to --impl fsdp_dtensor"):
        registry.resolve(BenchConfig(impl="fsdp_dtensor", async_tp=True))


def test_without_torchtitan_the_stack_is_unavailable_with_one_clear_message(monkeypatch):
    monkeypatch.setitem(registry._EXTRAS, "torchtitan",
                        ("no_such_package_here", "pip install 'tp_bench[torchtitan]'"))
    assert "torchtitan" not in registry.available()
    assert "fsdp_dtensor" in registry.available()
    with pytest.raises(ConfigError, match=r"--impl torchtitan needs the no_such_package_here "
                                          r"package, which is not installed: pip install"):
        registry.resolve(BenchConfig(impl="torchtitan"))


def test_another_torchtitan_release_is_refused(monkeypatch):
    pytest.importorskip("torchtitan")
    from tp_bench.strategies import torchtitan_compat

    monkeypatch.setattr(torchtitan_compat, "version", lambda: "0.4.0")
    with pytest.raises(ConfigError, match="written against torchtitan 0.3.0; torchtitan 0.4.0"):
        torchtitan_compat.import_torchtitan()


def test_options_and_sweep_are_declared():
    pytest.importorskip("torchtitan")
    strategy = registry.get("torchtitan")
    assert set(strategy.sweep) <= set(strategy.options)
    assert strategy.options["use_vocab_parallel"] == (True,)
    resolved = registry.resolve(BenchConfig(impl="torchtitan"))
    assert (resolved.async_tp, resolved.sequence_parallel, resolved.meta_init) == (
        False, True, None)


TORCH_211_FSDP = """
import sys
import torch.distributed.fsdp as fsdp

# torch 2.11's FSDP surface: no DataParallelMeshDims, no fully_shard(dp_mesh_dims=...).
del fsdp.DataParallelMeshDims
_fully_shard = fsdp.fully_shard


def fully_shard(module, *, mesh=None, reshard_after_forward=None, shard_placement_fn=None,
                mp_policy=fsdp.MixedPrecisionPolicy(), offload_policy=fsdp.OffloadPolicy(),
                ignored_params=None):
    return _fully_shard(module, mesh=mesh, reshard_after_forward=reshard_after_forward,
                        shard_placement_fn=shard_placement_fn, mp_policy=mp_policy,
                        offload_policy=offload_policy, ignored_params=ignored_params)


fsdp.fully_shard = fully_shard
from tp_bench.frontends.cli import entry

sys.argv[0] = "tp-bench"
entry()
"""


def test_trains_on_torch_2_11s_fsdp(tmp_path):
    """The GPU machines run torch 2.11, whose FSDP lacks what torchtitan 0.3.0 imports and its
    other SPMD backends pass: with that surface, the stack still trains like the reference."""
    pytest.importorskip("torchtitan")
    from launch import REPO, python

    script = tmp_path / "torch211.py"
    script.write_text(TORCH_211_FSDP)
    report_path = tmp_path / "parity.json"
    proc = python(str(script), "parity", "--impl", "torchtitan", "--model_name", "tiny",
                  "--num_layers", "2", "--seq_length", "32", "--batch_size", "2",
                  "--dtype", "float32", "--learning_rate", "1e-3", "--parity_steps", "3",
                  "--report", str(report_path), timeout=300,
                  env={"PYTHONPATH": str(REPO)})   # the script lives outside the checkout
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(report_path.read_text())
    assert report["ok"] and report["step0_loss_diff"] <= 1e-5
