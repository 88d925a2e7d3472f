"""Option validation: every rule raises ConfigError with a message naming the problem."""

import pytest

import torch

from launch import python, torchrun
from tp_bench.core.config import BenchConfig
from tp_bench.core.dist import DistContext
from tp_bench.core.errors import ConfigError
from tp_bench.engine.session import prepare
from tp_bench.frontends.arguments import parse_config
from tp_bench.models import get_model_builder
from tp_bench.strategies import registry


def parse(*argv):
    return parse_config(argv)


def test_seed_defaults():
    # The seed's defaults, as the default impl (autotp) resolves them.
    cfg = registry.resolve(parse())
    assert (cfg.model_name, cfg.num_layers, cfg.attn_impl) == ("Qwen/Qwen3-32B", 0, "sdpa")
    assert (cfg.impl, cfg.tp_size, cfg.dp_size, cfg.zero_stage) == ("autotp", None, 1, 1)
    assert cfg.use_vocab_parallel is True
    assert (cfg.batch_size, cfg.seq_length, cfg.num_training_steps) == (1, 2048, 100)
    assert (cfg.learning_rate, cfg.weight_decay, cfg.gradient_accumulation_steps,
            cfg.max_grad_norm) == (1e-5, 0.01, 1, 1.0)
    assert (cfg.dtype, cfg.autocast, cfg.activation_checkpointing) == ("bfloat16", False, False)
    assert (cfg.warmup_steps, cfg.log_interval, cfg.output_dir, cfg.seed) == (
        5, 10, "./results", 42)


def test_bool_flags_and_vocab_parallel_switch():
    assert parse("--autocast").autocast is True
    assert parse("--autocast", "false").autocast is False
    assert parse("--activation_checkpointing", "true").activation_checkpointing is True
    assert parse("--no_vocab_parallel").use_vocab_parallel is False
    assert parse("--use_vocab_parallel").use_vocab_parallel is True


def test_tp_auto_is_world_over_dp():
    assert BenchConfig(impl="fsdp_dtensor", dp_size=2).validate(8).tp_size == 4
    assert BenchConfig(impl="fsdp_dtensor").validate(4).tp_size == 4


@pytest.mark.parametrize("kwargs, world, message", [
    (dict(dp_size=2, tp_size=2), 8, "dp_size * tp_size must equal the world size"),
    (dict(dp_size=3), 8, "not divisible by --dp_size 3"),
    (dict(zero_stage=5), 1, "unknown --zero_stage 5"),
    (dict(impl="megatron"), 1, "unknown --impl 'megatron'"),
    (dict(dtype="int8"), 1, "unknown --dtype 'int8'"),
    (dict(attn_impl="flash"), 1, "unknown --attn_impl 'flash'"),
    (dict(num_training_steps=5, warmup_steps=5), 1, "must exceed --warmup_steps"),
    (dict(batch_size=0), 1, "--batch_size must be >= 1"),
])
def test_validation_errors(kwargs, world, message):
    kwargs = {"impl": "fsdp_dtensor", **kwargs}
    with pytest.raises(ConfigError, match=message.replace("*", r"\*").replace("(", r"\(")):
        registry.resolve(BenchConfig(**kwargs).validate(world))


def test_argparse_errors_are_config_errors():
    with pytest.raises(ConfigError, match="invalid"):
        parse("--batch_size", "x")
    with pytest.raises(ConfigError, match="unrecognized arguments: --bogus"):
        parse("--bogus")


def _ctx(world):
    return DistContext(rank=0, world_size=world, local_rank=0, device=torch.device("cpu"),
                       backend="gloo")


def test_heads_not_divisible_by_tp():
    # Qwen2.5-7B: 28 query heads, 4 kv heads.
    with pytest.raises(ConfigError, match="num_key_value_heads = 4 is not divisible by tp_size = 28"):
        prepare(BenchConfig(impl="fsdp_dtensor", model_name="Qwen/Qwen2.5-7B-Instruct"), _ctx(28))
    with pytest.raises(ConfigError, match="num_attention_heads = 16 is not divisible by tp_size = 3"):
        prepare(BenchConfig(impl="fsdp_dtensor", model_name="tiny"), _ctx(3))


def test_unknown_model():
    with pytest.raises(ConfigError, match="unknown model 'no-such-model'"):
        get_model_builder("no-such-model")


def test_impl_options_resolve_to_the_impl_default_or_are_refused():
    assert registry.resolve(BenchConfig(impl="fsdp_dtensor")).sequence_parallel is True
    assert registry.resolve(BenchConfig(impl="fsdp_dtensor")).zero_stage is None
    assert registry.resolve(BenchConfig(impl="autotp")).sequence_parallel is None
    assert registry.resolve(BenchConfig(impl="autotp", zero_stage=2)).zero_stage == 2
    with pytest.raises(ConfigError, match="--sequence_parallel does not apply to --impl autotp"):
        registry.resolve(BenchConfig(impl="autotp", sequence_parallel=True))


def test_cli_error_is_one_line_and_exit_2():
    proc = python("benchmark.py", "--impl", "fsdp_dtensor", "--zero_stage", "2",
                  "--model_name", "tiny")
    assert proc.returncode == 2
    assert proc.stderr.strip() == "tp_bench: error: --zero_stage does not apply to --impl fsdp_dtensor"


def test_cli_error_printed_once_under_torchrun_every_rank_fails():
    proc = torchrun(2, "benchmark.py", "--impl", "fsdp_dtensor", "--model_name", "tiny",
                    "--dp_size", "2", "--tp_size", "2", timeout=120)
    assert proc.returncode != 0
    assert proc.stderr.count("dp_size * tp_size must equal the world size") == 1
    # no worker traceback; the one left is torchrun's own ChildFailedError report
    assert proc.stderr.count("Traceback (most recent call last)") <= 1
    # both workers exited with status 2
    assert proc.stderr.count("exitcode  : 2") == 2
