"""A paged KV cache and continuous batching (lesson 16): many requests, one model, no waiting.

``nblib.kvcache.KVCache`` gives every row the same number of slots, as long as the longest
prompt plus the most new tokens: a batch is a block, and a short request pays for the long
ones and waits for them. A serving engine does better in two ways (vLLM's PagedAttention,
Orca's iteration-level scheduling):

- **Pages.** The cache is one pool of fixed-size pages (``page_size`` token slots each). A
  request owns a list of pages, its *page table*, that grows one page at a time as it
  writes tokens; a finished request gives its pages back at once. Memory follows what
  requests hold, not what the longest might need.
- **Continuous batching.** Each step the engine admits waiting requests (a prefill each),
  runs one decode step for every running request together, and retires the finished
  ones: a request joins and leaves mid-flight, and nothing is recomputed.

``PagedKVCache`` keeps the pool and the page tables; ``cache.view(seqs, n_new)`` is what the
model sees for one forward pass: an object with the ``KVCache`` interface (``pos``,
``max_len``, ``update``) that writes each row's new keys into its pages and gathers its
keys back, right-aligned, with the ``attention_mask`` that hides the other rows' extra
columns. ``ContinuousBatcher`` is the engine; ``static_batches`` is the baseline it beats;
``EngineThread`` runs the engine for a server (``nblib.serve``), one thread for every client.
"""
from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Sequence

import torch

from nblib import engine, sample


class OutOfPages(RuntimeError):
    """The pool has no free page left for a request that must grow."""


def pages_for(n_tokens: int, page_size: int) -> int:
    """How many pages ``n_tokens`` tokens occupy (a page holds ``page_size``; the last may be part-full)."""
    return -(-n_tokens // page_size)


def token_slots(table: Sequence[int], page_size: int, start: int, end: int) -> torch.Tensor:
    """The pool slots (LongTensor [end - start]) of a request's tokens ``start ... end - 1``: token t
    is place ``t % page_size`` of the request's page number ``t // page_size``, which is pool page
    ``table[t // page_size]``; pool page ``n`` holds slots ``n * page_size ... n * page_size + page_size - 1``."""
    t = torch.arange(start, end)
    return torch.as_tensor(list(table), dtype=torch.long)[t // page_size] * page_size + t % page_size


class PagedKVCache:
    """Every layer's keys and values in one pool of pages, shared by all requests.

    ``k`` and ``v`` are [n_layer, n_pages * page_size, n_kv_heads, head_dim]: slot
    ``page * page_size + i`` is place ``i`` of page ``page``. ``tables[seq]`` lists the pages of
    request ``seq`` in order; its token ``t`` sits in slot ``tables[seq][t // page_size] *
    page_size + t % page_size``. ``lengths[seq]`` counts the tokens written so far.
    """

    def __init__(self, config, n_pages: int, page_size: int = 16, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32, slots_fn=token_slots):
        if n_pages < 1 or page_size < 1:
            raise ValueError(f"n_pages and page_size must be >= 1, got {n_pages} and {page_size}")
        n_kv_heads = getattr(config, "n_kv_heads", None) or config.n_head
        shape = (config.n_layer, n_pages * page_size, n_kv_heads, config.n_embd // config.n_head)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.n_pages, self.page_size, self.block_size = n_pages, page_size, config.block_size
        self.slots_fn = slots_fn  # lesson 16 plugs in the learner's token_slots
        self.free: list[int] = list(range(n_pages - 1, -1, -1))  # pop() hands out page 0 first
        self.tables: dict[int, list[int]] = {}
        self.lengths: dict[int, int] = {}
        self.slot_rows: dict[int, torch.Tensor] = {}  # the slots of every place in each request's pages

    def add(self, seq: int) -> None:
        """Start request ``seq`` with no pages and no tokens."""
        if seq in self.tables:
            raise ValueError(f"request {seq} is already in the cache")
        self.tables[seq], self.lengths[seq], self.slot_rows[seq] = [], 0, torch.zeros(0, dtype=torch.long)

    def grow(self, seq: int, n_tokens: int) -> None:
        """Give ``seq`` the pages it needs to hold ``n_tokens`` tokens in all (new pages from ``free``)."""
        table = self.tables[seq]
        need = pages_for(n_tokens, self.page_size) - len(table)
        if need > len(self.free):
            raise OutOfPages(f"request {seq} needs {need} more pages, {len(self.free)} are free: make the pool "
                             "bigger (n_pages) or admit fewer requests at once")
        if need > 0:
            table.extend(self.free.pop() for _ in range(need))
            # the slots of the new pages' places, computed once (a decode step then only reads them)
            grown = self.slots(seq, len(self.slot_rows[seq]), len(table) * self.page_size)
            self.slot_rows[seq] = torch.cat([self.slot_rows[seq], torch.as_tensor(grown, dtype=torch.long)])

    def release(self, seq: int) -> None:
        """``seq`` is done: its pages go back to the pool (their old keys are simply overwritten later)."""
        self.free.extend(reversed(self.tables.pop(seq)))
        del self.lengths[seq], self.slot_rows[seq]

    def slots(self, seq: int, start: int, end: int) -> torch.Tensor:
        """The pool slots [end - start] of ``seq``'s tokens ``start ... end - 1`` (its pages must hold them)."""
        return self.slots_fn(self.tables[seq], self.page_size, start, end)

    @property
    def pages_in_use(self) -> int:
        return self.n_pages - len(self.free)

    def view(self, seqs: Sequence[int], n_new: Sequence[int]) -> "PagedView":
        """What the model needs to run ``n_new[r]`` new tokens of each request ``seqs[r]`` (pages grown)."""
        for seq, n in zip(seqs, n_new):
            self.grow(seq, self.lengths[seq] + n)
        return PagedView(self, list(seqs), list(n_new))

    def advance(self, seqs: Sequence[int], n_new: Sequence[int]) -> None:
        """After the forward pass: the requests' new tokens are written."""
        for seq, n in zip(seqs, n_new):
            self.lengths[seq] += n


class PagedView:
    """One forward pass's cache: rows ``seqs``, ``n_new[r]`` new tokens for row r, right-aligned.

    Row r has ``L_r`` tokens in the cache and brings ``n_r`` new ones. The view lays every row
    out in S = max(L_r + n_r) columns, right-aligned (as left padding does): row r's tokens fill
    its last ``L_r + n_r`` columns, and the model's input is the last T = max(n_r) columns, row r's
    new tokens at their end (a decode step: T = 1; a batch of new prompts: T = the longest).
    ``attention_mask`` [B, S] marks the real columns; pass it to the model, which then counts each
    row's positions from it and hides the rest from attention. Only real new tokens are written.
    """

    def __init__(self, cache: PagedKVCache, seqs: list[int], n_new: list[int]):
        lengths = torch.tensor([cache.lengths[s] for s in seqs])
        news = torch.tensor(n_new)
        self.cache, self.seqs = cache, seqs
        self.n_new = int(news.max()) if seqs else 0
        self.max_len = int((lengths + news).max()) if seqs else 0
        self.pos = self.max_len - self.n_new  # the model's "tokens already in the cache"
        if self.max_len > cache.block_size:
            raise ValueError(f"a request would hold {self.max_len} tokens, more than the model's context "
                             f"({cache.block_size}): give it fewer new tokens")
        columns = torch.arange(self.max_len)
        first = self.max_len - (lengths + news)  # [B]: each row's first real column
        self.attention_mask = columns[None, :] >= first[:, None]
        key_slots = torch.zeros(len(seqs), self.max_len, dtype=torch.long)  # padding reads slot 0, masked
        for r, seq in enumerate(seqs):
            total = int(lengths[r] + news[r])
            key_slots[r, self.max_len - total:] = cache.slot_rows[seq][:total]
        is_new = columns[None, -self.n_new:] >= (self.max_len - news)[:, None] if self.n_new else None
        device = cache.k.device
        self.key_slots = key_slots.to(device)
        self.new_mask = None if is_new is None else is_new.to(device)  # [B, T]: a real new token
        self.write_slots = key_slots[:, self.max_len - self.n_new:].to(device)[self.new_mask] if self.n_new else None
        self.attention_mask = self.attention_mask.to(device)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this layer's new k, v [B, n_kv_heads, T, d] (the real ones) into the rows' pages; return
        every row's keys and values [B, n_kv_heads, S, d], gathered from its pages."""
        self.cache.k[layer, self.write_slots] = k.transpose(1, 2)[self.new_mask]
        self.cache.v[layer, self.write_slots] = v.transpose(1, 2)[self.new_mask]
        keys = self.cache.k[layer, self.key_slots]  # [B, S, H, d]
        values = self.cache.v[layer, self.key_slots]
        return keys.transpose(1, 2), values.transpose(1, 2)


def paged_cache_for(model, n_pages: int, page_size: int = 16, slots_fn=token_slots) -> PagedKVCache:
    """An empty ``PagedKVCache`` for ``model``, in its dtype, on its device."""
    param = next(model.parameters())
    return PagedKVCache(model.config, n_pages, page_size, device=param.device, dtype=param.dtype, slots_fn=slots_fn)


@torch.no_grad()
def forward_paged(model, cache: PagedKVCache, seqs: Sequence[int], tokens: Sequence[Sequence[int]]) -> torch.Tensor:
    """Run each request's new ``tokens[r]`` (one for a decode step, a whole prompt for a prefill; any
    mix of lengths) through ``model`` with the paged cache, in one forward pass; the logits [B, V]
    of each row's last new token. The cache then holds the tokens."""
    n_new = [len(t) for t in tokens]
    view = cache.view(seqs, n_new)
    ids, _ = engine.left_pad(tokens, 0, cache.k.device)  # new tokens right-aligned, as the view lays them out
    logits = model(ids, cache=view, attention_mask=view.attention_mask)[0][:, -1]
    cache.advance(seqs, n_new)
    return logits


# ---------------------------------------------------------------------------- the engine

@dataclass(eq=False)  # requests are told apart by identity: two may ask the same
class Request:
    """One generation request: a prompt, how many tokens at most, and what happened to it."""

    prompt: list[int]
    max_new_tokens: int
    arrival: float = 0.0  # seconds after the start of the trace at which it is sent
    temperature: float = 0.0  # 0: greedy
    top_k: int | None = None
    seed: int = 0  # its own generator: its tokens do not depend on the others in the batch
    output: list[int] = field(default_factory=list)
    first_token_at: float | None = None  # seconds after the start
    finished_at: float | None = None
    id: int = -1  # given by the engine
    cancelled: bool = False  # its client left: it stopped early
    generator: torch.Generator | None = field(default=None, repr=False)  # seeded with ``seed`` by the engine


class ContinuousBatcher:
    """Serve requests as they come: admit, prefill, decode together, retire, every step.

    A request is admitted when a batch row is free (``max_batch``) and the pool can hold its
    whole reply (the pages its prompt plus ``max_new_tokens`` could need, counted against
    pages promised to the requests already running), so a running request never runs out of
    pages; the pages themselves are taken one at a time as it writes.
    """

    def __init__(self, model, n_pages: int, page_size: int = 16, max_batch: int = 16,
                 stop_tokens: int | Iterable[int] | None = None, slots_fn=token_slots):
        self.model, self.max_batch = model.eval(), max_batch
        self.cache = paged_cache_for(model, n_pages, page_size, slots_fn)
        self.stop = engine._stop_set(stop_tokens)
        self.running: list[Request] = []
        self.waiting: list[Request] = []
        self.promised = 0  # pages the running requests may still need in all
        self.next_id = 0
        self.steps = 0
        self.peak_pages = 0

    def submit(self, request: Request) -> Request:
        if not request.prompt:
            raise ValueError("a request needs a prompt of at least one token")
        if len(request.prompt) + request.max_new_tokens > self.model.config.block_size:
            raise ValueError(f"prompt ({len(request.prompt)} tokens) + max_new_tokens ({request.max_new_tokens}) "
                             f"is more than the model's context ({self.model.config.block_size})")
        if self._pages_of(request) > self.cache.n_pages:
            raise ValueError(f"one request needs {self._pages_of(request)} pages, the pool has "
                             f"{self.cache.n_pages}: make the pool bigger")
        sample.check_temperature(request.temperature)
        if request.temperature > 0:
            sample.filter_logits(torch.zeros(1, 2), request.top_k, None)  # raises on a bad top_k
        request.id, self.next_id = self.next_id, self.next_id + 1
        request.generator = torch.Generator(device=self.cache.k.device).manual_seed(request.seed)
        self.waiting.append(request)
        return request

    def _pages_of(self, request: Request) -> int:
        return pages_for(len(request.prompt) + request.max_new_tokens, self.cache.page_size)

    def _choose(self, requests: list[Request], logits: torch.Tensor, now: float) -> None:
        """Each request's next token from its row of ``logits``: the greedy ones with one argmax, each
        sampled one with its own generator (so its tokens depend on nothing else in the batch)."""
        greedy = logits.argmax(dim=-1).tolist()
        for request, row, best in zip(requests, logits, greedy):
            token = best if request.temperature == 0 else int(sample.sample_next_token(
                row[None], request.temperature, request.top_k, None, request.generator)[0, 0])
            request.output.append(token)
            if request.first_token_at is None:
                request.first_token_at = now
            if token in self.stop or len(request.output) == request.max_new_tokens:
                request.finished_at = now

    def cancel(self, request: Request, now: float = 0.0) -> None:
        """Stop ``request`` (its client left): a waiting one leaves the queue, a running one gives its
        row and pages back at the next step. Nothing else changes for the other requests."""
        if request.finished_at is not None:
            return
        request.cancelled, request.finished_at = True, now
        self.waiting = [r for r in self.waiting if r is not request]

    def _retire(self) -> list[Request]:
        done = [r for r in self.running if r.finished_at is not None]
        for r in done:
            self.cache.release(r.id)
            self.promised -= self._pages_of(r)
        self.running = [r for r in self.running if r.finished_at is None]
        return done

    def step(self, now: float = 0.0) -> list[Request]:
        """One engine step at time ``now``: admit what fits, prefill it, one decode step for every
        running request; returns the requests that finished in it."""
        self.steps += 1
        admitted: list[Request] = []
        while (self.waiting and self.waiting[0].arrival <= now and len(self.running) < self.max_batch
               and self.promised + self._pages_of(self.waiting[0]) <= self.cache.n_pages):
            request = self.waiting.pop(0)
            self.promised += self._pages_of(request)
            self.cache.add(request.id)
            admitted.append(request)
        if admitted:  # the new prompts in one prefill, left-padded to the longest
            logits = forward_paged(self.model, self.cache, [r.id for r in admitted], [r.prompt for r in admitted])
            self._choose(admitted, logits, now)
            self.running += admitted
        done = self._retire()
        if self.running:
            seqs = [r.id for r in self.running]
            logits = forward_paged(self.model, self.cache, seqs, [[r.output[-1]] for r in self.running])
            self._choose(self.running, logits, now)
            self.peak_pages = max(self.peak_pages, self.cache.pages_in_use)
            done += self._retire()
        return done

    def run(self, requests: Sequence[Request], clock=time.perf_counter) -> list[Request]:
        """Serve ``requests`` (sent at their ``arrival`` times, seconds after the start) to the end."""
        for r in sorted(requests, key=lambda r: r.arrival):
            self.submit(r)
        start = clock()
        while self.waiting or self.running:
            now = clock() - start
            if not self.running and self.waiting[0].arrival > now:
                time.sleep(min(self.waiting[0].arrival - now, 0.01))  # idle until the next one is sent
                continue
            self.step(now)
        return list(requests)


def static_batches(model, requests: Sequence[Request], batch_size: int,
                   stop_tokens: int | Iterable[int] | None = None, pad_id: int = 0,
                   clock=time.perf_counter) -> list[Request]:
    """The baseline: requests in arrival order, ``batch_size`` at a time, each batch generated to
    its longest reply with ``nblib.engine.generate`` (greedy) before the next batch starts. Fills
    each request's ``output``, ``first_token_at`` (when its batch finished: a static batch
    returns all at once) and ``finished_at``."""
    ordered = sorted(requests, key=lambda r: r.arrival)
    start = clock()
    for i in range(0, len(ordered), batch_size):
        batch = ordered[i:i + batch_size]
        wait = max(r.arrival for r in batch) - (clock() - start)
        if wait > 0:
            time.sleep(wait)  # a static batch starts when its last request has arrived
        rollout = engine.generate(model, [r.prompt for r in batch], max(r.max_new_tokens for r in batch),
                                  temperature=0.0, stop_tokens=stop_tokens, pad_id=pad_id)
        now = clock() - start
        for r, tokens in zip(batch, rollout.completions(keep_stop=True)):
            r.output = tokens[:r.max_new_tokens]
            r.first_token_at = r.finished_at = now
    return list(requests)


class EngineThread:
    """The continuous-batching engine in a thread of its own, for a server: requests come from many
    threads (one per client), one thread steps the engine for all of them.

    ``submit(...)`` returns an iterator of the request's token ids, each as soon as a step chooses
    it; closing the iterator early (the client left) cancels the request, which frees its row and
    its pages at the next step. ``stats()`` says what the engine holds now.
    """

    def __init__(self, model, stop_tokens: Iterable[int], max_batch: int = 8, page_size: int = 16,
                 n_pages: int | None = None):
        block = model.config.block_size
        n_pages = max_batch * pages_for(block, page_size) if n_pages is None else n_pages
        self.batcher = ContinuousBatcher(model, n_pages, page_size, max_batch, stop_tokens=stop_tokens)
        self.stop = self.batcher.stop
        self.lock = threading.Condition()
        self.streams: dict[int, list] = {}  # request id -> [request, queue, tokens sent]
        self.closed = False
        self.tokens_out = 0  # tokens handed to readers so far
        self.thread = threading.Thread(target=self._loop, name="engine", daemon=True)
        self.thread.start()

    def submit(self, prompt: list[int], max_new_tokens: int, temperature: float = 0.0, top_k: int | None = None,
               seed: int | None = None) -> Iterator[int]:
        """The reply's token ids as they come (the stop token is not given). A bad request raises
        ``ValueError`` here, before anything runs."""
        seed = int(torch.randint(0, 2**62, ())) if seed is None else seed
        request = Request(prompt=list(prompt), max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                          seed=seed)
        tokens: queue.Queue = queue.Queue()
        with self.lock:
            if self.closed:
                raise RuntimeError("the engine is closed")
            self.batcher.submit(request)
            self.streams[request.id] = [request, tokens, 0]
            self.lock.notify()
        return self._stream(request, tokens)

    def _stream(self, request: Request, tokens: queue.Queue) -> Iterator[int]:
        try:
            while (item := tokens.get()) is not None:
                if isinstance(item, BaseException):
                    raise RuntimeError(f"the engine failed: {item}") from item
                yield item
        finally:  # the end of the reply, or its reader left: either way the request is over
            with self.lock:
                self.batcher.cancel(request)
                self.streams.pop(request.id, None)
                self.lock.notify()

    def _loop(self) -> None:
        while True:
            with self.lock:
                while not (self.batcher.waiting or self.batcher.running or self.closed):
                    self.lock.wait()
                if self.closed:
                    return
                try:
                    self.batcher.step()
                except Exception as err:  # noqa: BLE001 (every waiting reader gets it, the engine goes on)
                    for request, tokens, _ in self.streams.values():
                        self.batcher.cancel(request)
                        tokens.put(err)
                    self.streams.clear()
                    self.batcher._retire()
                    continue
                for entry in list(self.streams.values()):
                    request, tokens, sent = entry
                    for token in request.output[sent:]:
                        if token not in self.stop:
                            tokens.put(token)
                            self.tokens_out += 1
                    entry[2] = len(request.output)
                    if request.finished_at is not None:
                        tokens.put(None)
                        del self.streams[request.id]

    def stats(self) -> dict:
        with self.lock:
            b = self.batcher
            return {"running": len(b.running), "waiting": len(b.waiting), "pages_in_use": b.cache.pages_in_use,
                    "pages": b.cache.n_pages, "max_batch": b.max_batch, "steps": b.steps, "tokens_out": self.tokens_out}

    def close(self) -> None:
        with self.lock:
            self.closed = True
            for _, tokens, _ in self.streams.values():
                tokens.put(None)
            self.lock.notify()
        self.thread.join(timeout=10)
