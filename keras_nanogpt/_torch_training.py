"""PyTorch backend only: the training step's optimizer in multi-tensor (`torch._foreach_*`) operations.

Keras runs its multi-tensor AdamW on PyTorch only for `keras.optimizers.AdamW` itself; a subclass
such as `training.MatrixDecayAdamW` falls back to one small update per variable, and Keras's
global-norm clipping is two operations per variable. At nanoGPT's CPU recipe (27 variables) that
made the optimizer step 3-4x nanoGPT's (`clip_grad_norm_` + `torch.optim.AdamW`); see
benchmarks/RESULTS.md, issue 18.
"""

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
