"""PyTorch only: the global random state that Keras's unseeded dropout draws from, for backups.

TensorFlow and JAX draw from the layers' seed-generator variables, which are model variables and need nothing
here; on those backends `states()` is empty and `set_states` does nothing.

Example:
    >>> set_states(states())  # doctest: +SKIP
"""

import keras
import numpy as np


def states():
    """The backend's own random-number state that training draws from, by name ({} off PyTorch).

    PyTorch's unseeded dropout (Keras's `Dropout` without a seed) draws from torch's global generator;
    TensorFlow and JAX draw from the layers' seed-generator variables, which are model variables.
    """
    if keras.backend.backend() != "torch":
        return {}
    import torch

    states = {"torch_cpu": torch.get_rng_state().numpy()}
    if torch.cuda.is_available():
        states.update({f"torch_cuda_{i}": s.numpy() for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return states


def set_states(states):
    if keras.backend.backend() != "torch" or not states:
        return
    import torch

    for name, state in states.items():
        tensor = torch.from_numpy(np.array(state, dtype=np.uint8))
        if name == "torch_cpu":
            torch.set_rng_state(tensor)
        elif name.startswith("torch_cuda_") and int(name.rsplit("_", 1)[1]) < torch.cuda.device_count():
            torch.cuda.set_rng_state(tensor, int(name.rsplit("_", 1)[1]))
