"""Request batching for `keras-nanogpt serve`: requests that arrive together share one decode batch.

One thread, the decode thread, owns the model. It checks each new request's prompts (tokens,
length, characters the vocabulary lacks; a chat request's messages are rendered to ids here), picks
the next batch from the waiting requests and runs it through `generation.stream`, handing every
request its pieces as they are made. The rules:

- A batch holds requests with the same sampling settings (temperature, top_k, top_p, stop strings)
  and of the same kind (completions, whose text prompts never produce the padding id, as
  `model.generate(text)`; or chats, whose rendered ids decode as `model.chat` does), in arrival
  order, up to `max_batch` rows (a request has one row per prompt and choice: prompts x n).
  Each row ends at its own request's `max_tokens`. Rows are padded to a power of two with rows that
  make no tokens, so a handful of batch shapes get compiled, not one per batch size.
- A request with a `seed` runs alone: its rows, no padding, nothing else in the batch. Its tokens
  are then exactly `model.generate(rows, seed=seed, ...)`'s, whatever else the server is doing
  (a seed drives the draws of the whole batch, so sharing one would make them depend on the others).
- When the decode thread is free and requests wait, it gathers: it starts the batch once no new
  request has come for `batch_wait` seconds (at most ten such waits), so a burst of requests, such
  as many clients starting together, fills one batch instead of starting a batch per request.
- A cancelled request (its client went away) makes no more tokens: its rows stop at the next token
  and the batch goes on with the others; the batch ends when its last live row does.
- At most `max_queue` requests wait outside a batch; `submit` raises `QueueFull` beyond that.

Events (`keras_nanogpt.serve.events`) reach a request through its `deliver` callable, called on the
decode thread with a list of them, in this order: `AcceptedEvent` or `RefusedEvent`; then
`TextEvent`s and one `FinishEvent` per choice; then `DoneEvent`. `ClosedEvent` (the server is
shutting down) or `FailedEvent` (an unexpected error) may end a request at any point instead.
"""

import collections
import dataclasses
import logging
import threading
import warnings

from keras_nanogpt import chat, generation, tokenizers
from keras_nanogpt.serve.events import (AcceptedEvent, ClosedEvent, DoneEvent, FailedEvent, FinishEvent,
                                        RefusedEvent, TextEvent)

logger = logging.getLogger(__name__)


class QueueFull(Exception):
    """`submit` found `max_queue` requests waiting already."""


class Closed(Exception):
    """`submit` came after `close`."""


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How a request's tokens are drawn; requests batch together only when these are equal.

    Args:
        temperature: softmax temperature, 0 for greedy decoding.
        top_k: sample among the `top_k` most likely tokens (None: all).
        top_p: nucleus sampling threshold in (0, 1] (None: off).
        stop: stop strings (a tuple).
        seed: integer seed, or None for fresh draws.

    Example:
        >>> Sampling(temperature=0.8, top_k=40)
        Sampling(temperature=0.8, top_k=40, top_p=None, stop=(), seed=None)
    """

    temperature: float = 1.0
    top_k: int = None
    top_p: float = None
    stop: tuple = ()
    seed: int = None


class Request:
    """One completion or chat request as the decode thread sees it: prompts, n choices each, settings.

    Args:
        prompts: the prompt strings (a completion), or None for a chat.
        n: choices per prompt; choice `i * n + j` is prompt `i`'s `j`-th.
        max_tokens: new tokens per choice, at most.
        sampling: a `Sampling`.
        deliver: called on the decode thread with each list of events (see the module docstring).
        messages: a chat's checked messages (`keras_nanogpt.chat.check_messages`), rendered to one
            prompt of ids on the decode thread; None for a completion.

    Example:
        >>> request = Request(["It is"], 1, 20, Sampling(), deliver=print)
        >>> request.rows
        1
    """

    def __init__(self, prompts, n, max_tokens, sampling, deliver, messages=None):
        self.prompts = list(prompts) if messages is None else [None]
        self.messages = messages
        self.ids = None  # a chat's prompt ids, once rendered
        self.n = n
        self.max_tokens = max_tokens
        self.sampling = sampling
        self.deliver = deliver
        self.cancelled = False

    @property
    def rows(self):
        return len(self.prompts) * self.n

    @property
    def key(self):
        """Requests share a batch only when their keys are equal: the same settings, the same kind."""
        return self.sampling, self.messages is not None

    def cancel(self):
        """Make no more tokens for this request (safe from any thread; takes effect at the next token)."""
        self.cancelled = True


class Batcher:
    """The decode thread and its queue: `start`, `submit` requests, `close` and `join` at shutdown.

    Args:
        model: a `NanoGPT` with a vectorizer; only the decode thread touches it.
        max_batch: rows in one decode batch, at most.
        max_queue: requests waiting outside a batch, at most.
        max_prompt_tokens: tokens in one prompt, at most.
        batch_wait: seconds of quiet that end a gather (see the module docstring).

    Example:
        >>> batcher = Batcher(model, max_batch=32, max_queue=64, max_prompt_tokens=64)  # doctest: +SKIP
        >>> batcher.start(); batcher.submit(Request(["It is"], 1, 20, Sampling(), deliver=print))
        >>> batcher.close(); batcher.join()
    """

    def __init__(self, model, max_batch, max_queue, max_prompt_tokens, batch_wait=0.005):
        self.model = model
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.max_prompt_tokens = max_prompt_tokens
        self.batch_wait = batch_wait
        self._condition = threading.Condition()
        self._inbox = collections.deque()  # submitted, not yet checked (guarded by _condition)
        self._queued = 0                   # submitted, not yet in a batch (guarded by _condition)
        self._closing = None               # the message of `close`, once called
        self._waiting = []                 # checked, not yet in a batch (decode thread only)
        self._running = []                 # the requests of the batch being decoded
        self._batches = self._rows = 0     # batches decoded so far, and their rows (padding not counted)
        self._thread = threading.Thread(target=self._run, name="keras-nanogpt-decode", daemon=True)

    def start(self):
        self._thread.start()

    def submit(self, request):
        """Queue `request`; raise `QueueFull` when `max_queue` wait already, `Closed` after `close`."""
        with self._condition:
            if self._closing is not None:
                raise Closed(self._closing)
            if self._queued >= self.max_queue:
                raise QueueFull(f"{self._queued} requests are waiting already (the server's --max-queue).")
            self._queued += 1
            self._inbox.append(request)
            self._condition.notify()

    def close(self, message="The server is shutting down."):
        """End every request with a `ClosedEvent(message)` and let the decode thread stop."""
        with self._condition:
            if self._closing is None:
                self._closing = message
            self._condition.notify()

    def join(self, timeout=10.0):
        """Wait for the decode thread to stop (after `close`)."""
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def closing(self):
        return self._closing is not None

    def stats(self):
        """`waiting`: requests outside a batch; `running`: live rows in the batch being decoded;
        `batches`, `rows`: batches decoded since the start, and the request rows they held."""
        running = sum(r.rows for r in list(self._running) if not r.cancelled)
        return {"waiting": self._queued, "running": running, "batches": self._batches, "rows": self._rows}

    # -- the decode thread --------------------------------------------------------------------

    def _run(self):
        try:
            while True:
                batch = self._next_batch()
                if batch is None:
                    return
                self._running = batch
                self._batches += 1
                self._rows += sum(r.rows for r in batch)
                try:
                    self._decode(batch)
                except Exception as error:  # noqa: BLE001 -- one bad batch must not stop the server
                    logger.exception("decoding a batch failed")
                    for request in batch:
                        request.deliver([FailedEvent(f"Generation failed: {type(error).__name__}: {error}")])
                finally:
                    self._running = []
        finally:
            self._end_all()

    def _end_all(self):
        """After `close`: every request still queued gets the closing message."""
        with self._condition:
            inbox, self._inbox = list(self._inbox), collections.deque()
            self._queued = 0
            message = self._closing or "The server stopped."
        for request in [*self._waiting, *inbox]:
            request.deliver([ClosedEvent(message)])
        self._waiting = []

    def _next_batch(self):
        """Block until requests wait, gather more while they keep coming, and take a batch (None: closing)."""
        while True:
            with self._condition:
                self._condition.wait_for(lambda: self._inbox or self._waiting or self._closing is not None)
                if self._closing is not None:
                    return None
            self._admit()
            self._drop_cancelled()
            if not self._waiting:
                continue
            for _ in range(10):
                if self._compatible_rows() >= self.max_batch:
                    break
                with self._condition:
                    arrived = self._condition.wait_for(
                        lambda: self._inbox or self._closing is not None, timeout=self.batch_wait)
                    if self._closing is not None:
                        return None
                if not arrived:
                    break
                self._admit()
            self._drop_cancelled()
            if self._waiting:
                return self._take()

    def _admit(self):
        """Check the prompts of newly submitted requests; answer each with an `AcceptedEvent` or another
        answer (`RefusedEvent`, `FailedEvent`)."""
        with self._condition:
            new, self._inbox = list(self._inbox), collections.deque()
        refused = 0
        for request in new:
            answer = self._check(request)
            request.deliver([answer])
            if isinstance(answer, AcceptedEvent):
                self._waiting.append(request)
            else:
                refused += 1
        self._dequeue(refused)

    def _check(self, request):
        """The answer to `request`: an `AcceptedEvent`, a `RefusedEvent` or a `FailedEvent`."""
        try:
            return self._check_prompts(request)
        except (ValueError, TypeError) as error:  # e.g. a character a vocabulary without [UNK] lacks
            return RefusedEvent(" ".join(str(error).split()), "prompt")
        except Exception as error:  # noqa: BLE001 -- answered, so that its client does not wait forever
            logger.exception("checking a request failed")
            return FailedEvent(f"Checking the request failed: {type(error).__name__}: {error}")

    def _check_prompts(self, request):
        tokenizer = self.model.tokenizer
        counts = []
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if request.messages is not None:  # a conversation too long is cut from the left, or refused
                try:
                    request.ids = chat.render(self.model, request.messages, max_tokens=self.max_prompt_tokens)
                except (ValueError, TypeError) as error:
                    return RefusedEvent(" ".join(str(error).split()), "messages")  # e.g. it cannot fit
                counts.append(int(request.ids.size))
            for index, prompt in enumerate(p for p in request.prompts if p is not None):
                name = "prompt" if len(request.prompts) == 1 else f"prompt[{index}]"
                ids = tokenizers.prompt_ids(tokenizer, prompt, name)
                if ids.size > self.max_prompt_tokens:
                    return RefusedEvent(f"`{name}` is {ids.size} tokens long; this server takes at most "
                                        f"{self.max_prompt_tokens} (its --max-prompt-tokens).", "prompt")
                counts.append(int(ids.size))
        messages = [str(w.message) for w in caught]
        for message in messages:
            logger.warning("%s", message)
        return AcceptedEvent(counts, messages)

    def _drop_cancelled(self):
        kept = [r for r in self._waiting if not r.cancelled]
        self._dequeue(len(self._waiting) - len(kept))
        self._waiting = kept

    def _dequeue(self, count):
        if count:
            with self._condition:
                self._queued -= count

    def _compatible_rows(self):
        first = self._waiting[0]
        if first.sampling.seed is not None:
            return self.max_batch
        return sum(r.rows for r in self._waiting if r.key == first.key)

    def _take(self):
        """The oldest waiting request and, unless it has a seed, the later ones with its settings."""
        first = self._waiting[0]
        batch, rows = [first], first.rows
        if first.sampling.seed is None:
            for request in self._waiting[1:]:
                if request.key == first.key and rows + request.rows <= self.max_batch:
                    batch.append(request)
                    rows += request.rows
        taken = set(map(id, batch))
        self._waiting = [r for r in self._waiting if id(r) not in taken]
        self._dequeue(len(batch))
        return batch

    def _decode(self, batch):
        rows = [(request, choice, prompt) for request in batch
                for choice, prompt in enumerate(request.ids if request.messages is not None else p
                                                for p in request.prompts for _ in range(request.n))]
        prompts = [prompt for _, _, prompt in rows]
        limits = [request.max_tokens for request, _, _ in rows]
        sampling = batch[0].sampling
        if sampling.seed is None:  # pad to a power of two with copies of a prompt that make nothing
            size = min(self.max_batch, 1 << (len(rows) - 1).bit_length())
            shortest = min(prompts, key=len)
            prompts += [shortest] * (size - len(rows))
            limits += [0] * (size - len(rows))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # `_check` reported the prompts' warnings already
            stream = generation.stream(
                self.model, prompts, max_new_tokens=limits, temperature=sampling.temperature,
                top_k=sampling.top_k, top_p=sampling.top_p, seed=sampling.seed,
                stop=list(sampling.stop) or None)
        remaining = {request: request.rows for request in batch}  # rows not yet finished
        live = list(range(len(rows)))
        texts = None if batch[0].messages is None else [""] * len(rows)  # a chat's rows: ids in, text out
        for pieces in stream:
            if texts is not None:
                pieces = self._texts(stream, live, pieces, texts)
            live = self._hand_out(stream, rows, live, pieces, remaining)
            if self._closing is not None:
                for request in {rows[row][0] for row in live}:
                    request.deliver([ClosedEvent(self._closing)])
                return
            self._admit()  # requests that came meanwhile get their answer now
            if not live:
                return
        self._hand_out(stream, rows, live, None, remaining)  # rows that ended without a last piece

    @staticmethod
    def _texts(stream, live, pieces, texts):
        """The new text of each live row whose ids grew (`texts`: each row's text so far, updated)."""
        out = [""] * len(pieces)
        for row in live:
            if len(pieces[row]):
                text = stream.text(row)
                out[row], texts[row] = text[len(texts[row]):], text
        return out

    @staticmethod
    def _hand_out(stream, rows, live, pieces, remaining):
        """Deliver one step's pieces and finishes; cancel the rows of cancelled requests; return the
        rows still live."""
        events = collections.defaultdict(list)
        still = []
        for row in live:
            request, choice, _ = rows[row]
            if request.cancelled:
                stream.cancel(row)
                continue
            if pieces is not None and pieces[row]:
                events[request].append(TextEvent(choice, pieces[row]))
            reason = stream.finish_reason(row)
            if reason is None:
                still.append(row)
                continue
            events[request].append(FinishEvent(choice, reason, stream.token_count(row)))
            remaining[request] -= 1
            if remaining[request] == 0:
                events[request].append(DoneEvent())
        for request, request_events in events.items():
            request.deliver(request_events)
        return still
