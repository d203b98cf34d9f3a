"""The events the decode thread hands a request (`batching.Request.deliver`), as small named types.

A request hears, in this order: `AcceptedEvent` or `RefusedEvent` (or `FailedEvent`); then
`TextEvent`s and one `FinishEvent` per choice; then `DoneEvent`. `ClosedEvent` (the server is
shutting down) or `FailedEvent` (an unexpected error) may end it at any point instead.
`keras_nanogpt.serve.app` turns them into a response or server-sent events.

Example:
    >>> events = [TextEvent(0, "It is"), FinishEvent(0, "length", 2), DoneEvent()]
    >>> [event.text for event in events if isinstance(event, TextEvent)]
    ['It is']
"""

import dataclasses


@dataclasses.dataclass(frozen=True)
class AcceptedEvent:
    """The request's prompts were checked and it waits for a batch.

    Args:
        prompt_tokens: each prompt's length in tokens, a list.
        warnings: messages about the prompts (e.g. characters the vocabulary lacks), a list.

    Example:
        >>> AcceptedEvent([3, 5], []).prompt_tokens
        [3, 5]
    """

    prompt_tokens: list
    warnings: list


@dataclasses.dataclass(frozen=True)
class RefusedEvent:
    """The request cannot run as asked (a client error: the server answers 400).

    Args:
        message: what is wrong and what is allowed.
        param: the request parameter at fault, e.g. "prompt".

    Example:
        >>> RefusedEvent("`prompt` is too long.", "prompt").param
        'prompt'
    """

    message: str
    param: str


@dataclasses.dataclass(frozen=True)
class TextEvent:
    """New text for one choice.

    Args:
        choice: the choice's index in the request (prompt `i`'s `j`-th choice is `i * n + j`).
        text: the piece, to append to the choice's text so far.

    Example:
        >>> TextEvent(0, " truth").text
        ' truth'
    """

    choice: int
    text: str


@dataclasses.dataclass(frozen=True)
class FinishEvent:
    """One choice has all its text.

    Args:
        choice: the choice's index in the request.
        reason: "stop" (it met a stop string) or "length" (it made `max_tokens`).
        tokens: how many new tokens the choice has.

    Example:
        >>> FinishEvent(0, "length", 20).reason
        'length'
    """

    choice: int
    reason: str
    tokens: int


@dataclasses.dataclass(frozen=True)
class DoneEvent:
    """Every choice of the request has finished: the last event it gets.

    Example:
        >>> DoneEvent()
        DoneEvent()
    """


@dataclasses.dataclass(frozen=True)
class ClosedEvent:
    """The server is shutting down: the request ends here (the server answers 503).

    Args:
        message: why, for the client.

    Example:
        >>> ClosedEvent("The server is shutting down.").message
        'The server is shutting down.'
    """

    message: str


@dataclasses.dataclass(frozen=True)
class FailedEvent:
    """An unexpected error ended the request (the server answers 500).

    Args:
        message: the error, for the client.

    Example:
        >>> FailedEvent("Generation failed: RuntimeError: out of memory").message
        'Generation failed: RuntimeError: out of memory'
    """

    message: str
