"""The chat page's own JavaScript, run by Node.js against a live server: it posts the conversation,
reads the streamed reply into the assistant's bubble, keeps both turns, and shows a server error.

The page's script runs as it would in a browser, with a small stand-in for the few DOM calls it
makes (getElementById, createElement, textContent, events) and Node's fetch (the same streaming
``response.body.getReader()`` as a browser's). Skipped where Node.js is not installed; a real
browser (Playwright with Chromium) is documented as a command in lesson 15's notes."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import threading

import pytest
import torch

from nblib import llama, serve
from nblib.chatbpe import chat_bpe

NODE = shutil.which("node")

DOM = r"""
const elements = {};
class Element {
  constructor(id) { this.id = id; this.children = []; this.value = ""; this.disabled = false; this.listeners = {};
                    this._text = ""; this.className = ""; }
  get textContent() { return this.children.length ? this.children.map(c => c.textContent).join("") : this._text; }
  set textContent(t) { this._text = t; this.children = []; }
  appendChild(child) { this.children.push(child); child.parent = this; return child; }
  remove() { if (this.parent) this.parent.children = this.parent.children.filter(c => c !== this); }
  scrollIntoView() {}
  focus() {}
  addEventListener(kind, fn) { this.listeners[kind] = fn; }
  requestSubmit() { this.listeners.submit({preventDefault() {}}); }
}
globalThis.document = {
  getElementById: (id) => elements[id] || (elements[id] = new Element(id)),
  createElement: () => new Element(null),
};
const base = process.argv[2];
const realFetch = globalThis.fetch;
globalThis.fetch = (path, options) => realFetch(base + path, options);
"""

DRIVE = r"""
document.getElementById("temperature").value = "0";
document.getElementById("top_k").value = "50";
const bubbles = () => document.getElementById("messages").children.map(c => ({cls: c.className, text: c.textContent}));
async function say(text) {
  document.getElementById("input").value = text;
  document.getElementById("form").listeners.submit({preventDefault() {}});
  for (let i = 0; i < 600 && document.getElementById("send").disabled !== false; i++) await new Promise(r => setTimeout(r, 10));
  await new Promise(r => setTimeout(r, 50));
}
(async () => {
  await say("Hi there");
  await say("And again?");
  const twoTurns = bubbles();
  document.getElementById("new").listeners.click();
  const cleared = bubbles().length;
  await say("x".repeat(5000));   // longer than the context: the server says so, the page shows it
  console.log(JSON.stringify({twoTurns, cleared, error: bubbles(), input: document.getElementById("input").value}));
})();
"""


@pytest.fixture(scope="module")
def server():
    torch.manual_seed(0)
    model = llama.Llama(llama.LlamaConfig(vocab_size=50304, block_size=64, n_layer=1, n_head=2, n_embd=32)).eval()
    srv = serve.make_server(model, chat_bpe(), port=0, quiet=True, max_new_tokens=12)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv, model
    srv.shutdown()
    srv.server_close()


@pytest.mark.skipif(NODE is None, reason="Node.js is not installed")
def test_the_page_streams_keeps_the_conversation_and_shows_errors(server, tmp_path):
    srv, model = server
    script = re.search(r"<script>(.*)</script>", serve.PAGE, re.S).group(1)
    path = tmp_path / "page.mjs"
    path.write_text(DOM + script + DRIVE)
    host, port = srv.server_address[:2]
    out = subprocess.run([NODE, str(path), f"http://{host}:{port}"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    tok = chat_bpe()
    first = [{"role": "user", "content": "Hi there"}]
    reply1 = "".join(serve.stream_reply(model, tok, first, max_new_tokens=12, temperature=0.0))
    second = first + [{"role": "assistant", "content": reply1}, {"role": "user", "content": "And again?"}]
    reply2 = "".join(serve.stream_reply(model, tok, second, max_new_tokens=12, temperature=0.0))
    assert seen["twoTurns"] == [{"cls": "msg user", "text": "Hi there"}, {"cls": "msg assistant", "text": reply1},
                                {"cls": "msg user", "text": "And again?"}, {"cls": "msg assistant", "text": reply2}]
    assert seen["cleared"] == 0
    assert seen["error"][-1]["cls"] == "msg error" and "start a new conversation" in seen["error"][-1]["text"]
    assert seen["input"] == "x" * 5000   # the message that failed is given back to edit
