"""Chat templates: OpenAI-style messages checked and rendered to a model's token ids, and the stop sequences
that end the assistant's reply.

(A minimal stand-in written for the server's chat endpoint; the chat work's own module replaces it. It has the
plain-text default template only.)

The default template, for a model without its own:

    System: You are terse.

    User: Who is Mr. Darcy?

    Assistant:

The reply ends where the model starts the next user turn ("\\nUser:", a stop string).

Example:
    >>> check_messages([{"role": "user", "content": "Hi"}])
    [{'role': 'user', 'content': 'Hi'}]
"""

import dataclasses

import numpy as np

from keras_nanogpt import tokenizers

ROLES = ("system", "user", "assistant", "developer")
_LABELS = {"system": "System", "developer": "System", "user": "User", "assistant": "Assistant"}


@dataclasses.dataclass(frozen=True)
class Template:
    """A chat template's name (the default, plain-text one here)."""

    name: str


DEFAULT = Template("plain")


def check_messages(messages):
    """The messages as a list of `{"role", "content"}` with string content, or a ValueError naming the field.

    Args:
        messages: a non-empty list of `{"role": "system"|"user"|"assistant"|"developer", "content": ...}`,
            content a string or a list of `{"type": "text", "text": ...}` parts.

    Example:
        >>> check_messages([{"role": "user", "content": [{"type": "text", "text": "Hi"}]}])[0]["content"]
        'Hi'
    """
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"`messages` must be a non-empty list of {{\"role\", \"content\"}} objects; "
                         f"got {type(messages).__name__ if messages is not None else 'null'}.")
    checked = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ValueError(f"`messages[{i}]` must be an object with `role` and `content`; "
                             f"got {type(message).__name__}.")
        role = message.get("role")
        if role not in ROLES:
            raise ValueError(f"`messages[{i}].role` must be one of {', '.join(ROLES)}; got {role!r}.")
        if "content" not in message or message["content"] is None:
            raise ValueError(f"`messages[{i}].content` is missing.")
        checked.append({"role": role, "content": _content(message["content"], i)})
    return checked


def _content(content, index):
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise ValueError(f"`messages[{index}].content` must be a string or a list of text parts "
                     f"({{\"type\": \"text\", \"text\": ...}}).")


def has_template(model):
    """Whether `model` carries a chat template of its own (here: never; the default template serves)."""
    return False


def template_of(model):
    """The template `model`'s conversations are rendered with."""
    return DEFAULT


def stop_sequences(model):
    """What ends the assistant's reply: the start of the next user turn."""
    return ["\nUser:"]


def _text(messages):
    turns = [f"{_LABELS[m['role']]}: {m['content']}" for m in messages]
    return "\n\n".join(turns + ["Assistant:"])


def render(model, messages, max_tokens=None):
    """The conversation's token ids and the opening of the assistant's reply, 1-D int32.

    Args:
        model: a `NanoGPT` with a vectorizer.
        messages: as `check_messages` takes.
        max_tokens: at most this many ids: the oldest messages go first, whole, the system message
            stays; a ValueError naming `messages` when even the last message does not fit.

    Example:
        >>> render(model, [{"role": "user", "content": "Hi"}]).dtype  # doctest: +SKIP
        dtype('int32')
    """
    messages = check_messages(messages)
    head = [m for m in messages[:1] if m["role"] in ("system", "developer")]
    rest = messages[len(head):]
    while True:
        ids = np.asarray(tokenizers.prompt_ids(model.tokenizer, _text(head + rest), "messages"), "int32")
        if max_tokens is None or ids.size <= max_tokens:
            return ids
        if len(rest) <= 1:
            raise ValueError(f"`messages` renders to {ids.size} tokens even with only the system message and "
                             f"the last message kept; at most {max_tokens} fit.")
        rest = rest[1:]
