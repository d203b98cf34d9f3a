"""A model's functions compiled for the running backend, made once per model and key, shared by
generation and scoring.

Each `NanoGPT` keeps one `CompiledFunctions` (made on first use): the decode loops by sampler, the
prefill and scoring functions by shape, the samplers they were made for, and how often they traced.
The weights are arguments of every function, so new prompts, seeds and training never retrace;
enabling or merging LoRA or quantizing changes the model's variables, and the functions are made
again.

Example:
    >>> log_probs = compiled_function(model, ("score", 8, 64), lambda: my_function)  # doctest: +SKIP
"""

from keras_nanogpt import backends


class CompiledFunctions:
    """Per model: compiled functions by key, kept objects (samplers) by key, and the trace count.

    Args:
        model: a `NanoGPT`.

    Example:
        >>> functions = compiled_functions(model)  # doctest: +SKIP
        >>> functions.traces  # doctest: +SKIP
        0
    """

    def __init__(self, model):
        self.model = model
        self.variables = tuple(model.variables)  # the functions below take exactly these
        self.kept = {}
        self.steps = {}  # PyTorch: compiled decode steps by sampler kind and shapes (_torch_compile)
        self.traces = 0  # traces (JAX, TensorFlow) or compilations (PyTorch) of the functions below

    def current(self):
        """Whether the model still has exactly the variables these functions were made for."""
        variables = self.model.variables
        return len(variables) == len(self.variables) and all(
            a is b for a, b in zip(variables, self.variables))

    def keep(self, key, make):
        """`make()`, made once per `key` (for objects a compiled function must see again, e.g. samplers)."""
        if key not in self.kept:
            self.kept[key] = make()
        return self.kept[key]

    def function(self, key, build):
        """`build()` (a `keras.ops` function) compiled by `backends.compile_function`, once per `key`."""
        return self.keep(("function", key), lambda: backends.compile_function(
            self.model, build(), self._count_trace))

    def prefill(self):
        """The prefill, `(tokens, cache) -> cache` (`backends.compile_prefill`)."""
        return self.keep("prefill", lambda: backends.compile_prefill(self.model, self._count_trace))

    def decode(self, sampler):
        """The decode loop for the keras-hub token sampler `sampler` (`backends.compile_decode`)."""
        return self.keep(("decode", sampler), lambda: backends.compile_decode(
            self.model, sampler, self.steps, self._count_trace))

    def _count_trace(self):
        self.traces += 1


def compiled_functions(model):
    """The model's `CompiledFunctions`, made on first use and kept on the model (not as a tracked
    Keras attribute); made again when the model's variables changed.

    Example:
        >>> compiled_functions(model).traces  # doctest: +SKIP
        0
    """
    functions = getattr(model, "_kn_compiled", None)
    if functions is None or not functions.current():
        functions = CompiledFunctions(model)
        object.__setattr__(model, "_kn_compiled", functions)
    return functions


def compiled_function(model, key, build):
    """`build()` compiled for the backend, made once per `key` and kept with the model's other functions.

    Args:
        model: a `NanoGPT`.
        key: a hashable name for the function and the shapes it is called with.
        build: makes the `keras.ops` function of tensors to compile.

    Example:
        >>> log_probs = compiled_function(model, ("score", 8, 64), lambda: my_function)  # doctest: +SKIP
    """
    return compiled_functions(model).function(key, build)
