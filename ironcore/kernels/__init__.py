"""Fused Triton kernels, each one module behind a small function, with the torch code in ``layers/`` as reference.

| kernel | module | stands in for |
|---|---|---|
| RMSNorm (Gemma's ``1 + w`` too), LayerNorm | ``norm.py`` | ``layers/norm.py`` |
| RoPE on q and k, in place | ``rope.py`` | ``layers/rope.apply_rotary`` |
| SwiGLU / GeGLU (the gated activation) | ``glu.py`` | the gated branch of ``layers/mlp.py`` |
| linear + cross-entropy in chunks of tokens | ``cross_entropy.py`` | output projection + ``parallel/cross_entropy.py`` |

Which implementation runs is data: ``model.kernels`` (``auto``: Triton on a
CUDA device when Triton imports, torch otherwise) and the per-kernel
``model.kernel_options`` (:func:`choice`). The fused cross-entropy also has a
pure-PyTorch chunked form (``chunked``) that runs anywhere. Importing this
package never imports Triton; the kernel modules do, when first used.
On a CPU the Triton kernels run in Triton's interpreter
(``TRITON_INTERPRET=1`` set before Triton is imported): slow, for tests.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
from types import ModuleType

import torch

from ironcore.config.model import ModelConfig

KERNELS = ("norm", "rope", "glu", "cross_entropy")


@functools.cache
def triton_available() -> bool:
    """Whether Triton imports (a CUDA build of torch ships it; on a CPU it is a test dependency)."""
    return importlib.util.find_spec("triton") is not None


def interpreted() -> bool:
    """Triton runs its kernels in the interpreter (on CPU tensors), as the CPU tests do."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def selected(cfg: ModelConfig, kernel: str) -> str:
    """What the config asks for ``kernel``: ``model.kernel_options.<kernel>``, else ``model.kernels`` (which may
    be ``auto``, decided per tensor by :func:`runs_triton`)."""
    picked = getattr(cfg.kernel_options, kernel)
    if picked is None and kernel == "cross_entropy" and cfg.final_logit_softcap is not None:
        return "torch"  # the fused loss takes the plain logits (Gemma 2 caps them)
    return picked or cfg.kernels


def runs_triton(picked: str, device: torch.device) -> bool:
    """Whether a kernel :func:`selected` as ``picked`` runs its Triton form on tensors on ``device``: on CUDA, or
    on a CPU in Triton's interpreter; elsewhere the torch code runs (a checkpoint trained with ``triton`` still
    evaluates on a CPU)."""
    if picked == "auto":
        return device.type == "cuda" and triton_available()
    return picked == "triton" and (device.type == "cuda" or interpreted())


def choice(cfg: ModelConfig, kernel: str, device: torch.device) -> str:
    """The implementation of ``kernel`` for a model on ``device``: ``torch`` or ``triton`` (cross_entropy: also
    ``chunked``)."""
    picked = selected(cfg, kernel)
    if picked in ("auto", "triton") and not runs_triton(picked, device):
        return "chunked" if picked == "triton" and kernel == "cross_entropy" else "torch"
    return "triton" if picked == "auto" else picked


@functools.cache
def module(name: str) -> ModuleType:
    """The kernel module ``name`` (imported, with Triton, at first use)."""
    return importlib.import_module(f"ironcore.kernels.{name}")
