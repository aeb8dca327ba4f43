"""Talk to your own chat model: a small web chat that streams its tokens, or a terminal chat (lesson 15).

::

    python -m nblib.serve --run runs/chat-sft             # http://127.0.0.1:8000 in a browser
    python -m nblib.serve --run runs/chat-sft --terminal  # the same model in the terminal

The server is the standard library's ``http.server`` (a ``ThreadingHTTPServer``) and
nothing else: there is nothing to install, it works offline and in Colab (forward the port,
e.g. ``google.colab.output.serve_kernel_port_as_window(8000)``), and the whole server reads
top to bottom in this one file. Streaming is plain chunked HTTP: the reply's text pieces go
out as ``Transfer-Encoding: chunked`` chunks, each flushed as soon as the model writes it,
and the page reads them with ``fetch`` and ``response.body.getReader()``.

- ``stream_reply(model, tokenizer, conversation, ...)``: the assistant's reply as text
  pieces, token by token, with the KV cache (``nblib.engine``'s ``prefill`` once, then one
  ``decode_step`` per token), sampled by ``nblib.sample.sample_next_token``.
- ``make_server(model, tokenizer, host, port)``: the server, not started. ``GET /`` is the
  page, ``POST /chat`` streams a reply to ``{"messages": [...], "temperature", "top_k"}``,
  ``GET /health`` describes the model.
- ``main()``: the command line.

The page keeps the conversation and sends all of it with every message; the server keeps
nothing between requests, and the prompt keeps the latest turns that fit the context
(``nblib.chat._fit``). Replies are generated together by lesson 16's continuous-batching
engine (``nblib.paged.EngineThread``: one thread steps the model for every client, a client
that leaves frees its row at once); ``--max-batch 1`` goes back to one reply at a time behind
a lock. ``load_test`` measures the server under N concurrent local clients. By default the
server listens on 127.0.0.1, so only this machine can reach it.
"""
from __future__ import annotations

import argparse
import http.client
import ipaddress
import itertools
import json
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import closing, nullcontext
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import torch

from nblib import engine, paged, sample
from nblib.chat import ROLES, _fit, chat, render_prompt
from nblib.kvcache import new_cache

MAX_BODY = 1_000_000  # bytes: a conversation longer than any context, and no more


# ---------------------------------------------------------------------------- the reply, piece by piece

def check_messages(messages) -> list[dict]:
    """``messages`` if it is a conversation the model can answer, else a ``ValueError`` that says what to send."""
    if not isinstance(messages, list) or not messages:
        raise ValueError('messages is missing or empty: send a list of messages, e.g. '
                         '[{"role": "user", "content": "Hi!"}]')
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise ValueError(f'message {i} must be {{"role": "user" or "assistant", "content": a string}}, '
                             f"got {message!r:.80}")
        if message.get("role") not in ROLES:
            raise ValueError(f"message {i} has role {message.get('role')!r}: use 'user' or 'assistant'")
    if messages[-1]["role"] != "user":
        raise ValueError("the last message must be the user's: the model answers it (send the conversation "
                         "up to your new message)")
    return messages


def check_sampling(temperature, top_k) -> None:
    """Refuse a temperature or top-k that ``sample_next_token`` would refuse, before any token is generated."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise ValueError(f"temperature must be a number (0 answers greedily), got {temperature!r}")
    sample.check_temperature(temperature)
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be a whole number >= 1 (how many likely tokens to sample among) "
                         f"or null for all, got {top_k!r}")


def prompt_ids(model, tokenizer, conversation: list[dict], max_new_tokens: int) -> list[int]:
    """The prompt for the reply: the latest turns that leave room for ``max_new_tokens`` new tokens."""
    block = model.config.block_size
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or not 0 < max_new_tokens < block:
        raise ValueError(f"max_new_tokens={max_new_tokens!r} must be between 1 and the model's "
                         f"block_size={block} - 1")
    room = block - max_new_tokens
    if len(render_prompt(conversation[-1:], tokenizer)) > room:  # _fit can drop every turn but the last one
        n = len(render_prompt(conversation, tokenizer))
        raise ValueError(f"the conversation is {n} tokens; the model reads at most {room}: start a new "
                         "conversation or shorten the message")
    return render_prompt(_fit(conversation, tokenizer, room), tokenizer)


def stream_reply(model, tokenizer, conversation: list[dict], *, max_new_tokens: int = 200,
                 temperature: float = 0.8, top_k: int | None = 50, seed: int | None = None) -> Iterator[str]:
    """The assistant's reply to ``conversation`` as text pieces, one per token as it is generated.

    The arguments are checked now (a ``ValueError`` that says what to change), the tokens
    come as the pieces are read: a server can refuse a bad request before it answers 200,
    then stream. The reply ends at ``<|end|>`` (or any special token) or after
    ``max_new_tokens``. ``temperature=0`` is greedy; ``seed`` makes sampling repeatable
    (None: the global RNG).
    """
    check_messages(conversation)
    check_sampling(temperature, top_k)
    prompt = prompt_ids(model, tokenizer, conversation, max_new_tokens)
    return decode_pieces(reply_tokens(model, tokenizer, prompt, max_new_tokens, temperature, top_k, seed), tokenizer)


def reply_tokens(model, tokenizer, prompt: list[int], max_new_tokens: int, temperature: float = 0.0,
                 top_k: int | None = None, seed: int | None = None) -> Iterator[int]:
    """The reply's token ids, one at a time: prefill the prompt once, then one decode step per token.

    It makes the calls ``engine.generate`` makes for one prompt (the same attention mask,
    one draw per step from the same generator), so it picks the same tokens; unlike
    ``generate`` it hands each one over as soon as it is chosen. The stop token is not
    yielded: any special token ends the reply, as does an id past the tokenizer's
    vocabulary (one of the padded rows a model has but a tokenizer never writes).
    """
    device = next(model.parameters()).device
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    cache = new_cache(model, 1, len(prompt) + max_new_tokens)
    mask = torch.ones(1, len(prompt) + max_new_tokens, dtype=torch.bool, device=device)
    was_training = model.training
    model.eval()
    try:
        logits = engine.prefill(model, torch.tensor([prompt], device=device), mask[:, :len(prompt)], cache)
        for step in range(max_new_tokens):
            token = int(sample.sample_next_token(logits, temperature, top_k, None, generator)[0, 0])
            if token >= tokenizer.vocab_size or tokenizer.is_special(token):
                return
            yield token
            if step + 1 < max_new_tokens:
                tokens = torch.tensor([token], device=device)
                logits = engine.decode_step(model, tokens, mask[:, :len(prompt) + step + 1], cache)
    finally:
        model.train(was_training)


def decode_pieces(ids: Iterable[int], tokenizer) -> Iterator[str]:
    """The text of ``ids`` as it grows: after each id, the characters that are new.

    A BPE token is a few bytes, and a character can span two tokens (an emoji, most CJK
    characters): decoded alone, its first half is U+FFFD. So each step decodes all the ids
    so far and holds back a trailing U+FFFD until the next tokens complete the character;
    whatever is still held at the end (bytes that never became a character) comes last.
    """
    seen: list[int] = []
    sent = 0
    for i in ids:
        seen.append(int(i))
        text = tokenizer.decode(seen)
        ready = len(text.rstrip("\ufffd"))
        if ready > sent:
            yield text[sent:ready]
            sent = ready
    if seen:
        text = tokenizer.decode(seen)
        if len(text) > sent:
            yield text[sent:]


# ---------------------------------------------------------------------------- the server

class ChatServer(ThreadingHTTPServer):
    """A ``ThreadingHTTPServer`` that holds the model, its tokenizer, and either the continuous-batching
    engine (lesson 16: every client's reply in one batch) or the lock around one reply at a time."""

    daemon_threads = True  # a request still streaming does not keep Ctrl-C from ending the program

    def __init__(self, address, model, tokenizer, max_new_tokens: int, quiet: bool,
                 engine_thread: paged.EngineThread | None = None):
        super().__init__(address, ChatHandler)
        self.model, self.tokenizer = model, tokenizer
        self.max_new_tokens, self.quiet = max_new_tokens, quiet
        self.lock = threading.Lock()
        self.engine = engine_thread
        self.tokens_out = 0  # tokens streamed to clients so far (a load test reads it from /health)
        self.info = {"params": sum(p.numel() for p in model.parameters()), "block_size": model.config.block_size,
                     "batching": "continuous" if engine_thread else "one reply at a time"}

    def counted(self, tokens: Iterator[int]) -> Iterator[int]:
        for token in tokens:
            with self.lock if self.engine is not None else nullcontext():  # the lock is held already otherwise
                self.tokens_out += 1
            yield token

    def server_close(self):
        super().server_close()
        if self.engine is not None:
            self.engine.close()

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"


class ChatHandler(BaseHTTPRequestHandler):
    """The routes: ``GET /`` (the page), ``POST /chat`` (a streamed reply), ``GET /health``; else 404."""

    protocol_version = "HTTP/1.1"  # chunked transfer encoding is HTTP/1.1's
    server: ChatServer

    def do_GET(self):
        path = urlsplit(self.path).path
        if path == "/":
            self._send(200, "text/html; charset=utf-8", PAGE.encode("utf-8"))
        elif path == "/health":
            engine_stats = self.server.engine.stats() if self.server.engine else None
            self._send_json(200, {"ok": True, "model": self.server.info, "tokens_out": self.server.tokens_out,
                                  "engine": engine_stats})
        else:
            self._send_json(404, {"error": f"no page {path}: the chat is at /, replies come from POST /chat"})

    def do_POST(self):
        path = urlsplit(self.path).path
        if path != "/chat":
            self._send_json(404, {"error": f"nothing to POST to at {path}: send conversations to /chat"})
            return
        try:  # everything a request can get wrong is refused here, before the lock and before a 200
            pieces = self._reply(**self._chat_request())
        except ValueError as err:
            self._send_json(400, {"error": str(err)})
            return
        with (self.server.lock if self.server.engine is None else nullcontext()), closing(pieces):  # closing: the generator stops now, not when garbage-collected
            try:  # the prefill and the first token, so that a failing model is a 500, not a broken 200
                first = next(pieces, None)
            except Exception as err:
                self.log_error("the model failed: %r", err)
                self._send_json(500, {"error": f"the model failed: {err}"})
                return
            self._stream(itertools.chain([] if first is None else [first], pieces))

    def _reply(self, conversation, max_new_tokens, temperature, top_k) -> Iterator[str]:
        """The reply's text pieces: from the engine thread, or generated here (behind the lock) with
        ``reply_tokens``. Closing them stops the reply (the engine frees the request's row and pages)."""
        check_messages(conversation)
        check_sampling(temperature, top_k)
        server = self.server
        prompt = prompt_ids(server.model, server.tokenizer, conversation, max_new_tokens)
        if server.engine is not None:
            tokens = server.engine.submit(prompt, max_new_tokens, temperature, top_k)
        else:
            tokens = reply_tokens(server.model, server.tokenizer, prompt, max_new_tokens, temperature, top_k)

        def pieces():
            with closing(tokens):
                yield from decode_pieces(server.counted(tokens), server.tokenizer)
        return pieces()

    def _chat_request(self) -> dict:
        """The arguments of ``stream_reply`` from the request's JSON body, or a ``ValueError`` saying what is wrong."""
        length = self.headers.get("Content-Length", "")
        if not length.isdigit() or not 0 < int(length) <= MAX_BODY:
            self.close_connection = True  # the body (if any) is not read, so the connection cannot be reused
            raise ValueError(f"send a JSON body of 1 to {MAX_BODY:,} bytes with its Content-Length "
                             f"(got Content-Length {length or 'none'})")
        length = int(length)
        try:
            body = json.loads(self.rfile.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f'the body is not JSON ({err}): send {{"messages": [{{"role": "user", '
                             f'"content": "Hi!"}}], "temperature": 0.8, "top_k": 50}}') from None
        if not isinstance(body, dict):
            raise ValueError('the body must be a JSON object: {"messages": [...], "temperature": ..., "top_k": ...}')
        limit = self.server.max_new_tokens
        max_new = body.get("max_new_tokens", limit)
        if isinstance(max_new, bool) or not isinstance(max_new, int) or not 0 < max_new <= limit:
            raise ValueError(f"max_new_tokens must be a whole number from 1 to {limit} (this server's "
                             f"--max-new-tokens), got {max_new!r}")
        return {"conversation": body.get("messages"), "max_new_tokens": max_new,
                "temperature": body.get("temperature", 0.8), "top_k": body.get("top_k", 50)}

    def _stream(self, pieces: Iterator[str]) -> None:
        """Send each piece as one chunk, flushed at once; a client that leaves stops the generation.

        A chunk is its length in hex, CRLF, the bytes, CRLF; an empty chunk ends the reply.
        """
        try:
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.send_header("Transfer-Encoding", "chunked")
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            for piece in pieces:
                data = piece.encode("utf-8")
                self.wfile.write(b"%X\r\n%s\r\n" % (len(data), data))
                self.wfile.flush()
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
            self.log_message("the client left; its reply stopped")

    def _send(self, status: int, content_type: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _send_json(self, status: int, obj: dict) -> None:
        self._send(status, "application/json", json.dumps(obj).encode("utf-8"))

    def log_message(self, format, *args):
        """One short line per request (the default adds the date and the client's address), none when quiet."""
        if not self.server.quiet:
            print(f"  {format % args}", file=sys.stderr)


def make_server(model, tokenizer, host: str = "127.0.0.1", port: int = 8000, *, max_new_tokens: int | None = None,
                quiet: bool = False, max_batch: int = 8) -> ChatServer:
    """A chat server for ``model``, bound but not started: run its ``serve_forever()`` (in a thread, or as the
    main loop) and ``server_close()`` it after. ``port=0`` takes a free port (``server.server_address``).

    ``max_batch`` > 1 serves up to that many replies at once with lesson 16's continuous batching
    (``nblib.paged.EngineThread``); 1 serves one reply at a time (lesson 15's way, a lock around
    ``stream_reply``).

    ``max_new_tokens`` is the longest reply, and the most a request may ask for; it must
    leave room for a prompt in the model's context (None: 200, or half the context if that is less).
    """
    block = model.config.block_size
    if max_new_tokens is None:
        max_new_tokens = min(200, block // 2)
    if not 0 < max_new_tokens < block:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be between 1 and the model's block_size={block} - 1 "
                         f"(about {block // 2} leaves half the context to the conversation)")
    model.eval()
    engine_thread = None
    if max_batch > 1:
        stops = [t for t in range(model.config.vocab_size) if t >= tokenizer.vocab_size or tokenizer.is_special(t)]
        engine_thread = paged.EngineThread(model, stops, max_batch=max_batch)
    try:
        return ChatServer((host, port), model, tokenizer, max_new_tokens, quiet, engine_thread)
    except OSError:
        if engine_thread is not None:
            engine_thread.close()
        raise


def host_warning(host: str) -> str | None:
    """A warning when ``host`` is not loopback: every machine that can reach this one can then use the model."""
    if host == "localhost":
        return None
    try:
        if ipaddress.ip_address(host).is_loopback:
            return None
    except ValueError:
        pass  # a host name
    return (f"warning: listening on {host}: anyone on the network who can reach this machine can use the model "
            "(there is no password); use --host 127.0.0.1 to keep it to this machine")


# ---------------------------------------------------------------------------- a load test

def _chat_once(host: str, port: int, body: dict, leave_early: bool = False) -> tuple[float, int]:
    """POST one conversation and read the whole reply: (seconds, characters). ``leave_early``: read one
    piece and hang up, as a closed browser tab does."""
    conn = http.client.HTTPConnection(host, port, timeout=120)
    try:
        t0 = time.perf_counter()
        conn.request("POST", "/chat", body=json.dumps(body), headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        if response.status != 200:
            raise RuntimeError(f"the server answered {response.status}: {response.read()[:300]!r}")
        text = response.read(1) if leave_early else response.read()
        return time.perf_counter() - t0, len(text.decode("utf-8", errors="replace"))
    finally:
        conn.close()


def health(host: str, port: int) -> dict:
    conn = http.client.HTTPConnection(host, port, timeout=30)
    try:
        conn.request("GET", "/health")
        return json.loads(conn.getresponse().read())
    finally:
        conn.close()


def load_test(server: ChatServer, clients: int = 4, seconds: float = 10.0, max_new_tokens: int = 32,
              leave_every: int = 5) -> dict:
    """``clients`` local clients chat with a running ``server`` for ``seconds`` (each sends its next
    conversation as soon as a reply ends; every ``leave_every``-th request of a client hangs up after
    its first piece). Returns replies, tokens/s (counted by the engine), latency p50/p99 of whole
    replies, the requests left early, and the engine's state once all clients are done."""
    host, port = server.server_address[:2]
    before = health(host, port)["tokens_out"]
    latencies: list[float] = []
    left = [0]
    errors: list[str] = []
    done_at = time.perf_counter() + seconds
    guard = threading.Lock()

    def client(c: int):
        for n in itertools.count():
            if time.perf_counter() >= done_at:
                return
            body = {"messages": [{"role": "user", "content": f"Hello! Tell me about the number {c * 100 + n}."}],
                    "temperature": 0.8, "top_k": 50, "max_new_tokens": max_new_tokens}
            leave = leave_every > 0 and n % leave_every == leave_every - 1
            try:
                took, _ = _chat_once(host, port, body, leave_early=leave)
            except (OSError, RuntimeError, http.client.HTTPException) as err:
                with guard:
                    errors.append(str(err))
                return
            with guard:
                if leave:
                    left[0] += 1
                else:
                    latencies.append(took)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    tokens = health(host, port)["tokens_out"] - before
    after = health(host, port).get("engine") or {}
    for _ in range(100):  # the engine retires the last requests (and those whose client left) at its next step
        if not after or (after["running"] == 0 and after["pages_in_use"] == 0):
            break
        time.sleep(0.05)
        after = health(host, port).get("engine") or {}
    latencies.sort()
    return {"clients": clients, "seconds": wall, "replies": len(latencies), "left_early": left[0],
            "errors": errors, "tokens": tokens, "tokens/s": tokens / wall,
            "p50 s": latencies[len(latencies) // 2] if latencies else float("nan"),
            "p99 s": latencies[int(0.99 * (len(latencies) - 1))] if latencies else float("nan"), "engine": after}


# ---------------------------------------------------------------------------- the command line

def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m nblib.serve",
                                     description="Chat with a trained model in the browser (or --terminal).")
    parser.add_argument("--run", required=True, help="the folder of a finished stage, e.g. runs/chat-sft")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 takes a free one)")
    parser.add_argument("--device", default="cpu", help="where the model runs: cpu, cuda, mps (default cpu)")
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help="longest reply in tokens (default 200, or half the model's context if that is less)")
    parser.add_argument("--max-batch", type=int, default=8,
                        help="replies generated at once, by continuous batching (default 8; 1: one at a time)")
    parser.add_argument("--terminal", action="store_true", help="chat in the terminal instead of a browser")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    run = Path(args.run)
    if not (run / "ckpt.safetensors").is_file():
        print(f"no checkpoint in {run}: pass the folder of a finished stage, e.g. runs/chat-sft", file=sys.stderr)
        raise SystemExit(1)
    from nblib.stages import load_run  # here, so that importing nblib.serve loads no training code

    try:
        model, tokenizer = load_run(run, device=args.device)
    except (OSError, ValueError) as err:  # e.g. a base model's checkpoint, that never learned to chat
        print(f"cannot load {run}: {err}", file=sys.stderr)
        raise SystemExit(1)
    max_new = args.max_new_tokens or min(200, model.config.block_size // 2)
    if args.terminal:
        chat(model, tokenizer, interactive=True, max_new_tokens=max_new, temperature=0.8, top_k=50)
        return
    try:
        server = make_server(model, tokenizer, args.host, args.port, max_new_tokens=max_new, max_batch=args.max_batch)
    except (ValueError, OSError) as err:  # e.g. the port is taken
        print(f"cannot serve on {args.host}:{args.port}: {err}", file=sys.stderr)
        raise SystemExit(1)
    warning = host_warning(args.host)
    if warning:
        print(warning, file=sys.stderr)
    print(f"serving {run} on {server.url} (Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("stopped")
    finally:
        server.server_close()


# ---------------------------------------------------------------------------- the page

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Chat with your model</title>
<style>
  body { font-family: system-ui, sans-serif; max-width: 46rem; margin: 0 auto; padding: 1rem;
         display: flex; flex-direction: column; height: 100vh; box-sizing: border-box; }
  #messages { flex: 1; overflow-y: auto; padding: .5rem 0; }
  .msg { white-space: pre-wrap; padding: .5rem .75rem; margin: .4rem 0; border-radius: .6rem; max-width: 85%; }
  .user { background: #dbeafe; margin-left: auto; }
  .assistant { background: #f3f4f6; }
  .error { background: #fee2e2; color: #991b1b; }
  form { display: flex; gap: .5rem; }
  textarea { flex: 1; font: inherit; padding: .5rem; resize: vertical; }
  .controls { display: flex; gap: 1rem; align-items: center; margin-top: .5rem; font-size: .9rem; }
  .controls input { width: 4.5rem; }
</style>
</head>
<body>
<h1>Chat with your model</h1>
<div id="messages"></div>
<form id="form">
  <textarea id="input" rows="2" placeholder="Your message (Enter sends, Shift+Enter is a new line)"></textarea>
  <button id="send" type="submit">Send</button>
</form>
<div class="controls">
  <label>temperature <input id="temperature" type="number" min="0" max="2" step="0.1" value="0.8"></label>
  <label>top-k <input id="top_k" type="number" min="1" max="200" step="1" value="50"></label>
  <button id="new" type="button">New chat</button>
</div>
<script>
// The conversation lives here; every message sends all of it (the server keeps nothing).
let conversation = [];
const $ = (id) => document.getElementById(id);

function bubble(cls, text) {
  const div = document.createElement("div");
  div.className = "msg " + cls;
  div.textContent = text;
  $("messages").appendChild(div);
  div.scrollIntoView();
  return div;
}

async function send(text) {
  conversation.push({role: "user", content: text});
  bubble("user", text);
  const reply = bubble("assistant", "");
  $("send").disabled = $("new").disabled = true;
  try {
    const response = await fetch("/chat", {
      method: "POST",
      headers: {"Content-Type": "application/json"},
      body: JSON.stringify({messages: conversation, temperature: parseFloat($("temperature").value),
                            top_k: parseInt($("top_k").value, 10)}),
    });
    if (!response.ok) {
      const body = await response.json().catch(() => ({error: response.statusText}));
      throw new Error(body.error);
    }
    // The reply arrives in pieces (chunked HTTP): show each one as it comes.
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    for (;;) {
      const {done, value} = await reader.read();
      if (done) break;
      reply.textContent += decoder.decode(value, {stream: true});
      reply.scrollIntoView();
    }
    conversation.push({role: "assistant", content: reply.textContent});
  } catch (err) {
    conversation.pop();  // the message was not answered: leave it out of the conversation
    reply.remove();
    bubble("error", "Error: " + err.message);
    $("input").value = text;
  } finally {
    $("send").disabled = $("new").disabled = false;
    $("input").focus();
  }
}

$("form").addEventListener("submit", (event) => {
  event.preventDefault();
  const text = $("input").value;
  if (!text.trim() || $("send").disabled) return;
  $("input").value = "";
  send(text);
});
$("input").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey) {
    event.preventDefault();
    $("form").requestSubmit();
  }
});
$("new").addEventListener("click", () => {
  conversation = [];
  $("messages").textContent = "";
  $("input").focus();
});
</script>
</body>
</html>
"""


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # while the model loads; once it serves, main stops cleanly itself
        sys.exit("interrupted")
    except (OSError, ValueError, ImportError, RuntimeError) as err:  # what a user can fix: one line, no traceback
        sys.exit(f"error: {err}")
