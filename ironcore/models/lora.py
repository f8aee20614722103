"""LoRA on a TransformerModel: which layers ``model.lora.targets`` names, freezing the base, switching the
adapters off, merging them, and which tensors a LoRA checkpoint holds (docs/lora.md).

The projection names mean the same for every family: ``q``, ``k``, ``v`` are the parts of the fused
``attn.qkv`` layer, ``o`` is ``attn.out``, ``gate`` and ``up`` the parts of ``mlp.up`` (``up`` alone when the
MLP has no gate), ``down`` is ``mlp.down``; ``qkv`` and ``gate_up`` are one adapter over a whole fused layer.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterator

import torch
from torch import nn

from ironcore.config.model import LoRAConfig
from ironcore.errors import ConfigError
from ironcore.layers.lora import LoRA
from ironcore.parallel.layers import ColumnParallelLinear, RowParallelLinear

# projection -> (layer within a block, the output parts its one adapter covers); "up": targeted_layers
_PARTS = {"q": ("attn.qkv", (0,)), "k": ("attn.qkv", (1,)), "v": ("attn.qkv", (2,)), "qkv": ("attn.qkv", (0, 1, 2)),
          "o": ("attn.out", (0,)), "down": ("mlp.down", (0,)), "gate": ("mlp.up", (0,)), "gate_up": ("mlp.up", (0, 1))}


def targeted_layers(cfg: LoRAConfig, gated: bool) -> dict[str, list[tuple[int, ...]]]:
    """Layer within a block -> the groups of its output parts that get an adapter."""
    layers: dict[str, list[tuple[int, ...]]] = {}
    for name in cfg.projections():
        layer, parts = _PARTS.get(name) or ("mlp.up", (1,) if gated else (0,))  # "up"
        layers.setdefault(layer, []).append(parts)
    return layers


def add_adapters(model: nn.Module, cfg: LoRAConfig) -> None:
    """Give ``model``'s targeted layers their :class:`LoRA` and freeze everything but the adapters and
    ``modules_to_save`` (a reward model's score head always trains). Initialise with :func:`reset_adapters`."""
    gated = model.config.gated_mlp
    for block in model.layers:
        for path, groups in targeted_layers(cfg, gated).items():
            layer = block.get_submodule(path)
            assert isinstance(layer, (ColumnParallelLinear, RowParallelLinear))
            layer.lora = LoRA(layer, groups, cfg.rank, cfg.alpha, cfg.dropout, cfg.use_rslora)
    model.requires_grad_(False)
    for module in adapters(model):
        module.requires_grad_(True)
    for name, param in model.named_parameters():
        if _saved(name, cfg.modules_to_save):
            param.requires_grad_(True)


# modules_to_save name -> the top-level modules it trains in full (norms: every norm, found by name)
_SAVED = {"embed": ("embed", "pos_embed"), "embed_tokens": ("embed", "pos_embed"), "lm_head": ("lm_head",)}


def _saved(name: str, modules: list[str]) -> bool:
    """Whether base parameter ``name`` trains in full (``modules_to_save``; a reward model's score head always)."""
    top, owner = name.split(".")[0], name.rpartition(".")[0].rpartition(".")[2]
    if top == "score" or ("norm" in modules and "norm" in owner):
        return True
    return any(top in _SAVED.get(module, ()) for module in modules)


def adapters(model: nn.Module) -> Iterator[LoRA]:
    """Every :class:`LoRA` of ``model``."""
    return (m for m in model.modules() if isinstance(m, LoRA))


def reset_adapters(model: nn.Module) -> None:
    """PEFT's initialisation of every adapter, in module order from the global RNG (after the base's)."""
    for module in adapters(model):
        if not module.A.weight.is_meta:
            module.reset_parameters()


def trainable_names(model: nn.Module) -> list[str]:
    """The state-dict names a LoRA checkpoint holds: the adapters and the base modules trained in full."""
    return [name for name, param in model.named_parameters() if param.requires_grad]


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """Run ``model`` as its frozen base: adapters off (and dropout off: the base is a reference), restored
    on exit."""
    modules, training = list(adapters(model)), model.training
    for module in modules:
        module.enabled = False
    model.eval()
    try:
        yield
    finally:
        for module in modules:
            module.enabled = True
        model.train(training)


@torch.no_grad()
def merge_adapters(model: nn.Module) -> None:
    """Add every adapter's ``B A * scale`` into its base weight and remove the adapters (an export's weights:
    PEFT's ``merge_and_unload``). Works on each rank's shards; the model is a plain one afterwards (no
    ``config.lora``, every weight trainable)."""
    for module in model.modules():
        lora = getattr(module, "lora", None)
        if isinstance(lora, LoRA):
            weight = module.weight
            if is_quantized(weight):  # QLoRA: the merged weight is the dequantised base plus the update
                weight = weight.get_original_weight()
                module.weight = nn.Parameter(weight + lora.delta_weight().to(weight.dtype))
            else:
                weight.add_(lora.delta_weight().to(weight.dtype))
            module.lora = None
    model.config = dataclasses.replace(model.config, lora=None)
    model.requires_grad_(True)


class AdaptersOff(nn.Module):
    """``model`` run with its adapters switched off: the frozen base, as DPO's and GRPO's reference, without a
    second copy of the weights (TRL does the same with PEFT's ``disable_adapter``)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *args: object, **kwargs: object) -> torch.Tensor:
        with adapters_disabled(self.model):
            return self.model(*args, **kwargs)


NF4_BLOCK, NF4_SCALER_BLOCK = 64, 256  # QLoRA's: 64 weights per absmax scale, 256 scales per second-level scale


def quantize_base(model: nn.Module, device: torch.device | str | None = None) -> None:
    """QLoRA: the frozen base's projection weights (every block's q/k/v, o, MLP) stored in 4-bit NF4 with double
    quantisation (torchao's ``NF4Tensor``, dequantised to the weights' dtype in each matmul). Call after the base
    weights are loaded. Embeddings, norms and the output projection keep their dtype, as in the QLoRA paper.

    ``device``: where each weight is quantised and then kept (default: where it is). The trainer builds the
    model on the host and quantises on its GPU: NF4's nearest-level search took 66 s for a 1B base on a 2-core
    host, and only one bf16 weight at a time is on the GPU beside the NF4 ones."""
    try:
        from torchao.quantization import to_nf4
    except ImportError:
        raise ConfigError("model.lora.quantize_base: nf4 needs torchao (pip install torchao)") from None
    for name, module in base_projections(model):
        weight = module.weight.detach().to(device or module.weight.device)
        blocks = weight.numel() // NF4_BLOCK
        if weight.numel() % NF4_BLOCK:
            raise ConfigError(f"model.lora.quantize_base: {name} has {weight.numel()} elements, not a multiple of "
                              f"the NF4 block ({NF4_BLOCK})")
        scaler_block = math.gcd(blocks, NF4_SCALER_BLOCK)  # 256 unless the tensor is tiny
        module.weight = nn.Parameter(to_nf4(weight, NF4_BLOCK, scaler_block), requires_grad=False)


def base_projections(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(weight name, layer) of every frozen projection of the blocks: what QLoRA quantises (and the memory
    planner counts in NF4)."""
    for name, module in model.layers.named_modules():
        if isinstance(module, (ColumnParallelLinear, RowParallelLinear)) and not module.weight.requires_grad:
            yield f"layers.{name}.weight", module


def is_quantized(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is an NF4-quantised base weight (torchao's ``NF4Tensor``; a parameter of one is one)."""
    return type(tensor).__name__ == "NF4Tensor"


def tensor_bytes(tensor: torch.Tensor) -> int:
    """Bytes ``tensor`` holds: an NF4 weight's packed 4-bit values and its (double-quantised) scales."""
    if is_quantized(tensor):
        inner = (getattr(tensor, name) for name in tensor.__tensor_flatten__()[0])
        return sum(part.numel() * part.element_size() for part in inner)
    return tensor.numel() * tensor.element_size()


def cast_base(model: nn.Module, dtype: torch.dtype) -> None:
    """Store the frozen base in ``dtype`` (bf16 training: the base is never stepped, so it needs no fp32 copy)."""
    for param in model.parameters():
        if not param.requires_grad and param.is_floating_point() and not is_quantized(param):
            param.data = param.data.to(dtype)
