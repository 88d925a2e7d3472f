"""Synthetic results documents for the comparison and plot tests."""

import json

from tp_bench.core import results

PRECISION = {"param_dtype": "float32", "master_weights": "float32",
             "optimizer_state_dtype": "float32", "compute_dtype": "bfloat16",
             "grad_reduce_dtype": "float32", "mechanism": "torch.autocast", "loss_scaling": None}
MODEL = {"model_name": "tiny", "model_type": "qwen3", "vocab_size": 8192, "hidden_size": 256,
         "intermediate_size": 512, "num_layers": 4, "num_attention_heads": 16,
         "num_key_value_heads": 8, "head_dim": 16, "tie_word_embeddings": False}


def make_doc(step_s=0.1, impl="fsdp_dtensor", tp=2, dp=1, seq=64, dtype="bfloat16",
             layers=4, status="complete", peak_gb=1.0, **config):
    tokens = 2 * seq * dp
    steps = [{"step": i, "loss": 9.0 - 0.1 * i, "step_time_s": step_s * (1 + 0.01 * (i % 3)),
              "forward_time_s": 0.3 * step_s, "backward_time_s": 0.5 * step_s,
              "optimizer_time_s": 0.1 * step_s, "memory_peak_gb": peak_gb}
             for i in range(2, 12)]
    cfg = {"impl": impl, "tp_size": tp, "dp_size": dp, "model_name": "tiny", "num_layers": 0,
           "seq_length": seq, "batch_size": 2, "gradient_accumulation_steps": 1, "dtype": dtype,
           "sequence_parallel": True, "output_dir": "x", **config}
    return {"config": cfg, "steps": steps,
            "summary": results.summarize(steps, tokens, 2 * dp, tp * dp, 10**9, None),
            "status": status, "warmup": [], "model": {**MODEL, "num_layers": layers},
            "precision": {**PRECISION, "compute_dtype": dtype},
            "measurement": {"memory": "cuda_allocator", "tokens_per_step": tokens},
            "environment": {"device_type": "cuda", "device_name": "H100", "torch": "2.13"}}


def write(tmp_path, name, doc):
    path = tmp_path / name
    path.write_text(json.dumps(doc))
    return path
