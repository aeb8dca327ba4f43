"""The chat server (nblib.serve): streamed replies, the page, the routes, bad requests, clients that leave."""
import http.client
import inspect
import io
import json
import sys
import threading
import time
import types

import pytest
import torch

from nblib import engine, serve
from nblib.chatbpe import chat_bpe
from nblib.llama import Llama, LlamaConfig

TOK = chat_bpe()
HELLO = [{"role": "user", "content": "Hello there!"}]
MAX_NEW = 16


def tiny_model() -> Llama:
    torch.manual_seed(0)
    return Llama(LlamaConfig(vocab_size=50304, block_size=64, n_layer=1, n_head=2, n_embd=32)).eval()


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def start(server):
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture(scope="module")
def server(model):
    server = start(serve.make_server(model, TOK, port=0, max_new_tokens=MAX_NEW, quiet=True))
    yield server
    server.shutdown()
    server.server_close()


def request(server, method, path, body=None):
    """``(status, headers, body bytes)`` of one request (``body``: a dict sent as JSON, or bytes as they are)."""
    conn = http.client.HTTPConnection(*server.server_address[:2], timeout=10)
    if isinstance(body, dict):
        body = json.dumps(body).encode()
    conn.request(method, path, body=body, headers={"Content-Type": "application/json"} if body else {})
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp.status, resp.headers, data


def greedy_text(model, conversation=HELLO, max_new_tokens=MAX_NEW) -> str:
    return "".join(serve.stream_reply(model, TOK, conversation, max_new_tokens=max_new_tokens, temperature=0))


# ---------------------------------------------------------------- stream_reply

def test_greedy_stream_is_engine_generate_token_for_token(model):
    prompt = serve.prompt_ids(model, TOK, HELLO, MAX_NEW)
    ours = list(serve.reply_tokens(model, TOK, prompt, MAX_NEW, temperature=0))
    out = engine.generate(model, [prompt], MAX_NEW, temperature=0, stop_tokens=[TOK.end_id], pad_id=TOK.pad_id)
    theirs = out.completions()[0]
    cut = next((i for i, t in enumerate(theirs) if TOK.is_special(t)), len(theirs))  # any special token ends a reply
    assert ours == theirs[:cut] and len(ours) > 1
    assert greedy_text(model) == TOK.decode(theirs[:cut])


def test_seeded_sampling_repeats_and_matches_engine_generate(model):
    kwargs = {"max_new_tokens": MAX_NEW, "temperature": 1.0, "top_k": 50}
    a = list(serve.stream_reply(model, TOK, HELLO, seed=3, **kwargs))
    assert a == list(serve.stream_reply(model, TOK, HELLO, seed=3, **kwargs))
    assert a != list(serve.stream_reply(model, TOK, HELLO, seed=4, **kwargs))
    prompt = serve.prompt_ids(model, TOK, HELLO, MAX_NEW)
    out = engine.generate(model, [prompt], MAX_NEW, temperature=1.0, top_k=50, stop_tokens=[TOK.end_id],
                          pad_id=TOK.pad_id, generator=torch.Generator().manual_seed(3))
    ids = out.completions()[0]
    cut = next((i for i, t in enumerate(ids) if TOK.is_special(t)), len(ids))
    assert "".join(a) == TOK.decode(ids[:cut])


def test_pieces_hold_back_half_a_character():
    ids = TOK.encode("a🙂b日本")
    assert TOK.decode(ids[:2]).endswith("\ufffd")  # the emoji is two tokens: its first half alone is U+FFFD
    pieces = list(serve.decode_pieces(ids, TOK))
    assert "".join(pieces) == "a🙂b日本"
    assert not any("\ufffd" in p for p in pieces) and "🙂" in pieces
    # bytes that never complete a character still come out, at the end
    assert "".join(serve.decode_pieces(ids[:2], TOK)) == TOK.decode(ids[:2])


def test_bad_arguments_are_refused_before_any_token(model):
    with pytest.raises(ValueError, match="temperature must be a finite number >= 0.*-1"):
        serve.stream_reply(model, TOK, HELLO, temperature=-1)
    with pytest.raises(ValueError, match="top_k must be .*>= 1.*0"):
        serve.stream_reply(model, TOK, HELLO, top_k=0)
    with pytest.raises(ValueError, match="max_new_tokens=64 must be between 1"):
        serve.stream_reply(model, TOK, HELLO, max_new_tokens=64)
    with pytest.raises(ValueError, match="the last message must be the user's"):
        serve.stream_reply(model, TOK, HELLO + [{"role": "assistant", "content": "Hi"}], max_new_tokens=8)
    long = [{"role": "user", "content": "word " * 200}]
    with pytest.raises(ValueError, match=r"the conversation is \d+ tokens; the model reads at most 48: start a new"):
        serve.stream_reply(model, TOK, long, max_new_tokens=MAX_NEW)


def test_a_long_conversation_keeps_its_latest_turns(model):
    old = [{"role": "user", "content": "word " * 40}, {"role": "assistant", "content": "ok"}]
    prompt = serve.prompt_ids(model, TOK, old + HELLO, MAX_NEW)
    assert prompt == serve.prompt_ids(model, TOK, HELLO, MAX_NEW)


# ---------------------------------------------------------------- the server

def test_page_has_the_controls_and_no_external_resources(server):
    status, headers, body = request(server, "GET", "/")
    page = body.decode("utf-8")
    assert status == 200 and headers["Content-Type"] == "text/html; charset=utf-8"
    for control in ('id="input"', 'id="send"', 'id="temperature"', 'max="2"', 'value="0.8"', 'id="top_k"',
                    'max="200"', 'value="50"', 'id="new"', "getReader()", '"/chat"'):
        assert control in page
    assert "http://" not in page and "https://" not in page


def test_health_and_unknown_paths(server, model):
    status, _, body = request(server, "GET", "/health")
    assert status == 200
    health = json.loads(body)
    assert health["ok"] and health["model"] == {"params": sum(p.numel() for p in model.parameters()),
                                                "block_size": 64, "batching": "continuous"}
    assert health["engine"]["max_batch"] == 8 and health["engine"]["running"] == 0
    status, _, body = request(server, "GET", "/nope")
    assert status == 404 and "/nope" in json.loads(body)["error"]
    status, _, body = request(server, "POST", "/", {"messages": HELLO})
    assert status == 404 and "/chat" in json.loads(body)["error"]


def test_chat_streams_the_greedy_reply_in_chunks(server, model):
    conn = http.client.HTTPConnection(*server.server_address[:2], timeout=10)
    conn.request("POST", "/chat", body=json.dumps({"messages": HELLO, "temperature": 0, "top_k": 50}))
    resp = conn.getresponse()
    assert resp.status == 200 and resp.headers["Transfer-Encoding"] == "chunked"
    assert resp.headers["Content-Type"] == "text/plain; charset=utf-8"
    chunks = []
    while chunk := resp.read1():  # read1 returns at most one chunk of a chunked response
        chunks.append(chunk)
    conn.close()
    assert len(chunks) > 1
    assert b"".join(chunks).decode("utf-8") == greedy_text(model)


def test_keep_alive_serves_several_requests_on_one_connection(server, model):
    conn = http.client.HTTPConnection(*server.server_address[:2], timeout=10)
    for _ in range(2):
        conn.request("POST", "/chat", body=json.dumps({"messages": HELLO, "temperature": 0, "max_new_tokens": 4}))
        assert conn.getresponse().read().decode() == greedy_text(model, max_new_tokens=4)
    conn.request("GET", "/health")
    assert conn.getresponse().status == 200
    conn.close()


@pytest.mark.parametrize("body, words", [
    (b"{not json", "not JSON"),
    ({"messages": []}, "messages is missing or empty"),
    ({"temperature": 0.5}, "messages is missing or empty"),
    ({"messages": HELLO + [{"role": "assistant", "content": "Hi"}]}, "the last message must be the user's"),
    ({"messages": [{"role": "system", "content": "Be nice"}] + HELLO}, "use 'user' or 'assistant'"),
    ({"messages": [{"role": "user"}]}, "must be {\"role\""),
    ({"messages": HELLO, "temperature": -1}, "temperature must be a finite number >= 0"),
    ({"messages": HELLO, "temperature": "hot"}, "temperature must be a number"),
    ({"messages": HELLO, "top_k": 0}, "top_k must be a whole number >= 1"),
    ({"messages": HELLO, "max_new_tokens": 500}, "max_new_tokens must be a whole number from 1 to 16"),
    ({"messages": [{"role": "user", "content": "word " * 200}]}, "start a new conversation or shorten the message"),
])
def test_bad_requests_are_400_with_a_useful_error(server, body, words):
    status, headers, data = request(server, "POST", "/chat", body)
    assert status == 400 and headers["Content-Type"] == "application/json"
    assert words in json.loads(data)["error"]


class SlowModel(torch.nn.Module):
    """The tiny model, 20 ms slower per forward pass, counting its passes: a reply that takes a while."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.config, self.calls = inner, inner.config, 0

    def forward(self, *args, **kwargs):
        self.calls += 1
        time.sleep(0.02)
        return self.inner(*args, **kwargs)


def engine_idle(server, timeout=5.0) -> bool:
    """The engine has no request running and every page back in its pool (within ``timeout`` seconds)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        stats = server.engine.stats()
        if stats["running"] == 0 and stats["pages_in_use"] == 0:
            return True
        time.sleep(0.02)
    return False


@pytest.mark.parametrize("max_batch", [1, 8], ids=["one at a time", "continuous batching"])
def test_a_client_that_leaves_stops_its_reply_and_frees_its_place(model, max_batch):
    max_new = 40
    prompt = serve.prompt_ids(model, TOK, HELLO, max_new)
    assert len(list(serve.reply_tokens(model, TOK, prompt, max_new))) == max_new  # no early end on its own
    slow = SlowModel(model)
    server = start(serve.make_server(slow, TOK, port=0, max_new_tokens=max_new, quiet=True, max_batch=max_batch))
    try:
        conn = http.client.HTTPConnection(*server.server_address[:2], timeout=10)
        conn.request("POST", "/chat", body=json.dumps({"messages": HELLO, "temperature": 0}))
        resp = conn.getresponse()
        assert resp.status == 200 and resp.read1()
        conn.close()  # in the middle of the reply
        if max_batch == 1:
            assert server.lock.acquire(timeout=5)  # the generation stopped and let go of the lock ...
            server.lock.release()
        else:
            assert engine_idle(server)  # ... or gave its row and its pages back to the engine ...
        assert slow.calls < max_new  # ... well before the end of the reply
        status, _, body = request(server, "POST", "/chat", {"messages": HELLO, "temperature": 0, "max_new_tokens": 3})
        assert status == 200 and body.decode() == greedy_text(model, max_new_tokens=3)
    finally:
        server.shutdown()
        server.server_close()


# ---------------------------------------------------------------- the command line

def test_main_without_a_checkpoint_is_one_clear_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        serve.main(["--run", str(tmp_path)])
    assert exit_.value.code == 1
    err = capsys.readouterr().err
    assert err.strip() == f"no checkpoint in {tmp_path}: pass the folder of a finished stage, e.g. runs/chat-sft"


def test_main_terminal_loads_the_run_and_chats(tmp_path, monkeypatch, capsys, model):
    (tmp_path / "ckpt.safetensors").touch()
    loaded = []
    fake = types.SimpleNamespace(load_run=lambda run, device: loaded.append((run, device)) or (model, TOK))
    monkeypatch.setitem(sys.modules, "nblib.stages", fake)  # the real loader reads a finished stage's folder
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello there!\n\n"))
    serve.main(["--run", str(tmp_path), "--terminal"])
    assert loaded == [(tmp_path, "cpu")]
    out = capsys.readouterr().out
    assert "you: model: " in out


def test_loopback_by_default_and_a_warning_otherwise(server):
    assert inspect.signature(serve.make_server).parameters["host"].default == "127.0.0.1"
    assert server.server_address[0] == "127.0.0.1"
    assert serve.parse_args(["--run", "x"]).host == "127.0.0.1" and serve.parse_args(["--run", "x"]).port == 8000
    for host in ("127.0.0.1", "localhost", "::1"):
        assert serve.host_warning(host) is None
    assert "anyone on the network" in serve.host_warning("0.0.0.0")


def test_make_server_refuses_a_reply_longer_than_the_context(model):
    with pytest.raises(ValueError, match="max_new_tokens=200 must be between 1 and the model's block_size=64"):
        serve.make_server(model, TOK, port=0, max_new_tokens=200)
    server = serve.make_server(model, TOK, port=0)   # the default fits: half the context of a small model
    assert server.max_new_tokens == 32
    server.server_close()


def test_a_load_test_of_concurrent_clients_loses_nothing(model):
    """Four clients for two seconds, every third request hanging up after its first piece: every
    reply completes, nothing fails, and the engine ends with no request and no page held."""
    server = start(serve.make_server(model, TOK, port=0, max_new_tokens=MAX_NEW, quiet=True, max_batch=4))
    try:
        result = serve.load_test(server, clients=4, seconds=2.0, max_new_tokens=MAX_NEW, leave_every=3)
        assert not result["errors"], result["errors"]
        assert result["replies"] >= 4 and result["left_early"] >= 1 and result["tokens"] > 0
        assert result["engine"]["running"] == 0 and result["engine"]["pages_in_use"] == 0
        assert 0 < result["p50 s"] <= result["p99 s"]
    finally:
        server.shutdown()
        server.server_close()


def test_replies_served_together_are_each_the_reply_alone(model):
    """Greedy replies to different conversations, sent at once, equal stream_reply's one at a time."""
    server = start(serve.make_server(model, TOK, port=0, max_new_tokens=MAX_NEW, quiet=True, max_batch=4))
    conversations = [[{"role": "user", "content": f"Question number {i}, please?"}] for i in range(6)]
    got = [None] * len(conversations)

    def ask(i):
        got[i] = request(server, "POST", "/chat", {"messages": conversations[i], "temperature": 0})[2].decode()
    try:
        threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(conversations))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert got == [greedy_text(model, c) for c in conversations]
        assert engine_idle(server)
    finally:
        server.shutdown()
        server.server_close()
