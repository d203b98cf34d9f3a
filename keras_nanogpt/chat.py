"""Chat: templates that render OpenAI-style messages to ids, the turn tokens a model carries, SFT windows
with weights on the assistant's tokens only, `NanoGPT.chat` and the terminal chat loop.

Two templates: `NANOCHAT` (name "nanochat", after karpathy/nanochat: the special tokens `<|user_start|>`,
`<|user_end|>`, `<|assistant_start|>`, `<|assistant_end|>`, a system message merged into the first user
turn) and `DEFAULT_TEMPLATE` (name "plain": "System: ...\\n\\nUser: ...\\n\\nAssistant:" in plain text,
stop strings "\\n\\nUser:", "\\n\\nSystem:", "\\nUser:"), which every model without a template of its own
uses. `add_chat_template` grows a model by the special tokens; `chat_dataset` (also `kn.data.chat_dataset`)
makes `(x, y, sample_weight)` windows for `model.fit`; `sft` is `keras-nanogpt sft`. See docs/chat.md.
"""

import dataclasses
import json
import os
import sys

import keras
import numpy as np

from keras_nanogpt import _validation, adapters, saving, tokenizers

ROLES = ("system", "user", "assistant")
_ALIASES = {"developer": "system"}  # OpenAI's newer name for the system role


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
    """How a conversation becomes token ids: each role's start and end marker around its content.

    A marker that names one of `special_tokens` is that token's id; any other marker is plain text.
    The generation prompt is the assistant's start marker; the reply is `gap` + content + the
    assistant's end marker (the tokens `render_for_training` weighs).

    Args:
        name: the template's name ("nanochat", "plain", or your own).
        user, assistant: `(start, end)` markers of the role's turns.
        system: `(start, end)` of system turns, or None: a system message is merged into the next
            user turn ("SYSTEM\\n\\nUSER", as nanochat does), or is a user turn of its own when none follows.
        gap: text between the assistant's start marker and its content (part of the reply).
        special_tokens: the turn tokens this template needs in the tokenizer (`add_chat_template` adds them).
        stop_strings: where a reply ends: special token names (their ids) or plain strings.

    Example:
        >>> tokenizer = kn.tokenizers.Tokenizer.for_corpus("byte").with_special_tokens(NANOCHAT.special_tokens)
        >>> NANOCHAT.render(tokenizer, [{"role": "user", "content": "hi"}]).tolist()
        [257, 104, 105, 258, 259]
    """

    name: str
    user: tuple = ("", "")
    assistant: tuple = ("", "")
    system: tuple = None
    gap: str = ""
    special_tokens: tuple = ()
    stop_strings: tuple = ()

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise TypeError(f"`name` must be a non-empty string; got {self.name!r}.")
        for field in ("user", "assistant", "system"):
            value = getattr(self, field)
            if value is None and field == "system":
                continue
            if not isinstance(value, (list, tuple)) or len(value) != 2 or not all(isinstance(v, str) for v in value):
                raise TypeError(f"`{field}` must be a (start, end) pair of strings; got {value!r}.")
            object.__setattr__(self, field, tuple(value))
        for field in ("special_tokens", "stop_strings"):
            value = getattr(self, field)
            if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) and v for v in value):
                raise TypeError(f"`{field}` must be a list of non-empty strings; got {value!r}.")
            object.__setattr__(self, field, tuple(value))
        if not isinstance(self.gap, str):
            raise TypeError(f"`gap` must be a string; got {self.gap!r}.")

    def get_config(self):
        """A JSON-ready dict; `ChatTemplate.from_config` makes the same template of it."""
        config = dataclasses.asdict(self)
        return {key: list(value) if isinstance(value, tuple) else value for key, value in config.items()}

    @classmethod
    def from_config(cls, config):
        """The template `get_config` described."""
        if not isinstance(config, dict):
            raise TypeError(f"`chat_template` must be a ChatTemplate, a template name {tuple(TEMPLATES)} or "
                            f"a ChatTemplate.get_config() dict; got {config!r:.100}.")
        unknown = sorted(set(config) - {field.name for field in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"`chat_template` holds unknown fields {unknown}.")
        return cls(**config)

    def render(self, tokenizer, messages, max_tokens=None):
        """The conversation's ids followed by the opening of the assistant's reply (a 1-D int32 array).

        Args:
            tokenizer: a `kn.tokenizers.Tokenizer` (or a tokenizer layer) holding `special_tokens`.
            messages: OpenAI-style messages (see `check_messages`).
            max_tokens: at most this many ids: older messages are left out, whole, from the left (the
                system messages stay); a `ValueError` naming `messages` when the last one alone does not fit.
        """
        tokenizer = self._tokenizer(tokenizer)
        prompt = self._marker(tokenizer, self.assistant[0])
        messages = self.cut(tokenizer, messages, max_tokens, reserve=len(prompt))
        return np.concatenate([self._encode(tokenizer, messages)[0], prompt]).astype("int32")

    def render_for_training(self, tokenizer, messages):
        """`(ids, mask)`: the whole conversation and 1 on the assistant's reply tokens (`gap`, content and
        end marker), 0 elsewhere; both 1-D arrays of the same length (int32 and float32)."""
        tokenizer = self._tokenizer(tokenizer)
        return self._encode(tokenizer, check_messages(messages))

    def stop(self, tokenizer):
        """What to pass as `stop=` to `model.generate`: special tokens' ids and plain strings."""
        tokenizer = self._tokenizer(tokenizer)
        special = tokenizer.special_tokens
        return [special[s] if s in special else s for s in self.stop_strings]

    def cut(self, tokenizer, messages, max_tokens, reserve=0):
        """The messages that fit `max_tokens` (less `reserve`): the newest ones and every system message."""
        tokenizer, messages = self._tokenizer(tokenizer), check_messages(messages)
        if max_tokens is None:
            return messages
        max_tokens = _validation.check_int("max_tokens", max_tokens)
        others = [i for i, m in enumerate(messages) if m["role"] != "system"]

        def kept(drop):
            dropped = set(others[:drop])
            return [m for i, m in enumerate(messages) if i not in dropped]

        def fits(drop):
            return len(self._encode(tokenizer, kept(drop), warn=False)[0]) + reserve <= max_tokens

        low, high = 0, max(len(others) - 1, 0)  # the fewest messages left out that fit: a binary search
        if not fits(high):
            total = len(self._encode(tokenizer, messages, warn=False)[0]) + reserve
            raise ValueError(f"`messages` does not fit {max_tokens} tokens even with only its last message "
                             f"and the system messages ({total} tokens with all {len(messages)} messages).")
        while low < high:
            middle = (low + high) // 2
            low, high = (low, middle) if fits(middle) else (middle + 1, high)
        while low < len(others) - 1 and messages[others[low]]["role"] == "assistant":
            low += 1  # the kept part opens with a user turn where it can
        return kept(low)

    def _tokenizer(self, tokenizer):
        if tokenizer is None:
            raise ValueError("A chat template needs a tokenizer; this model has none (build it with "
                             "`vectorizer=...`).")
        tokenizer = tokenizer if isinstance(tokenizer, tokenizers.Tokenizer) else tokenizers.Tokenizer(tokenizer)
        missing = [name for name in self.special_tokens if name not in tokenizer.special_tokens]
        if missing:
            raise ValueError(f"The chat template {self.name!r} needs the special tokens {missing}, which the "
                             f"tokenizer lacks; add them with kn.chat.add_chat_template(model).")
        return tokenizer

    def _marker(self, tokenizer, text):
        special = tokenizer.special_tokens
        return np.array([special[text]], "int32") if text in special else tokenizer.encode(text)

    def _turns(self, messages):
        """(role, content) turns: system messages merged into the next user turn when `system` is None."""
        if self.system is not None:
            return [(m["role"], m["content"]) for m in messages]
        turns, pending = [], []
        for message in messages:
            role, content = message["role"], message["content"]
            if role == "system":
                pending.append(content)
                continue
            if pending and role == "user":
                content = "\n\n".join(pending + [content])
            elif pending:
                turns.append(("user", "\n\n".join(pending)))
            pending = []
            turns.append((role, content))
        if pending:
            turns.append(("user", "\n\n".join(pending)))
        return turns

    def _encode(self, tokenizer, messages, warn=True):
        ids, mask, texts, text_ids = [], [], [], []
        for role, content in self._turns(messages):
            start, end = getattr(self, role)
            reply = role == "assistant"
            parts = [(start, False), (self.gap + content if reply else content, reply), (end, reply)]
            for i, (text, weighed) in enumerate(parts):
                piece = tokenizer.encode(text) if i == 1 else self._marker(tokenizer, text)
                if i == 1 or text not in tokenizer.special_tokens:
                    texts.append(text)
                    text_ids.append(piece)
                ids.append(piece)
                mask.append(np.full(len(piece), float(weighed), "float32"))
        if texts and warn:
            tokenizer.warn_unknown("".join(texts), np.concatenate(text_ids), stacklevel=4)
        return (np.concatenate(ids).astype("int32") if ids else np.zeros((0,), "int32"),
                np.concatenate(mask) if mask else np.zeros((0,), "float32"))


NANOCHAT = ChatTemplate(
    name="nanochat", user=("<|user_start|>", "<|user_end|>"), assistant=("<|assistant_start|>", "<|assistant_end|>"),
    special_tokens=("<|user_start|>", "<|user_end|>", "<|assistant_start|>", "<|assistant_end|>"),
    stop_strings=("<|assistant_end|>", "<|user_start|>"))
DEFAULT_TEMPLATE = ChatTemplate(
    name="plain", system=("System: ", "\n\n"), user=("User: ", "\n\n"), assistant=("Assistant:", "\n\n"),
    gap=" ", stop_strings=("\n\nUser:", "\n\nSystem:", "\nUser:"))
TEMPLATES = {"nanochat": NANOCHAT, "plain": DEFAULT_TEMPLATE}


def as_template(value, tokenizer=None, name="chat_template"):
    """A `ChatTemplate` of `value` (a template, a name from `TEMPLATES` or a `get_config` dict), or None;
    with `tokenizer`, checked to hold the template's special tokens."""
    if value is None:
        return None
    if isinstance(value, str):
        template = TEMPLATES.get(value)
        if template is None:
            raise ValueError(f"`{name}` must be one of {tuple(TEMPLATES)}, a ChatTemplate or its config; "
                             f"got {value!r}.")
    else:
        template = value if isinstance(value, ChatTemplate) else ChatTemplate.from_config(value)
    if tokenizer is not None:
        template._tokenizer(tokenizer)
    return template


def check_messages(messages):
    """OpenAI-style messages as a list of `{"role", "content"}` dicts, content a str.

    Roles "system" ("developer" is read as "system"), "user" and "assistant"; content a string or a list
    of text parts `[{"type": "text", "text": ...}]` (joined). Errors start with the field they name.

    Example:
        >>> check_messages([{"role": "developer", "content": [{"type": "text", "text": "Be brief."}]}])
        [{'role': 'system', 'content': 'Be brief.'}]
    """
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError(f"`messages` must be a non-empty list of messages ({{\"role\", \"content\"}} objects); "
                         f"got {messages!r:.80}.")
    checked = []
    for i, message in enumerate(messages):
        where = f"`messages[{i}]"
        if not isinstance(message, dict):
            raise ValueError(f"{where}` must be an object with `role` and `content`; got {message!r:.80}.")
        if "role" not in message:
            raise ValueError(f"{where}.role` is missing.")
        role = message["role"]
        if not isinstance(role, str) or _ALIASES.get(role, role) not in ROLES:
            raise ValueError(f"{where}.role` must be one of {ROLES + tuple(_ALIASES)}; got {role!r:.80}.")
        if message.get("content") is None:
            raise ValueError(f"{where}.content` is missing.")
        content = message["content"]
        if isinstance(content, (list, tuple)):
            parts = [part.get("text") if isinstance(part, dict) and part.get("type") == "text" else None
                     for part in content]
            if not all(isinstance(part, str) for part in parts):
                raise ValueError(f"{where}.content` must be a string or a list of text parts "
                                 f"([{{\"type\": \"text\", \"text\": ...}}]); got {content!r:.80}.")
            content = "".join(parts)
        elif not isinstance(content, str):
            raise ValueError(f"{where}.content` must be a string or a list of text parts; got "
                             f"{type(content).__name__}.")
        try:
            content.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(f"{where}.content` holds a lone surrogate (not valid Unicode text).") from None
        checked.append({"role": _ALIASES.get(role, role), "content": content})
    return checked


def has_template(model):
    """Whether `model` carries a chat template of its own (`add_chat_template`, `sft`)."""
    return getattr(model, "chat_template", None) is not None


def template_of(model):
    """The model's own `ChatTemplate`, or `DEFAULT_TEMPLATE` (plain text) for a model without one."""
    return model.chat_template if has_template(model) else DEFAULT_TEMPLATE


def render(model, messages, max_tokens=None):
    """`template_of(model).render(model.tokenizer, check_messages(messages), max_tokens)`: the prompt ids.

    Example:
        >>> ids = render(model, [{"role": "user", "content": "Who is Mr. Darcy?"}])  # doctest: +SKIP
    """
    return template_of(model).render(model.tokenizer, check_messages(messages), max_tokens)


def stop_sequences(model):
    """`template_of(model).stop(model.tokenizer)`: the `stop=` list that ends the assistant's turn."""
    return template_of(model).stop(model.tokenizer)


def chat(model, messages, max_new_tokens=200, temperature=1.0, top_k=None, top_p=None, seed=None, stop=None,
         stream=False):
    """The assistant's reply to `messages` (`NanoGPT.chat`): the new text of
    `model.generate([render(model, messages)], ..., stop=stop_sequences(model) + stop)`, ending before
    the turn's end token or a stop string; with `stream=True`, an iterator of its pieces.

    Example:
        >>> model.chat([{"role": "user", "content": "Who is Mr. Darcy?"}], seed=0)  # doctest: +SKIP
    """
    ids = render(model, messages)
    extra = [] if stop is None else [stop] if isinstance(stop, (str, int)) else list(stop)
    options = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                   stop=stop_sequences(model) + extra)
    if stream:
        return _pieces(model, ids, options)
    new = np.asarray(model.generate(ids[None], **options))[0, len(ids):]
    return model.tokenizer.decode(new)


def _pieces(model, ids, options):
    new, sent = [], ""
    for piece in model.stream(ids[None], **options):
        new.extend(int(t) for t in piece[0])
        text = model.tokenizer.decode(new)
        if text.endswith("\ufffd"):  # perhaps a character's first bytes: wait for the rest
            continue
        if len(text) > len(sent):
            yield text[len(sent):]
            sent = text
    text = model.tokenizer.decode(new)
    if len(text) > len(sent):
        yield text[len(sent):]


def add_chat_template(model, template=None, seed=0):
    """A new `NanoGPT` that carries `template` (default `NANOCHAT`): its tokenizer gains the template's
    special tokens, its embedding (and untied head) the rows for them.

    The old weights are copied exactly (old tokens get the same logits); each new row is the mean of
    the vocabulary's rows plus a little noise (1% of their spread), and trains as any other (under LoRA
    too: `enable_lora` leaves the token table of a model with a chat template trainable).

    Args:
        model: a `NanoGPT` with a tokenizer, no chat template, no LoRA adapters, not quantized.
        template: a `ChatTemplate` or a name from `TEMPLATES`.
        seed: the noise's seed.

    Example:
        >>> chat_model = add_chat_template(model)  # doctest: +SKIP
    """
    template = as_template(NANOCHAT if template is None else template, name="template")
    if has_template(model):
        raise ValueError(f"This model already carries the chat template {model.chat_template.name!r}.")
    if model.tokenizer is None:
        raise ValueError("add_chat_template needs a model with a tokenizer (`vectorizer=...`).")
    config = model.get_config()
    if "lora" in config or adapters._quantization_modes(model):
        raise ValueError("add_chat_template grows a float model without LoRA adapters: merge_lora() first, "
                         "and quantize after.")
    old = model.tokenizer
    tokenizer = old.with_special_tokens(template.special_tokens)
    new_ids = sorted(set(tokenizer.special_tokens.values()) - set(old.special_tokens.values()))
    size = max(model.vocabulary_size, tokenizer.size)
    config.update(vocabulary_size=size, vectorizer=tokenizer.get_config(), chat_template=template.get_config())
    grown = type(model).from_config(config)
    rng = np.random.default_rng(seed)
    # The token table (vocabulary, hidden) and an untied head (hidden, vocabulary): the new ids' rows are set
    # even where a padded vocabulary (GPT-2's 50304) had rows for them already.
    tables = {grown.embedding.token_embedding.embeddings.path: 0}
    if grown.head is not None:
        tables[grown.head.kernel.path] = 1
    for source, target in zip(model.weights, grown.weights):
        if source.path != target.path:
            raise ValueError(f"add_chat_template: the grown model's weights differ ({source.path} / {target.path}).")
        value = np.asarray(keras.ops.convert_to_numpy(source))
        axis = tables.get(target.path)
        if axis is not None:
            rows = np.moveaxis(value, axis, 0).astype("float64")
            grown_rows = np.concatenate([rows, np.zeros((size - len(rows),) + rows.shape[1:])])
            known = rows[:old.size]
            noise = rng.normal(0.0, 0.01 * known.std() + 1e-8, (len(new_ids),) + rows.shape[1:])
            grown_rows[new_ids] = known.mean(axis=0) + noise
            value = np.moveaxis(grown_rows, 0, axis).astype(value.dtype)
        target.assign(value)
    return grown


def read_conversations(conversations):
    """The conversations of a `.jsonl` path (lines of `{"messages": [...]}`) or a list of such dicts or of
    message lists, each checked: a list of message lists. Errors name the file and line, or the item."""
    if isinstance(conversations, (str, os.PathLike)):
        path = os.fspath(conversations)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"No such conversations file: {path!r}.")
        items, where = [], []
        with open(path, encoding="utf-8") as lines:
            for number, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                try:
                    items.append(json.loads(line))
                except ValueError as error:
                    raise ValueError(f"{path!r} line {number}: not a JSON object ({error}).") from None
                where.append(f"{path!r} line {number}")
    elif isinstance(conversations, (list, tuple)):
        items, where = list(conversations), [f"`conversations[{i}]`" for i in range(len(conversations))]
    else:
        raise TypeError(f"`conversations` must be a .jsonl path or a list of {{\"messages\": [...]}}; "
                        f"got {type(conversations).__name__}.")
    if not items:
        raise ValueError(f"`conversations` holds no conversation ({conversations!r:.80}).")
    checked = []
    for item, place in zip(items, where):
        messages = item.get("messages") if isinstance(item, dict) else item
        try:
            if messages is None:
                raise ValueError("`messages` is missing.")
            checked.append(check_messages(messages))
        except ValueError as error:
            raise ValueError(f"{place}: {error}") from None
    return checked


def chat_windows(conversations, tokenizer, sequence_length, template=None):
    """`(x, y, weights)` numpy arrays `(conversations, sequence_length)`, one padded window per
    conversation, weights 1 where the target is an assistant reply token (`chat_dataset` batches them).

    A conversation longer than `sequence_length + 1` tokens is cut from the left by whole messages,
    keeping its system messages; one whose last message alone does not fit keeps its start.
    """
    model = tokenizer if hasattr(tokenizer, "chat_template") else None
    tokenizer = model.tokenizer if model is not None else tokenizer
    sequence_length = _validation.check_int("sequence_length", sequence_length)
    if template is None:
        template = template_of(model) if model is not None else (
            NANOCHAT if all(t in tokenizers.Tokenizer(tokenizer).special_tokens for t in NANOCHAT.special_tokens)
            else DEFAULT_TEMPLATE)
    template = as_template(template, tokenizer, name="template")
    rows = []
    for messages in read_conversations(conversations):
        try:
            messages = template.cut(tokenizer, messages, sequence_length + 1)
        except ValueError:
            pass  # even its last message is too long: keep the start of it
        ids, mask = template.render_for_training(tokenizer, messages)
        ids, mask = ids[:sequence_length + 1], mask[:sequence_length + 1]
        if len(ids) > 1 and mask[1:].any():
            rows.append((ids, mask))
    if not rows:
        raise ValueError("`conversations` holds no assistant reply to learn from.")
    x, y = (np.zeros((len(rows), sequence_length), "int32") for _ in range(2))
    weights = np.zeros((len(rows), sequence_length), "float32")
    for row, (ids, mask) in enumerate(rows):
        x[row, :len(ids) - 1], y[row, :len(ids) - 1], weights[row, :len(ids) - 1] = ids[:-1], ids[1:], mask[1:]
    return x, y, weights


def chat_dataset(conversations, tokenizer, sequence_length, batch_size, template=None, shuffle=True, seed=None,
                 repeat=False):
    """A tf.data pipeline of `(x, y, sample_weight)` batches for plain `model.fit` (supervised fine-tuning).

    One window per conversation (`chat_windows`: cut from the left keeping the system messages, padded
    on the right). The weights are 1 on the assistant's reply tokens (their end token included), 0
    elsewhere, then scaled in each batch by `elements / assistant tokens`: Keras's default loss
    reduction ("sum_over_batch_size") divides by every element, so the loss `fit` reports is the mean
    over the assistant's tokens.

    Args:
        conversations: a `.jsonl` path (lines of `{"messages": [...]}`), or a list of such dicts or of
            message lists.
        tokenizer: a `Tokenizer` (or tokenizer layer), or a `NanoGPT` (its tokenizer and template).
        sequence_length: the window length (the model's context).
        batch_size: windows per batch.
        template: a `ChatTemplate` or name; None: the model's, else nanochat when the tokenizer holds
            its tokens, else the plain default.
        shuffle, seed: shuffle the windows every epoch (seeded).
        repeat: repeat forever (for `fit(steps_per_epoch=...)`).

    Example:
        >>> model.fit(kn.data.chat_dataset("chats.jsonl", model, model.sequence_length, 8))  # doctest: +SKIP
    """
    import tensorflow as tf  # tf.data is the input pipeline under every backend, as in data.py

    batch_size = _validation.check_int("batch_size", batch_size)
    x, y, weights = chat_windows(conversations, tokenizer, sequence_length, template)
    dataset = tf.data.Dataset.from_tensor_slices((x, y, weights))
    if shuffle:
        dataset = dataset.shuffle(len(x), seed=seed, reshuffle_each_iteration=True)
    if repeat:
        dataset = dataset.repeat()

    def normalise(x, y, weights):  # the batch's loss: the mean over its assistant tokens
        scale = tf.cast(tf.size(weights), tf.float32) / tf.maximum(tf.reduce_sum(weights), 1.0)
        return x, y, weights * scale

    return dataset.batch(batch_size).map(tf.autograph.experimental.do_not_convert(normalise)).prefetch(2)


def sft(model, conversations, out=None, steps=None, epochs=None, learning_rate=3e-4, batch_size=8, lora_rank=None,
        seed=None, jit_compile="auto", log=None):
    """Supervised fine-tuning on conversations (`keras-nanogpt sft`): grow the model with
    `add_chat_template` when it has no template, train on `chat_dataset`, save `out` atomically.

    Args:
        model: a `NanoGPT` or the path of a `.keras` file.
        conversations: as `chat_dataset`.
        out: the `.keras` file to write (None: not saved).
        steps, epochs: optimizer steps in all, or passes over the conversations (default: 1 epoch).
        learning_rate: Adam's learning rate.
        batch_size: conversations per step.
        lora_rank: train rank-R LoRA adapters (and the token table) instead of every weight.
        seed, jit_compile: the data order's seed; `compile`'s `jit_compile`.
        log: called with a line of text per report (e.g. `print`).

    Returns:
        `(model, report)`: the fine-tuned model and `{"loss_before", "loss_after", "steps"}`, losses on
        the assistant's tokens.
    """
    if out is not None and not os.fspath(out).endswith(".keras"):
        raise ValueError(f"`out` must be a .keras file; got {out!r}.")
    if steps is not None and epochs is not None:
        raise ValueError("Pass `steps` or `epochs`, not both.")
    steps = None if steps is None else _validation.check_int("steps", steps)
    epochs = 1 if epochs is None else _validation.check_int("epochs", epochs)
    learning_rate = _validation.check_float("learning_rate", learning_rate, 0.0, 1.0, low_inclusive=False)
    if lora_rank is not None:
        lora_rank = _validation.check_int("lora_rank", lora_rank)
    conversations = read_conversations(conversations)  # a bad line fails before the model loads
    if isinstance(model, (str, os.PathLike)):
        model = saving.load_model(model, compile=False)
    if not has_template(model):
        model = add_chat_template(model)
    log = log or (lambda line: None)
    data = chat_dataset(conversations, model, model.sequence_length, batch_size, seed=seed, repeat=steps is not None)
    plain = chat_dataset(conversations, model, model.sequence_length, batch_size, shuffle=False)
    if lora_rank is not None:
        model.enable_lora(lora_rank)
    model.compile(optimizer=keras.optimizers.Adam(learning_rate), jit_compile=jit_compile)
    before = float(model.evaluate(plain, verbose=0, return_dict=True)["loss"])
    log(f"loss on the assistant's tokens before: {before:.4f}")
    if steps is not None:
        model.fit(data, epochs=1, steps_per_epoch=steps, verbose=0)
    else:
        model.fit(data, epochs=epochs, verbose=0)
    after = float(model.evaluate(plain, verbose=0, return_dict=True)["loss"])
    log(f"loss on the assistant's tokens after: {after:.4f}")
    if out is not None:
        model.save(out)
        log(f"saved {out}")
    done = steps if steps is not None else epochs * int(data.cardinality())
    return model, {"loss_before": before, "loss_after": after, "steps": done}


def interactive(model, system=None, input=None, output=None, **options):
    """A terminal chat (`keras-nanogpt chat`): one line per user turn, the reply streamed, the history kept
    (older turns left out when the context is full); "/clear" forgets it; end of input (Ctrl-D) ends.
    Under a pipe it reads lines from `input` and prints one reply per line, without prompts.

    Args:
        model: a `NanoGPT` with a tokenizer.
        system: a system message to start every conversation with.
        input, output: text streams (default: stdin and stdout).
        **options: `chat`'s options (max_new_tokens, temperature, top_k, top_p, seed).
    """
    template_of(model)._tokenizer(model.tokenizer)  # a model that cannot read text fails before the first line
    input, output = input or sys.stdin, output or sys.stdout
    terminal = input.isatty() if hasattr(input, "isatty") else False
    head = [{"role": "system", "content": system}] if system else []
    history, seed, turn = [], options.pop("seed", None), 0
    room = model.sequence_length - min(options.get("max_new_tokens", 200), model.sequence_length // 2)
    while True:
        if terminal:
            output.write("> ")
            output.flush()
        line = input.readline()
        if not line:
            break
        line = line.rstrip("\r\n")
        if not line.strip():
            continue
        if line.strip() == "/clear":
            history = []
            if terminal:
                output.write("(cleared)\n")
            continue
        history.append({"role": "user", "content": line})
        try:
            messages = template_of(model).cut(model.tokenizer, head + history, room, reserve=1)
        except ValueError:
            messages = head + history[-1:]
        history = [m for m in messages if m["role"] != "system" or not head]
        pieces, started = [], False
        for piece in chat(model, messages, seed=None if seed is None else seed + turn, stream=True, **options):
            if not started:
                piece = piece.lstrip()
                started = bool(piece)
            pieces.append(piece)
            output.write(piece)
            output.flush()
        output.write("\n")
        output.flush()
        history.append({"role": "assistant", "content": "".join(pieces)})
        turn += 1
