"""Write the three example notebooks (TensorFlow, JAX, PyTorch) from one story.

The notebooks differ only in their title and first cell (the backend and the pip extra), so they are
generated here rather than edited by hand three times. Edit the story below, then run

    python examples/notebooks/make_notebooks.py

tests/test_notebooks.py checks that the committed notebooks equal this script's output (outputs
stripped) and executes the notebook of its backend.
"""

import os

import nbformat

BACKENDS = {  # KERAS_BACKEND: (title, pip extras)
    "tensorflow": ("TensorFlow", "plot"),
    "jax": ("JAX", "jax,plot"),
    "torch": ("PyTorch", "torch,plot"),
}
FILE_NAMES = {"tensorflow": "nanogpt_tensorflow.ipynb", "jax": "nanogpt_jax.ipynb",
              "torch": "nanogpt_pytorch.ipynb"}
QUICK_VARIABLE = "KERAS_NANOGPT_NOTEBOOK_QUICK"

STORY = [
    ("markdown", """\
# nanoGPT in Keras 3, on {title}

A character-level GPT trained on *Pride and Prejudice* with [`keras_nanogpt`](../../README.md): the
Transformer block, the model, the data pipeline, `fit`, sampling, and one `.keras` file.
The same notebook runs on [TensorFlow](nanogpt_tensorflow.ipynb), [JAX](nanogpt_jax.ipynb) and
[PyTorch](nanogpt_pytorch.ipynb); only the title and the first cell differ.

The first cell picks the backend (before Keras is imported) and, on Colab or a fresh machine,
installs the package."""),
    ("code", '''\
import os

os.environ["KERAS_BACKEND"] = "{backend}"  # read once, when Keras is first imported

try:
    import keras_nanogpt
except ImportError:  # Colab or a fresh environment
    %pip install -q "keras_nanogpt[{extras}]"'''),
    ("code", """\
import keras
import numpy as np

import keras_nanogpt as kn

assert keras.backend.backend() == os.environ["KERAS_BACKEND"], "restart the kernel, then run the first cell"
print("Keras", keras.__version__, "on", keras.backend.backend())

# nanoGPT's CPU recipe for 1,000 steps: 106 ms a step on TensorFlow on a 2-core CPU (benchmarks/RESULTS.md).
# {quick}=1 (the tests) shrinks everything to seconds.
QUICK = os.environ.get("{quick}") == "1"
SEQUENCE_LENGTH, BATCH_SIZE = (32, 8) if QUICK else (64, 12)
NUM_LAYERS, NUM_HEADS, HIDDEN_DIM = (1, 2, 32) if QUICK else (4, 4, 128)
EPOCHS, STEPS_PER_EPOCH = (2, 4) if QUICK else (10, 100)
NEW_TOKENS = 20 if QUICK else 200
keras.utils.set_random_seed(1337)"""),
    ("markdown", """\
## 1. The Transformer block

A GPT is a stack of identical blocks. Each maps `(batch, time, hidden_dim)` to the same shape in two
residual steps, each after a LayerNorm:

- `x = x + attention(norm(x))`: causal self-attention, where each position mixes in itself and the
  positions before it (one fused projection makes queries, keys and values for all heads);
- `x = x + mlp(norm(x))`: a two-layer MLP, 4x wider inside, applied to each position alone."""),
    ("code", """\
block = kn.TransformerBlock(num_heads=4, hidden_dim=64)
x = keras.random.normal((2, 10, 64), seed=0)  # (batch, time, hidden_dim)
y = block(x)
print("input", tuple(x.shape), "-> output", tuple(y.shape))
for weight in block.weights:
    print(f"  {weight.path:<45} {tuple(weight.shape)}")"""),
    ("markdown", "The block is exactly these two residual lines, written with its own sub-layers:"),
    ("code", """\
h = x + block.attention(block.attention_norm(x))  # attention, plus the residual
inner = keras.activations.gelu(block.mlp_dense(block.mlp_norm(h)), approximate=False)  # (2, 10, 256)
by_hand = h + block.mlp_output_dense(inner)  # MLP, plus the residual
print("MLP inside", tuple(inner.shape))
np.testing.assert_allclose(keras.ops.convert_to_numpy(by_hand), keras.ops.convert_to_numpy(y), atol=1e-5)"""),
    ("markdown", "Causal: changing the last five positions leaves the outputs at the first five as they were."),
    ("code", """\
changed = keras.ops.concatenate([x[:, :5], keras.random.normal((2, 5, 64), seed=1)], axis=1)
difference = np.abs(keras.ops.convert_to_numpy(block(changed)[:, :5] - y[:, :5])).max()
print("largest change in the first five outputs:", difference)
assert difference < 1e-5"""),
    ("markdown", """\
## 2. Pride and Prejudice through TextVectorization

`kn.data.load_text` fetches the book once with `keras.utils.get_file` (checked by SHA-256) and strips
the Project Gutenberg header and licence. `make_vectorizer(level="char")` adapts a
`keras.layers.TextVectorization` that keeps every character. `make_datasets` encodes the text once
and cuts `tf.data` windows of `(ids, next ids)`; validation is the last 10% of the book.
`tf.data` feeds `fit` on every backend."""),
    ("code", """\
text = kn.data.load_text("pride_and_prejudice")
if QUICK:
    text = text[:20_000]
vectorizer = kn.data.make_vectorizer(text, level="char")
print(f"{len(text):,} characters, vocabulary of {vectorizer.vocabulary_size()} tokens")
print("ids 0 and 1 are padding and unknown; then", repr("".join(vectorizer.get_vocabulary()[2:])))
train_ds, val_ds = kn.data.make_datasets(text, vectorizer, sequence_length=SEQUENCE_LENGTH,
                                         batch_size=BATCH_SIZE, validation_split=0.1,
                                         sampling="random", seed=1337)"""),
    ("markdown", "One window of a training batch, decoded: the targets are the inputs moved on by one character."),
    ("code", """\
inputs, targets = next(train_ds.as_numpy_iterator())
print("inputs", inputs.shape, "targets", targets.shape)
print("inputs: ", repr(kn.tokenizers.Tokenizer(vectorizer).decode(inputs[0])))
print("targets:", repr(kn.tokenizers.Tokenizer(vectorizer).decode(targets[0])))"""),
    ("markdown", """\
## 3. The model

`kn.NanoGPT` is a `keras.Model`: token and position embeddings, the blocks, a final LayerNorm, and the
token embedding reused as the output layer (weight tying), with no biases, as nanoGPT. Ids
`(batch, time)` in, logits `(batch, time, vocabulary)` out. Given the vectorizer, `generate` takes and
returns text, and the `.keras` file keeps the vocabulary."""),
    ("code", """\
model = kn.NanoGPT(vocabulary_size=vectorizer.vocabulary_size(), sequence_length=SEQUENCE_LENGTH,
                   num_layers=NUM_LAYERS, num_heads=NUM_HEADS, hidden_dim=HIDDEN_DIM, dropout=0.0,
                   vectorizer=vectorizer)
model.summary()
print("logits", tuple(model(inputs).shape))"""),
    ("markdown", "The parameter count by hand: two embedding tables, then per block two LayerNorm scales, "
                 "QKV, the attention output and the MLP's two layers, then the final LayerNorm."),
    ("code", """\
V, T, d, L = vectorizer.vocabulary_size(), SEQUENCE_LENGTH, HIDDEN_DIM, NUM_LAYERS
by_hand = V * d + T * d + L * (2 * d + 3 * d * d + d * d + 4 * d * d + 4 * d * d) + d
print(f"{model.count_params():,} parameters ({by_hand:,} by hand)")
assert model.count_params() == by_hand"""),
    ("markdown", """\
## 4. The modern layout

That is GPT-2's layout, as nanoGPT builds it. What the nanoGPT speedrun learned since gives the same
size a better model in fewer steps, each choice one argument of `kn.NanoGPT` (`kn.model.MODERN` holds
them all; `from_config_name("nano-modern", ...)` is nanoGPT's CPU size with them):

- `position_embedding="rotary"`: no position table; queries and keys are rotated by their position, so
  attention sees how far apart two tokens are;
- `qk_norm=True`: queries and keys RMS-normalised per head, which keeps attention logits in range;
- `norm="rms"`: RMSNorm instead of LayerNorm; `activation="relu_squared"`: `relu(x)²` in the MLP;
- `zero_init_residual=True`: each block starts as the identity; `tie_embeddings=False`: its own head."""),
    ("code", """\
model = kn.NanoGPT(vocabulary_size=vectorizer.vocabulary_size(), sequence_length=SEQUENCE_LENGTH,
                   num_layers=NUM_LAYERS, num_heads=NUM_HEADS, hidden_dim=HIDDEN_DIM, dropout=0.0,
                   vectorizer=vectorizer, **kn.model.MODERN)
print(kn.model.MODERN)
# No position table (- T * d), a head of its own (+ d * V), a query and a key scale per block (+ 2 * d / heads).
print(f"{model.count_params():,} parameters ({by_hand - T * d + d * V + L * 2 * d // NUM_HEADS:,} by hand)")"""),
    ("markdown", """\
## 5. Training

`compile()` alone gives Adam and cross-entropy on the logits; the modern recipe adds Muon
(`kn.training.muon_optimizer`: Keras's `keras.optimizers.Muon` on the blocks' matrices, AdamW on the
embedding, head and norms, warmup then decay, gradient clipping). `kn.training.nanogpt_optimizer` is
nanoGPT's AdamW recipe, for the GPT-2 layout. `TextGenerationCallback` prints a sample as training goes.
On a 2-core CPU each of the 1,000 steps takes 106 ms on TensorFlow (measured, benchmarks/RESULTS.md), so
the steps take under two minutes, plus the first call's compilation (about 13 s) and the ten validations."""),
    ("code", """\
total_steps = EPOCHS * STEPS_PER_EPOCH
model.compile(optimizer=kn.training.muon_optimizer(total_steps=total_steps, warmup_steps=total_steps // 10))
sampler = kn.callbacks.TextGenerationCallback("It is a truth", max_new_tokens=NEW_TOKENS // 2,
                                              every=EPOCHS // 2, temperature=0.8, top_k=40, seed=1337)
history = model.fit(train_ds.repeat(), steps_per_epoch=STEPS_PER_EPOCH, epochs=EPOCHS,
                    validation_data=val_ds, callbacks=[sampler], verbose=2)"""),
    ("markdown", "## 6. The loss curve"),
    ("code", """\
%matplotlib inline
import matplotlib.pyplot as plt

epochs = range(1, EPOCHS + 1)
plt.figure(figsize=(6, 4))
plt.plot(epochs, history.history["loss"], marker="o", label="train")
plt.plot(epochs, history.history["val_loss"], marker="o", label="validation")
plt.xlabel(f"epoch ({STEPS_PER_EPOCH} steps)")
plt.ylabel("cross-entropy")
plt.legend()
plt.grid(alpha=0.3)
plt.show()"""),
    ("markdown", """\
## 7. Generation

`generate` reads the prompt once, then samples one token at a time with a KV cache, in a loop
compiled for the backend. `temperature` sharpens (< 1) or flattens (> 1) the next-token
distribution, and 0 is greedy; `top_k` keeps the k likeliest tokens, `top_p` the fewest whose
probabilities add up to p. `seed` makes a sample repeatable."""),
    ("code", """\
prompt = "It is a truth"
for settings in ({"temperature": 0}, {"temperature": 0.8, "top_k": 40}, {"temperature": 1.0, "top_p": 0.9}):
    print(f"--- {settings}")
    print(model.generate(prompt, max_new_tokens=NEW_TOKENS, seed=1337, **settings), end="\\n\\n")"""),
    ("markdown", """\
## 8. Save and load

One `.keras` file holds the configuration, the weights, the optimizer state and the vocabulary.
Import `keras_nanogpt` before loading (that registers its classes); no `custom_objects` are needed.
The loaded model generates exactly what the trained one does."""),
    ("code", """\
model.save("pride_and_prejudice.keras")
print(f"{os.path.getsize('pride_and_prejudice.keras'):,} bytes")
restored = keras.models.load_model("pride_and_prejudice.keras")
greedy = restored.generate(prompt, max_new_tokens=NEW_TOKENS, temperature=0)
assert greedy == model.generate(prompt, max_new_tokens=NEW_TOKENS, temperature=0)
print(greedy)"""),
]


def build(backend):
    """The notebook of `backend` (a KERAS_BACKEND name), outputs empty."""
    title, extras = BACKENDS[backend]
    values = {"{backend}": backend, "{title}": title, "{extras}": extras, "{quick}": QUICK_VARIABLE}
    cells = []
    for index, (kind, source) in enumerate(STORY):
        for placeholder, value in values.items():
            source = source.replace(placeholder, value)
        new_cell = nbformat.v4.new_markdown_cell if kind == "markdown" else nbformat.v4.new_code_cell
        cells.append(new_cell(source, id=f"cell-{index:02d}"))
    notebook = nbformat.v4.new_notebook(cells=cells, metadata={
        "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
        "language_info": {"name": "python"},
    })
    nbformat.validate(notebook)
    return notebook


def render(backend):
    """The file text of `backend`'s notebook, as `nbformat.write` writes it."""
    text = nbformat.writes(build(backend))
    return text if text.endswith("\n") else text + "\n"


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    for backend, file_name in FILE_NAMES.items():
        path = os.path.join(here, file_name)
        with open(path, "w", encoding="utf-8") as f:
            f.write(render(backend))
        print("wrote", path)


if __name__ == "__main__":
    main()
