"""Reading a completions or chat request: the body, its JSON and each field checked, or an `APIError` in OpenAI's shape.

The field checks are `_validation`'s (the same messages as the Python API's), answered as 400s.

Example:
    >>> params = completion_params({"prompt": "It is", "max_tokens": 8}, "tiny", max_tokens=512, max_batch=32)
    >>> params["prompts"], params["max_tokens"], params["sampling"].temperature
    (['It is'], 8, 1.0)
"""

import json

from starlette.responses import JSONResponse

from keras_nanogpt import _validation, chat
from keras_nanogpt.serve.batching import Sampling

_STOP_STRINGS = 4  # OpenAI's limit
_SEED_LIMIT = 2 ** 63 - 1
_UNSUPPORTED = {  # OpenAI fields taken only at the value that changes nothing
    "logprobs": (None, 0), "best_of": (None, 1), "suffix": (None, ""), "logit_bias": (None, {}),
    "presence_penalty": (None, 0), "frequency_penalty": (None, 0),
}
FIELDS = ("model", "prompt", "max_tokens", "temperature", "top_p", "top_k", "n", "stream",
          "stream_options", "stop", "seed", "echo", "user", *_UNSUPPORTED)
_CHAT_UNSUPPORTED = {  # OpenAI chat fields taken only at the value that changes nothing
    "logprobs": (None, False), "top_logprobs": (None, 0), "logit_bias": (None, {}),
    "presence_penalty": (None, 0), "frequency_penalty": (None, 0), "tools": (None, []),
    "tool_choice": (None, "none"), "parallel_tool_calls": (None,), "functions": (None, []),
    "function_call": (None, "none"), "response_format": (None, {"type": "text"}), "audio": (None,),
    "modalities": (None, ["text"]), "prediction": (None,), "reasoning_effort": (None,),
    "web_search_options": (None,), "store": (None, False), "metadata": (None, {}),
    "service_tier": (None, "auto", "default"), "verbosity": (None,),
}
CHAT_FIELDS = ("model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "n",
               "stream", "stream_options", "stop", "seed", "user", *_CHAT_UNSUPPORTED)


class APIError(Exception):
    """An error answered in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.

    Args:
        status: the HTTP status.
        message: what was wrong and what is allowed.
        param: the request field at fault, if any.
        code: OpenAI's error code, if any.
        kind: OpenAI's error type.

    Example:
        >>> APIError(400, "`n` must be an integer >= 1; got 0.", param="n").body()["error"]["param"]
        'n'
    """

    def __init__(self, status, message, param=None, code=None, kind="invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self):
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}

    def response(self):
        return JSONResponse(self.body(), status_code=self.status)


async def read_body(request, limit):
    """The request's body, at most `limit` bytes (413 above)."""
    length = request.headers.get("content-length", "")
    too_large = APIError(413, f"The request body is larger than this server takes ({limit} bytes, "
                              f"its --max-body-bytes).", code="request_too_large")
    if length.isdigit() and int(length) > limit:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


def parse_json(body):
    """The body as a JSON object (400 otherwise)."""
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError) as error:
        raise APIError(400, f"The request body is not valid JSON: {error}.") from None
    except RecursionError:  # Python's parser recurses once per level of nesting
        raise APIError(400, "The request body nests its JSON too deeply for this server.") from None
    if not isinstance(payload, dict):
        raise APIError(400, f"The request body must be a JSON object; got {type(payload).__name__}.")
    return payload


def unknown_model(requested, served):
    return APIError(404, f"The model {requested!r} does not exist; this server serves {served!r}.",
                    param="model", code="model_not_found")


def completion_params(payload, served, max_tokens, max_batch):
    """The checked settings of a completions request (APIError 400/404 on bad input).

    Args:
        payload: the request's JSON object.
        served: the served model's name.
        max_tokens: the largest `max_tokens` allowed (the server's --max-tokens).
        max_batch: rows (prompts x n) allowed (the server's --max-batch).

    Returns:
        A dict: prompts, max_tokens, n, stream, echo, stream_options and sampling (a `Sampling`).
    """
    _check_fields(payload, FIELDS, _UNSUPPORTED, served)
    prompts = _prompts(payload.get("prompt"))
    params = {
        "prompts": prompts,
        "max_tokens": _field(payload, "max_tokens", 16, _validation.check_int, minimum=0, maximum=max_tokens,
                             limit="the server's --max-tokens"),
        "echo": _boolean(payload, "echo"),
    }
    return _shared(payload, params, len(prompts), max_batch)


def chat_params(payload, served, max_tokens, max_batch):
    """The checked settings of a chat completions request (APIError 400/404 on bad input).

    Args:
        payload: the request's JSON object.
        served: the served model's name.
        max_tokens: the largest `max_tokens` / `max_completion_tokens` allowed (the server's --max-tokens),
            and the default when neither is given.
        max_batch: choices (n) allowed (the server's --max-batch).

    Returns:
        A dict: messages (checked, `keras_nanogpt.chat.check_messages`), max_tokens, n, stream,
        stream_options and sampling (a `Sampling`; the template's stop sequences are the app's to add).

    Example:
        >>> chat_params({"messages": [{"role": "user", "content": "Hi"}]}, "tiny", 512, 32)["max_tokens"]
        512
    """
    _check_fields(payload, CHAT_FIELDS, _CHAT_UNSUPPORTED, served)
    try:
        messages = chat.check_messages(payload.get("messages"))
    except (TypeError, ValueError) as error:
        message = str(error)
        param = message.split("`")[1] if message.startswith("`") and message.count("`") >= 2 else "messages"
        raise APIError(400, message, param=param) from None
    for i, message in enumerate(messages):
        _check_unicode(message["content"], f"messages[{i}].content")
    limits = dict(minimum=0, maximum=max_tokens, limit="the server's --max-tokens")
    length = _field(payload, "max_completion_tokens", None, _validation.check_int, **limits)
    legacy = _field(payload, "max_tokens", None, _validation.check_int, **limits)
    if length is not None and legacy is not None and length != legacy:
        raise APIError(400, f"`max_tokens` ({legacy}) and `max_completion_tokens` ({length}) disagree; "
                            f"give one of them.", param="max_completion_tokens")
    params = {"messages": messages, "max_tokens": next(v for v in (length, legacy, max_tokens) if v is not None)}
    return _shared(payload, params, 1, max_batch)


def _check_fields(payload, fields, unsupported, served):
    """400 for a field the server does not know or does not do (at a value that changes something);
    404 for another model."""
    unknown = sorted(set(payload) - set(fields))
    if unknown:
        raise APIError(400, f"Unrecognized request argument supplied: {', '.join(unknown)}. This server takes "
                            f"{', '.join(fields)}.", param=unknown[0])
    for field, neutral in unsupported.items():
        if field in payload and payload[field] not in neutral:
            raise APIError(400, f"`{field}` is not supported by this server; leave it out.", param=field)
    model = payload.get("model")
    if model is not None and not isinstance(model, str):
        raise APIError(400, f"`model` must be a string; got {model!r}.", param="model")
    if model is not None and model != served:
        raise unknown_model(model, served)


def _shared(payload, params, prompts, max_batch):
    """`params` with the settings completions and chats share: n, stream, stream_options, sampling."""
    get = payload.get
    params.update(n=_field(payload, "n", 1, _validation.check_int, maximum=max_batch,
                           limit="the server's --max-batch"),
                  stream=_boolean(payload, "stream"), stream_options=get("stream_options"))
    if prompts * params["n"] > max_batch:
        raise APIError(400, f"{prompts} prompts x n={params['n']} choices make "
                            f"{prompts * params['n']} rows; this server batches at most {max_batch} "
                            f"(its --max-batch).", param="n")
    options = params["stream_options"]
    if options is not None:
        if not params["stream"]:
            raise APIError(400, "`stream_options` is only allowed when `stream` is true.", param="stream_options")
        if not isinstance(options, dict) or set(options) - {"include_usage"} or not isinstance(
                options.get("include_usage", False), bool):
            raise APIError(400, f"`stream_options` must be {{\"include_usage\": true|false}}; got {options!r}.",
                           param="stream_options")
    if get("user") is not None and not isinstance(get("user"), str):
        raise APIError(400, f"`user` must be a string; got {get('user')!r}.", param="user")
    top_p = _field(payload, "top_p", None, _validation.check_float, 0.0, 1.0, low_inclusive=False,
                   high_inclusive=True)
    params["sampling"] = Sampling(
        temperature=_field(payload, "temperature", 1.0, _validation.check_float, 0.0, 2.0, high_inclusive=True),
        top_k=_field(payload, "top_k", None, _validation.check_int),
        top_p=None if top_p == 1.0 else top_p,
        stop=_stops(get("stop")),
        seed=_field(payload, "seed", None, _validation.check_int, minimum=0, maximum=_SEED_LIMIT,
                    limit="a 63-bit integer"))
    return params


def _field(payload, name, default, check, *args, **kwargs):
    """`payload[name]` passed through a `_validation` check (`default` when absent or null)."""
    value = payload.get(name)
    if value is None:
        return default
    try:
        return check(name, value, *args, **kwargs)
    except (TypeError, ValueError) as error:
        raise APIError(400, str(error), param=name) from None


def _prompts(prompt):
    if isinstance(prompt, str):
        prompt = [prompt]
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        for text in prompt:
            _check_unicode(text, "prompt")
        return prompt
    if prompt is None:
        raise APIError(400, "`prompt` is required: a string or a list of strings.", param="prompt")
    raise APIError(400, f"`prompt` must be a string or a non-empty list of strings (token ids are not "
                        f"taken); got {json.dumps(prompt)[:80]}.", param="prompt")


def _boolean(payload, name):
    value = payload.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise APIError(400, f"`{name}` must be true or false; got {json.dumps(value)}.", param=name)
    return value


def _stops(stop):
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if (not isinstance(stops, list) or not 1 <= len(stops) <= _STOP_STRINGS
            or not all(isinstance(s, str) and s for s in stops)):
        raise APIError(400, f"`stop` must be a non-empty string or a list of 1 to {_STOP_STRINGS} of them; "
                            f"got {json.dumps(stop)[:80]}.", param="stop")
    for text in stops:
        _check_unicode(text, "stop")
    return tuple(stops)


def _check_unicode(text, name):
    """400 for a string that is not valid Unicode text (JSON lets a lone surrogate such as \\ud800 through)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise APIError(400, f"`{name}` holds a character that is not valid Unicode text "
                            f"({text[error.start]!r} at {error.start}).", param=name) from None
