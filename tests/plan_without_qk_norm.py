"""Run `tp_bench parity` with Qwen3's q_norm/k_norm left out of the TP plan (test helper)."""

from tp_bench.frontends.cli import entry
from tp_bench.models.hf_causal_lm import HFCausalLMBuilder
from tp_bench.models.qwen import Qwen3ModelBuilder

Qwen3ModelBuilder.get_tp_mapping = HFCausalLMBuilder.get_tp_mapping
entry()
