"""The serving engine: one generation loop in a worker thread, fed by many concurrent requests.

Each request (one ``n`` choice is one ``Sequence``) waits in a bounded queue; the loop admits waiting sequences
into a ``DecodeBatch`` whenever a row is free (prefill), decodes one token for every running row per step, and
lets a row go the moment it finishes (EOS, a stop string, ``max_tokens``) or is cancelled (its client went
away). A full queue refuses new work at once (``EngineBusy``, which the server answers 503 + Retry-After)
instead of letting latency grow without bound.

The loop runs the model in its own thread so the event loop stays free to accept connections and stream; it
hands events back with ``loop.call_soon_threadsafe``. Text is streamed as deltas of the decoded text, holding
back an incomplete UTF-8 character and any tail that could still become a stop string, so a stop string never
reaches the client, even split across tokens.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
import uuid
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field

import torch

from vlmlab.inference.batch import DecodeBatch
from vlmlab.inference.generate import sample_next
from vlmlab.serving.protocol import Sampling

log = logging.getLogger("vlmlab.serve")


class EngineBusy(Exception):
    """The queue is full; retry after ``retry_after`` seconds."""

    def __init__(self, retry_after: int):
        super().__init__(f"the server is at capacity; retry after {retry_after} s")
        self.retry_after = retry_after


@dataclass(eq=False)  # compared by identity (``running.remove``): fields hold tensors
class Sequence:
    """One generated choice. Its ``events`` queue (which the ``n`` choices of a request may share) receives
    ``(index, "delta", text)`` items, then one ``(index, "done", finish_reason)``; ``tokens`` are the ids
    generated so far. ``finish_reason``: "stop", "length", "cancelled" or "error"."""

    inputs: dict  # input_ids [1, P] and the visual tensors
    params: Sampling  # max_tokens, temperature, top_p, seed, stop (its n is the request's)
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue
    index: int = 0
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    tokens: list[int] = field(default_factory=list)
    text: str = ""  # emitted so far
    finish_reason: str | None = None
    cancelled: bool = False
    generator: torch.Generator | None = None
    enqueued: float = field(default_factory=time.monotonic)

    @property
    def prompt_tokens(self) -> int:
        return int(self.inputs["input_ids"].shape[1])


class Engine:
    """``submit`` sequences from the event loop; ``start``/``stop`` the worker thread."""

    def __init__(
        self, model, processor, *, max_batch: int = 8, max_queue: int = 64, context: int | None = None
    ):
        self.model = model.eval()
        self.processor = processor
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.context = context or int(model.language.config.max_position_embeddings)
        self.eos = set(processor.eos_token_ids)
        self._pending: collections.deque[Sequence] = collections.deque()
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.running: list[Sequence] = []  # read by /health and tests
        self.steps = 0
        self.error: str | None = None
        # Built here, so that an unsupported decoder fails at startup rather than in the loop.
        self._batch = DecodeBatch(self.model, self.context)
        self._outbox: list[tuple[Sequence, tuple]] = []  # events of the current step (``_flush``)

    # -- event-loop side ---------------------------------------------------------------------------------
    def submit(self, seqs: Seq[Sequence]) -> None:
        """Queue ``seqs`` (the ``n`` choices of one request) together, or refuse them all."""
        if self.started and not self.alive:
            raise EngineBusy(retry_after=60)  # the loop stopped (see ``error``): nothing would answer
        with self._wake:
            if len(self._pending) + len(seqs) > self.max_queue:
                raise EngineBusy(retry_after=max(1, round(self._retry_estimate())))
            for s in seqs:
                if s.params.seed is not None:
                    s.generator = torch.Generator().manual_seed(s.params.seed)
                self._pending.append(s)
            self._wake.notify()

    def cancel(self, seq: Sequence) -> None:
        """Stop ``seq`` (its client disconnected): it leaves the batch before the next step."""
        seq.cancelled = True
        with self._wake:
            self._wake.notify()

    @property
    def queued(self) -> int:
        return len(self._pending)

    def _retry_estimate(self) -> float:
        return 1.0 + len(self._pending) / max(1, self.max_batch)

    # -- worker thread -----------------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._run, name="vlmlab-engine", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    @property
    def started(self) -> bool:
        return self._thread is not None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as e:  # never leave clients waiting on a dead loop
            log.exception("the generation loop stopped")
            self.error = f"{type(e).__name__}: {e}"
            with self._wake:
                for s in [*self.running, *self._pending]:
                    self._outbox.append((s, (s.index, "done", "error")))
                self._pending.clear()
                self.running = []
            self._flush()

    def _loop(self) -> None:
        batch = self._batch
        with torch.inference_mode():
            while True:
                with self._wake:
                    while not self._stopping and not self._pending and not self.running:
                        self._wake.wait()
                    if self._stopping:
                        for s in [*self.running, *self._pending]:
                            self._finish(s, "cancelled")
                        self._flush()
                        return
                    admit = []
                    while self._pending and len(self.running) + len(admit) < self.max_batch:
                        admit.append(self._pending.popleft())
                try:
                    self._step(batch, admit)
                except Exception as e:  # a model failure ends the running requests, not the server
                    log.exception("generation failed; ending the %d requests in the batch", len(self.running))
                    self.error = f"{type(e).__name__}: {e}"
                    for s in [*self.running, *admit]:
                        self._finish(s, "error")
                        batch.remove(s.id)
                    self.running = []
                    batch = self._batch = DecodeBatch(self.model, self.context)
                finally:
                    self._flush()

    def _step(self, batch: DecodeBatch, admit: list[Sequence]) -> None:
        for s in admit:
            if s.cancelled:
                self._finish(s, "cancelled")
                continue
            logits = batch.add(s.id, **s.inputs)
            self.running.append(s)
            self._accept(s, logits[None])
            self._flush()  # its first token now, not after the other prefills
        self._drop_finished(batch)
        if not self.running:
            return
        last = torch.tensor([s.tokens[-1] for s in self.running])
        logits = batch.step(last)
        self.steps += 1
        greedy = logits.argmax(-1).tolist()  # one call for every greedy row
        for s, row, g in zip(list(self.running), logits, greedy):
            self._accept(s, row[None], g)
        self._drop_finished(batch)

    def _drop_finished(self, batch: DecodeBatch) -> None:
        for s in [s for s in self.running if s.finish_reason or s.cancelled]:
            if s.cancelled and not s.finish_reason:
                self._finish(s, "cancelled")
            batch.remove(s.id)
            self.running.remove(s)

    def _accept(self, s: Sequence, logits: torch.Tensor, greedy: int | None = None) -> None:
        """Sample ``s``'s next token (``greedy``: its argmax, when already computed), emit the text it completes,
        and finish it when it should."""
        if s.cancelled:
            return
        p = s.params
        if p.temperature <= 0 and greedy is not None:
            token = greedy
        else:
            token = int(sample_next(logits, p.temperature > 0, p.temperature, p.top_p, s.generator)[0])
        if token in self.eos:
            self._emit(s, final=True)
            self._finish(s, "stop")
            return
        s.tokens.append(token)
        full = self._text(s)
        cut = min((full.find(x) for x in p.stop if x in full), default=-1)
        if cut >= 0:
            self._emit(s, full[:cut], final=True)
            self._finish(s, "stop")
        elif len(s.tokens) >= p.max_tokens or s.prompt_tokens + len(s.tokens) >= self.context:
            self._emit(s, full, final=True)
            self._finish(s, "length")
        else:
            self._emit(s, full)

    def _emit(self, s: Sequence, full: str | None = None, final: bool = False) -> None:
        if full is None:
            full = self._text(s)
        if not final:
            full = _safe_prefix(full, s.params.stop)
        if len(full) > len(s.text) and full.startswith(s.text):
            delta, s.text = full[len(s.text) :], full
            self._outbox.append((s, (s.index, "delta", delta)))

    def _text(self, s: Sequence) -> str:
        # Without the leading whitespace a tokenizer may put before the first word (as ``Processor.decode``).
        return self.processor.tokenizer.decode(s.tokens, skip_special_tokens=True).lstrip()

    def _finish(self, s: Sequence, reason: str) -> None:
        s.finish_reason = reason
        self._outbox.append((s, (s.index, "done", reason)))

    def _flush(self) -> None:
        """Hand this step's events to their event loops: one wake-up per loop and step, not one per token."""
        by_loop: dict = {}
        for s, event in self._outbox:
            by_loop.setdefault(s.loop, []).append((s.events, event))
        self._outbox = []
        for loop, items in by_loop.items():
            loop.call_soon_threadsafe(_deliver, items)


def _deliver(items: list) -> None:
    for queue, event in items:
        queue.put_nowait(event)


def _safe_prefix(text: str, stop: Seq[str]) -> str:
    """``text`` less what may still change: a trailing replacement character (half a UTF-8 character) and the
    longest tail that is the start of a stop string."""
    text = text.rstrip("\ufffd")
    hold = 0
    for s in stop:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                hold = max(hold, k)
                break
    return text[: len(text) - hold]
