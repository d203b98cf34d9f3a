"""PyTorch backend only: the training step's optimizer in multi-tensor (`torch._foreach_*`) operations,
and a warning where bfloat16 training would be slow.

Keras runs its multi-tensor AdamW on PyTorch only for `keras.optimizers.AdamW` itself; a subclass
such as `training.MatrixDecayAdamW` falls back to one small update per variable, and Keras's
global-norm clipping is two operations per variable. At nanoGPT's CPU recipe (27 variables) that
made the optimizer step 3-4x nanoGPT's (`clip_grad_norm_` + `torch.optim.AdamW`); see
benchmarks/RESULTS.md, issue 18.
"""

import warnings

import torch
from keras.src.backend.torch.optimizers.torch_adamw import AdamW as _KerasTorchAdamW


class ForeachAdamW(_KerasTorchAdamW):
    """Keras's PyTorch AdamW (`torch._foreach_*` updates), with global-norm clipping in foreach
    operations too; the same arithmetic as `keras.optimizers.AdamW`.

    Example:
        >>> optimizer = ForeachAdamW(learning_rate=1e-3, global_clipnorm=1.0)  # doctest: +SKIP
    """

    def _clip_gradients(self, grads):
        if self.clipnorm or self.clipvalue or not self.global_clipnorm or any(g is None for g in grads):
            return super()._clip_gradients(grads)
        # Keras's `clip_by_global_norm`: scale by clip / max(norm, clip); NaN where the norm is not finite.
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
        clip = torch.as_tensor(self.global_clipnorm, dtype=norm.dtype, device=norm.device)
        scale = clip * torch.minimum(1.0 / norm, 1.0 / clip) + (norm - norm)
        return torch._foreach_mul(grads, scale)


def warn_if_slow_bfloat16(model):
    """Warn that training `model` in bfloat16 on PyTorch's CPU is slow, and why (called by `compile`).

    Keras's mixed precision casts every weight at every layer call, and PyTorch's eager CPU kernels
    for bfloat16 are only fast with AMX matrix units (absent from the host measured): at
    nanoGPT's CPU recipe it trained at 0.10-0.2x float32's speed (benchmarks/RESULTS.md).
    """
    if model.compute_dtype != "bfloat16" or torch.cuda.is_available():
        return
    warnings.warn(
        "mixed_bfloat16 on the PyTorch backend's CPU trains several times slower than float32 (0.10x "
        "nanoGPT's speed against 0.58x at its CPU recipe; benchmarks/RESULTS.md): every layer call "
        "casts its weights to bfloat16 and eager bfloat16 CPU kernels are slow without AMX matrix "
        "units" + ("" if _has_amx() else ", which this CPU lacks") + ". Train in float32 on CPU "
        "(keras.config.set_dtype_policy('float32')), or bfloat16 on a GPU.", UserWarning, stacklevel=3)


def _has_amx():
    check = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(check and check())


def jit_compile_choice(jit_compile):
    """`NanoGPT.compile`'s `jit_compile` on PyTorch: "auto" is False, the eager step.

    Keras's `jit_compile=True` on PyTorch runs `torch.compile` over its whole train step; at
    nanoGPT's CPU recipe it was slower per step than the eager step (benchmarks/RESULTS.md,
    issue 18), after a first step of a minute or more, so "auto" keeps the eager step (with direct
    sublayer calls and multi-tensor optimizer updates, see `_sublayers` and `ForeachAdamW`).
    """
    return False if jit_compile == "auto" else jit_compile
