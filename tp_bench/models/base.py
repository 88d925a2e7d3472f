"""The model-builder interface (the seed's "Adding New Models" contract) and ModelConfig."""

from __future__ import annotations

import copy
import zlib
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from tp_bench.models.causal_attention import attn_implementation
from tp_bench.models.fused_qkv import QKVProjection, part_names
from tp_bench.models.resolve import load_hf_config
from tp_bench.models.tp_plan import TPPlan, root_plan

# Wrapper prefixes that activation checkpointing, torch.compile and FSDP1 put into parameter
# names; stripped so a parameter's init seed does not depend on how it was wrapped.
_WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "_orig_mod.", "_fsdp_wrapped_module.")


@dataclass(frozen=True)
class ModelConfig:
    """The dimensions a benchmark needs, read from the HuggingFace config."""

    model_name: str
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    tie_word_embeddings: bool
    num_parameters: int            # unique parameters of the model as built (after --num_layers)

    @property
    def embedding_parameters(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def matmul_parameters(self) -> int:
        """Non-embedding parameters: everything but the input embedding lookup.

        A tied lm_head shares its weight with the embedding yet still does a full matmul, so it
        is counted back in.
        """
        tied_head = self.embedding_parameters if self.tie_word_embeddings else 0
        return self.num_parameters - self.embedding_parameters + tied_head

    def flops_per_token(self, seq_length: int) -> int:
        """Training FLOPs per token (forward + backward), the standard dense estimate:
        6 x non-embedding parameters + 12 x layers x heads x head_dim x seq."""
        attention = 12 * self.num_layers * self.num_attention_heads * self.head_dim * seq_length
        return 6 * self.matmul_parameters + attention

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "matmul_parameters": self.matmul_parameters}


def canonical_param_name(name: str) -> str:
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def _param_seed(seed: int, name: str) -> int:
    # crc32, not hash(): Python string hashes differ per process, and every rank must agree.
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63 - 1)


def write_full_value(param: torch.Tensor, full: torch.Tensor) -> None:
    """Copy a full-size value into a parameter that may be a DTensor shard."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(param, DTensor):
        # src_data_rank=None: every rank already holds the same full value, so each rank takes
        # its own shard locally with no communication.
        local = distribute_tensor(full, param.device_mesh, param.placements,
                                  src_data_rank=None).to_local()
        param.to_local().copy_(local)
    else:
        param.copy_(full)


class BaseModelBuilder(ABC):
    """Builds one model family. Subclasses register with ``@register_model("<model_type>")``.

    Where the layers, the embedding, the final norm and the lm_head live is data (module paths),
    and so is the TP plan (``tp_plan``): a family whose layout differs overrides the paths and
    ``get_tp_mapping``; the rest follows.
    """

    layers_path = "model.layers"
    embedding_path = "model.embed_tokens"
    final_norm_path = "model.norm"
    lm_head_path = "lm_head"

    def __init__(self, model_name: str):
        self.model_name = model_name
        self.hf_config = load_hf_config(model_name)

    # ------------------------------------------------------------------ the seed's interface
    def get_config(self) -> ModelConfig:
        """Return the model's dimensions (the full depth; see ``model_config`` for overrides)."""
        return self.model_config(num_layers=0)

    @abstractmethod
    def create_model(self, device: torch.device | str, dtype: torch.dtype, num_layers: int = 0,
                     attn_impl: str = "sdpa", norm_impl: str = "fused") -> nn.Module:
        """Create the model (random init) on ``device`` ("meta" allowed) in ``dtype``, its
        RMSNorms fused or HuggingFace's (``models.fused_norm``)."""

    @abstractmethod
    def get_tp_mapping(self) -> dict[str, Any]:
        """DTensor ParallelStyle per submodule of one transformer layer."""

    def get_transformer_layers(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.layers_path)

    def get_embedding_module(self, model: nn.Module) -> nn.Module:
        return model.get_submodule(self.embedding_path)

    def replace_embedding_module(self, model: nn.Module, new_embedding: nn.Module) -> None:
        _set_submodule(model, self.embedding_path, new_embedding)

    # ------------------------------------------------------------------ additions
    def get_lm_head(self, model: nn.Module) -> nn.Module:
        return model.get_submodule(self.lm_head_path)

    def replace_lm_head(self, model: nn.Module, new_lm_head: nn.Module) -> None:
        _set_submodule(model, self.lm_head_path, new_lm_head)

    def get_final_norm(self, model: nn.Module) -> nn.Module:
        return model.get_submodule(self.final_norm_path)

    def get_sequence_parallel_mapping(self) -> dict[str, Any]:
        """Entries that turn ``get_tp_mapping()`` into a sequence-parallel layer plan: the
        residual stream stays sharded on the sequence dim between the blocks (norms
        SequenceParallel, blocks gather it, row-parallel outputs reduce-scatter back)."""
        raise NotImplementedError(f"{type(self).__name__} has no sequence-parallel plan")

    def tp_plan(self, vocab_parallel: bool, sequence_parallel: bool) -> TPPlan:
        """The DTensor TP plan of this family, as data (see models.tp_plan)."""
        layer = dict(self.get_tp_mapping())
        if sequence_parallel:
            layer.update(self.get_sequence_parallel_mapping())
        root = root_plan(self.embedding_path, self.final_norm_path, self.lm_head_path,
                         vocab_parallel, sequence_parallel)
        return TPPlan(root=root, layer=layer, layers_path=self.layers_path)

    def hf_config_for(self, num_layers: int = 0, attn_impl: str = "sdpa"):
        """A copy of the HF config with the depth override and attention backend applied."""
        config = copy.deepcopy(self.hf_config)
        if num_layers:
            config.num_hidden_layers = num_layers
            if getattr(config, "layer_types", None):
                config.layer_types = config.layer_types[:num_layers]
            if hasattr(config, "max_window_layers"):
                config.max_window_layers = min(config.max_window_layers, num_layers)
        config.use_cache = False
        config._attn_implementation = attn_implementation(config, attn_impl)
        return config

    def model_config(self, num_layers: int = 0) -> ModelConfig:
        """Dimensions and exact parameter count of the model as it will be built."""
        c = self.hf_config_for(num_layers)
        meta_model = self.create_model("meta", torch.float32, num_layers=num_layers)
        num_params = sum(p.numel() for p in meta_model.parameters())  # tied weights count once
        heads = c.num_attention_heads
        return ModelConfig(
            model_name=self.model_name,
            model_type=c.model_type,
            vocab_size=c.vocab_size,
            hidden_size=c.hidden_size,
            intermediate_size=c.intermediate_size,
            num_layers=c.num_hidden_layers,
            num_attention_heads=heads,
            num_key_value_heads=getattr(c, "num_key_value_heads", None) or heads,
            head_dim=getattr(c, "head_dim", None) or c.hidden_size // heads,
            tie_word_embeddings=bool(getattr(c, "tie_word_embeddings", False)),
            num_parameters=num_params,
        )

    @torch.no_grad()
    def init_weights(self, model: nn.Module, seed: int) -> None:
        """Initialize every parameter as the model's own ``_init_weights`` does (normal(0, std)
        for linear and embedding weights, ones for norms, zeros for biases), drawing each
        parameter from a generator seeded by (seed, parameter name).

        The values therefore do not depend on construction order, wrapping, sharding or the
        strategy, so every strategy and the single-process reference start from identical
        weights; sharded (DTensor) parameters get exactly their slice of the full value.
        """
        for name, param in model.named_parameters():  # tied weights appear once
            full = self.initial_value(model, name, seed, param.device)
            write_full_value(param, full.to(param.dtype))
        self.reset_buffers(model)

    def initial_value(self, model: nn.Module, name: str, seed: int,
                      device: torch.device | str) -> torch.Tensor:
        """The full float32 initial value of parameter ``name`` of ``model`` (unsharded, as
        built by ``create_model``; a meta-device model will do), drawn on ``device``."""
        std = getattr(self.hf_config, "initializer_range", None) or 0.02
        module_name, _, leaf = name.rpartition(".")
        owner = model.get_submodule(module_name) if module_name else model
        canonical = canonical_param_name(name)
        device = torch.device(device)
        if isinstance(owner, QKVProjection):   # drawn as the separate projections', then joined
            return owner.join(*(self._initial_value(owner, leaf, shape, std, device,
                                                    _param_seed(seed, part), part)
                                for part, shape in zip(part_names(canonical),
                                                       owner.part_shapes(leaf))))
        shape = tuple(getattr(owner, leaf).shape)   # a DTensor's shape is the global one
        return self._initial_value(owner, leaf, shape, std, device,
                                   _param_seed(seed, canonical), canonical)

    def _initial_value(self, owner: nn.Module, leaf: str, shape: tuple[int, ...], std: float,
                       device: torch.device, seed: int, name: str) -> torch.Tensor:
        kind = type(owner).__name__
        if leaf == "bias":
            return torch.zeros(shape, device=device)
        if "Norm" in kind:
            return torch.ones(shape, device=device)
        if isinstance(owner, (nn.Linear, nn.Embedding)) or "Embedding" in kind or "Linear" in kind:
            generator = torch.Generator(device=device).manual_seed(seed)
            value = torch.empty(shape, device=device).normal_(0.0, std, generator=generator)
            padding_idx = getattr(owner, "padding_idx", None)
            if isinstance(owner, nn.Embedding) and padding_idx is not None:
                value[padding_idx] = 0
            return value
        raise NotImplementedError(f"{type(self).__name__}.init_weights: no rule for parameter "
                                  f"{name} of {kind}; override _initial_value")

    def reset_buffers(self, model: nn.Module) -> None:
        """Recompute non-persistent buffers (rotary frequencies), which ``to_empty`` leaves
        uninitialized when the model was built on the meta device."""
        for module_name, module in list(model.named_modules()):
            if "RotaryEmbedding" in type(module).__name__:
                device = next((b.device for b in module.buffers()), None)
                if device is None or device.type == "meta":
                    continue
                with torch.device(device):  # constructors differ across transformers versions
                    fresh = type(module)(config=module.config)
                parent_name, _, child = module_name.rpartition(".")
                parent = model.get_submodule(parent_name) if parent_name else model
                setattr(parent, child, fresh)

    def materialize(self, model: nn.Module, device: torch.device, seed: int) -> None:
        """Give a meta-built (possibly sharded) model real storage on ``device`` and its
        initial values; each rank fills only its own shards.

        ``to_empty`` gives every module its own new parameter, so a model with tied embeddings
        would come out with an lm_head that no longer shares the embedding's weight (a
        different, larger model, silently): tie them again first.
        """
        embedding, lm_head = self.get_embedding_module(model), self.get_lm_head(model)
        tied = embedding.weight is lm_head.weight
        model.to_empty(device=device)
        if tied and lm_head.weight is not embedding.weight:
            lm_head.weight = embedding.weight
        self.init_weights(model, seed)


def _set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent_path) if parent_path else model, name, module)
