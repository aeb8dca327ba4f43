"""nblib.shards: write/read round trip, clear errors for broken shards, the order of windows and
its split across ranks, preparing text, local files and the command line; a failed prepare
leaves the shards it would have replaced as they were."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from nblib import shards
from nblib.shards import ShardWriter, TokenShards, Windows, rank_rows


def write(folder, train, val=(), shard_tokens=7, vocab=50):
    chars = [chr(65 + i) for i in range(vocab)]
    with ShardWriter(folder, "char", vocab, shard_tokens, source="test", chars=chars) as w:
        w.add("train", train)
        w.add("val", val)
    return w.manifest


def test_round_trip_across_shards(tmp_path):
    ids = np.arange(40) % 50
    manifest = write(tmp_path, ids, [1, 2, 3])
    assert [s["tokens"] for s in manifest["shards"] if s["split"] == "train"] == [7] * 5 + [5]
    assert json.loads((tmp_path / "manifest.json").read_text()) == manifest
    assert manifest["vocab_size"] == 50 and manifest["tokenizer"] == "char"
    train = TokenShards(tmp_path, "train")
    assert len(train) == 40 and train.read(0, 40).tolist() == ids.tolist()
    assert train.read(5, 10).tolist() == ids[5:15].tolist()  # spans two shards
    assert train.read(5, 10).dtype == np.int64
    assert TokenShards(tmp_path, "val").read(0, 3).tolist() == [1, 2, 3]
    assert (tmp_path / "train_000000.bin").stat().st_size == 14  # two bytes a token
    with pytest.raises(IndexError):
        train.read(35, 6)


def test_writer_refuses_out_of_range_ids_and_big_vocabularies(tmp_path):
    with pytest.raises(ValueError, match="0..49"):
        write(tmp_path, [3, 50])
    with pytest.raises(ValueError, match="uint16"):
        ShardWriter(tmp_path, "x", 70_000)
    assert not (tmp_path / "manifest.json").exists()  # a failed prepare leaves no manifest


def test_missing_manifest(tmp_path):
    with pytest.raises(FileNotFoundError, match="no manifest.json.*prepare"):
        TokenShards(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        TokenShards(tmp_path)


def test_truncated_corrupt_and_missing_shards(tmp_path):
    write(tmp_path, np.arange(20))
    shard = tmp_path / "train_000001.bin"
    good = shard.read_bytes()
    shard.write_bytes(good[:-2])
    with pytest.raises(ValueError, match=r"train_000001.bin is truncated.*re-run `python -m nblib.shards prepare"):
        TokenShards(tmp_path)
    shard.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
    with pytest.raises(ValueError, match="corrupt: its sha256"):
        TokenShards(tmp_path)
    TokenShards(tmp_path, checksums=False)  # sizes only: a flipped bit is not seen
    shard.unlink()
    with pytest.raises(FileNotFoundError, match="train_000001.bin .* is missing"):
        TokenShards(tmp_path)
    write(tmp_path, np.arange(20))  # no validation tokens
    with pytest.raises(ValueError, match="no 'val' shards"):
        TokenShards(tmp_path, "val")


def test_sequential_order_is_the_formula(tmp_path):
    write(tmp_path, np.arange(50) % 50, shard_tokens=1000)
    w = Windows(TokenShards(tmp_path), seq_len=4)
    assert w.n_windows == 50 // 4 - 1
    # step s, micro m, global row g reads window ((s * accum + m) * B_global + g) mod n_windows
    accum, B, world = 2, 3, 2
    for s in range(3):
        for m in range(accum):
            for r in range(world):
                for b, k in enumerate(rank_rows(s, m, r, B, world, accum)):
                    g = r * B + b
                    assert w.start(k) == (((s * accum + m) * B * world + g) % w.n_windows) * 4
    x, y = w.batch([0, 1])
    assert x.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]] and y.tolist() == [[1, 2, 3, 4], [5, 6, 7, 8]]
    assert x.dtype == torch.long and x.is_contiguous() and y.is_contiguous()


def test_shuffled_order_covers_each_pass_and_is_reproducible(tmp_path):
    write(tmp_path, np.arange(200) % 50, shard_tokens=64)
    tokens = TokenShards(tmp_path)
    w, again = Windows(tokens, 8, seed=3), Windows(tokens, 8, seed=3)
    n = w.n_windows
    first = [w.start(k) for k in range(n)]
    assert sorted(first) == [8 * i for i in range(n)]  # a permutation, unshifted in the first pass
    second = [w.start(k) for k in range(n, 2 * n)]
    shift = second[0] % 8
    assert sorted(second) == [8 * i + shift for i in range(n)] and second != first
    assert [again.start(k) for k in range(3 * n)] == first + second + [w.start(k) for k in range(2 * n, 3 * n)]
    assert all(s + 9 <= len(tokens) for s in first + second)
    assert Windows(tokens, 8, seed=4).start(0) != first[0] or Windows(tokens, 8, seed=4).start(1) != first[1]


def test_two_ranks_read_what_one_process_reads(tmp_path):
    write(tmp_path, np.arange(500) % 50, shard_tokens=100)
    w = Windows(TokenShards(tmp_path), 8, seed=0)
    G = 8  # global batch rows
    for step in range(4):
        one = [k for m in range(2) for k in rank_rows(step, m, 0, 4, 1, 2)]       # 1 process: 2 x 4 rows
        ranks = [list(rank_rows(step, 0, r, 4, 2, 1)) for r in range(2)]          # 2 processes: 4 rows each
        assert sorted(one) == sorted(ranks[0] + ranks[1]) == list(range(step * G, (step + 1) * G))
        assert not set(ranks[0]) & set(ranks[1])
        x_one, _ = w.batch(one)
        x_ranks = torch.cat([w.batch(r)[0] for r in ranks])
        assert torch.equal(x_one, x_ranks)
        assert not torch.equal(w.batch(ranks[0])[0], w.batch(ranks[1])[0])


def test_too_few_tokens_for_a_window(tmp_path):
    write(tmp_path, np.arange(10), shard_tokens=100)
    with pytest.raises(ValueError, match="too few for windows of seq_len=8"):
        Windows(TokenShards(tmp_path), 8)


def test_prepare_text_char_and_gpt2(tmp_path):
    text = "hello world, hello shards!\n" * 20
    m = shards.prepare_text(text, tmp_path / "c", "char", val_fraction=0.1)
    train, val = TokenShards(tmp_path / "c", "train"), TokenShards(tmp_path / "c", "val")
    tok = shards.tokenizer_for(m)
    assert tok.decode(train.read(0, len(train))) + tok.decode(val.read(0, len(val))) == text
    assert len(train) == int(0.9 * len(text)) and m["eot_token"] is None
    m = shards.prepare_text(text, tmp_path / "g", "gpt2", shard_tokens=30)
    assert m["vocab_size"] == 50257 and m["eot_token"] == 50256
    train, val = TokenShards(tmp_path / "g", "train"), TokenShards(tmp_path / "g", "val")
    tok = shards.tokenizer_for(m)
    assert tok.decode(np.concatenate([train.read(0, len(train)), val.read(0, len(val))]).tolist()) == text


def test_prepare_local_txt_and_jsonl(tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text("The first document.")
    lines = [json.dumps({"text": "Second."}), "", json.dumps({"text": "Third one."})]  # a blank line is skipped
    (src / "sub" / "b.jsonl").write_text("\n".join(lines) + "\n")
    m = shards.prepare_hf(tmp_path / "out", src, val_tokens=3, shard_tokens=4)
    tok = shards.tokenizer_for(m)
    val, train = TokenShards(tmp_path / "out", "val"), TokenShards(tmp_path / "out", "train")
    everything = np.concatenate([val.read(0, len(val)), train.read(0, len(train))]).tolist()
    assert len(val) == 3 and everything[0] == 50256
    assert tok.decode(everything) == "<|endoftext|>The first document.<|endoftext|>Second.<|endoftext|>Third one."
    m = shards.prepare_hf(tmp_path / "few", src, tokens=5, val_tokens=2)
    assert len(TokenShards(tmp_path / "few", "train")) == 5
    with pytest.raises(ValueError, match="lower --val-tokens"):
        shards.prepare_hf(tmp_path / "all_val", src)  # 10M validation tokens by default: nothing left
    assert not (tmp_path / "all_val" / "manifest.json").exists()


def test_prepare_errors_without_datasets_or_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        shards.prepare_hf(tmp_path / "o", tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no .txt, .jsonl or .parquet"):
        shards.prepare_hf(tmp_path / "o", tmp_path / "empty")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"content": "x"}) + "\n")
    with pytest.raises(ValueError, match="bad.jsonl:1: .*'text'"):
        shards.prepare_hf(tmp_path / "o", bad, val_tokens=0)
    try:
        import datasets  # noqa: F401
    except ImportError:
        (tmp_path / "p").mkdir()
        (tmp_path / "p" / "x.parquet").write_bytes(b"PAR1")
        with pytest.raises(ImportError, match="pip install datasets"):
            shards.prepare_hf(tmp_path / "o", tmp_path / "p")
        with pytest.raises(ImportError, match="pip install datasets"):
            shards.prepare_hf(tmp_path / "o", "fineweb-edu")


def test_ensure_prepared_and_command_line(tmp_path, capsys):
    folder = shards.ensure_prepared("shakespeare-char", tmp_path / "sc")
    assert TokenShards(folder, "train").vocab_size == 65
    assert len(TokenShards(folder, "train")) + len(TokenShards(folder, "val")) == 1_115_394
    assert not list(tmp_path.glob("*.tmp-*"))
    shards.main(["check", str(folder)])
    assert "all verified" in capsys.readouterr().out
    src = tmp_path / "doc.txt"
    src.write_text("a few words of text " * 10)
    shards.main(["prepare", "--source", str(src), "--out", str(tmp_path / "cli"), "--val-tokens", "5",
                 "--shard-tokens", "1_000"])
    out = capsys.readouterr().out
    assert "val 5," in out and len(TokenShards(tmp_path / "cli", "val")) == 5
    with pytest.raises(ValueError, match="do not apply"):
        shards.prepare("shakespeare-char", tmp_path / "x", tokens=10)


# ---------------------------------------------------------------------------- a failed prepare changes nothing

def snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_a_failed_prepare_keeps_the_shards_and_leaves_no_temporary_folder(tmp_path, monkeypatch):
    src = tmp_path / "doc.txt"
    src.write_text("words of the first corpus " * 20)
    out = tmp_path / "out"
    shards.main(["prepare", "--source", str(src), "--out", str(out), "--val-tokens", "5"])
    before = snapshot(out)
    bad = tmp_path / "bad.jsonl"  # a good document, then a bad line: fails half-way through
    bad.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps({"content": "x"}) + "\n")
    (tmp_path / "pq").mkdir()
    (tmp_path / "pq" / "x.parquet").write_bytes(b"PAR1")

    def no_datasets(why):
        raise ImportError(f"{why} needs Hugging Face's `datasets` library: `pip install datasets`")

    monkeypatch.setattr(shards, "_require_datasets", no_datasets)
    failures = [(["--source", str(tmp_path / "typo.txt")], FileNotFoundError, "does not exist"),
                (["--source", str(bad), "--val-tokens", "1"], ValueError, "bad.jsonl:2"),
                (["--source", str(tmp_path / "pq")], ImportError, "pip install datasets"),
                (["--source", "fineweb-edu"], ImportError, "pip install datasets"),
                (["--source", str(src), "--val-tokens", "1000000"], ValueError, "lower --val-tokens"),
                (["--source", str(src), "--val-tokens", "0"], ValueError, "--val-tokens must be >= 1"),
                (["--source", "shakespeare-char", "--tokens", "5"], ValueError, "do not apply")]
    for args, error, message in failures:
        with pytest.raises(error, match=message):
            shards.main(["prepare", "--out", str(out), *args])
        assert snapshot(out) == before, args
        assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "doc.txt", "out", "pq"], args

    def interrupted(*args, **kwargs):  # Ctrl-C while writing
        (args[0] / "train_000000.bin").parent.mkdir(parents=True, exist_ok=True)
        (args[0] / "train_000000.bin").write_bytes(b"\0\0")
        raise KeyboardInterrupt

    monkeypatch.setattr(shards, "prepare_hf", interrupted)
    with pytest.raises(KeyboardInterrupt):
        shards.prepare(str(src), out)
    assert snapshot(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "doc.txt",
                                                                                       "out", "pq"]
    monkeypatch.undo()
    src.write_text("another corpus, longer than the first one " * 20)  # a prepare that works replaces them
    shards.main(["prepare", "--source", str(src), "--out", str(out), "--val-tokens", "5"])
    train = TokenShards(out, "train")
    assert "another corpus" in shards.tokenizer_for(train.manifest).decode(train.read(0, len(train)).tolist())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "doc.txt", "out", "pq"]


def test_prepare_refuses_a_folder_holding_other_files(tmp_path):
    src = tmp_path / "doc.txt"
    src.write_text("some words " * 30)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.md").write_text("my notes")
    with pytest.raises(FileExistsError, match=r"holds files that are not shards \(notes.md\)"):
        shards.prepare(str(src), mine, val_tokens=5)
    assert sorted(p.name for p in mine.iterdir()) == ["notes.md"]
    with pytest.raises(NotADirectoryError, match="is a file"):
        shards.prepare(str(src), src, val_tokens=5)


def test_ensure_prepared_replaces_an_unfinished_prepare(tmp_path):
    folder = tmp_path / "sc"
    folder.mkdir()
    (folder / "train_000000.bin").write_bytes(b"\1\0")  # an old prepare killed before its manifest
    shards.ensure_prepared("shakespeare-char", folder)
    assert len(TokenShards(folder, "val")) == 111_540 and sorted(p.name for p in tmp_path.iterdir()) == ["sc"]


def test_reading_zero_tokens_is_a_clear_error(tmp_path):
    write(tmp_path, np.arange(20), [1, 2, 3])
    with pytest.raises(ValueError, match="asks for no tokens"):
        TokenShards(tmp_path).read(0, 0)
    with pytest.raises(ValueError, match="at least one row"):
        Windows(TokenShards(tmp_path), 4).rows([])
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["shards"].append(dict(file="val_000001.bin", split="val", tokens=0, sha256=""))
    (tmp_path / "val_000001.bin").write_bytes(b"")
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="val_000001.bin is listed .* with 0 tokens"):
        TokenShards(tmp_path, "val")


def test_the_command_line_says_errors_in_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "nblib.shards", "prepare", "--source", str(tmp_path / "typo.txt"),
                           "--out", str(tmp_path / "out")], cwd=Path(__file__).resolve().parents[1],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1
    assert "typo.txt does not exist" in proc.stderr and not (tmp_path / "out").exists()
