"""Lesson 15's report card: every stage of a chatbot's run in one table, as markdown and JSON.

    python -m nblib.report --eval runs/base --kind base        # evals.json in the run's folder
    python -m nblib.report --eval runs/sft --kind chat
    python -m nblib.report --card base=runs/base mid=runs/mid sft=runs/sft rl=runs/rl --out runs/report

``evaluate_run`` scores one stage's checkpoint and writes ``DIR/evals.json`` (a base model as
continuations with a CORE-like mean, a chat model by choice letters, GSM8K by generation, and
a vibe check). ``card`` reads each stage's ``log.jsonl`` summary, its ``config.json`` and its
``evals.json`` and writes ``report.md`` and ``report.json``: losses, evals, time, tokens and
the hardware, stage by stage, like nanochat's report.
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import time
from pathlib import Path

import torch

from nblib import chatdata, evals, hardware
from nblib.runlog import log_rows, read_log
from nblib.stages import load_run

EVAL_SETS = ("hellaswag-val", "arc-easy-test", "arc-challenge-test", "mmlu-test", "gsm8k-test")


def eval_sets(data_dir: str | None = None, limit: int | None = None) -> dict[str, list[dict]]:
    return {name: chatdata.load(name, data_dir, limit) for name in EVAL_SETS}


def evaluate_run(run_dir: str | Path, kind: str, data_dir: str | None = None, limit: int | None = None,
                 gsm8k_k: int = 0, device: str = "cpu", choose=evals.letter_choice, write: bool = True,
                 reply_tokens: int | None = None) -> dict:
    """Score the stage in ``run_dir``: ``kind`` "base" (continuations, CORE-like) or "chat" (letters,
    GSM8K, vibe check). ``limit`` items per set; GSM8K replies of at most ``reply_tokens`` (default: 48 on
    the practice sets, as the RL stage's replies, 256 on the real ones). Writes ``run_dir/evals.json``
    (unless ``write=False``)."""
    if kind not in ("base", "chat"):
        raise ValueError(f"kind must be 'base' or 'chat', got {kind!r}")
    started = time.perf_counter()
    model, tokenizer = load_run(run_dir, device)
    sets = eval_sets(data_dir, limit)
    if kind == "base":
        result = evals.base_evals(model, tokenizer, sets)
    else:
        result = evals.chat_evals(model, tokenizer, sets, choose)
        if reply_tokens is None:
            reply_tokens = evals.PRACTICE_REPLY_TOKENS if data_dir is None else evals.REAL_REPLY_TOKENS
        result["gsm8k"] = evals.gsm8k(model, tokenizer, sets["gsm8k-test"], max_new_tokens=reply_tokens, k=gsm8k_k)
        result["vibe"] = evals.vibe_check(model, tokenizer)
    result.update(kind=kind, limit=limit, eval_s=round(time.perf_counter() - started, 3))
    if write:
        (Path(run_dir) / "evals.json").write_text(json.dumps(result, indent=1))
    return result


def stage_row(name: str, run_dir: str | Path) -> dict:
    """One stage's line of the card, from its folder."""
    run_dir = Path(run_dir)
    log = read_log(run_dir)
    summaries = log_rows(log, "summary")
    if not summaries:
        raise ValueError(f"{run_dir} has no summary row in its log: the {name} run has not finished")
    summary = summaries[-1]
    config = json.loads((run_dir / "config.json").read_text()) if (run_dir / "config.json").is_file() else {}
    evals_path = run_dir / "evals.json"
    scores = json.loads(evals_path.read_text()) if evals_path.is_file() else {}
    train = log_rows(log, "train")
    return {"stage": name, "folder": str(run_dir), "steps": summary.get("step"), "wall_s": summary.get("wall_s"),
            "tokens": summary.get("tokens"), "val_loss": summary.get("val_loss"),
            "train_loss": train[-1].get("loss") if train else None,
            "reward": summary.get("mean_reward_last"), "params": summary.get("params") or config.get("params"),
            "device": config.get("device_name") or config.get("device"), "evals": scores}


def _pct(x) -> str:
    return "" if x is None else f"{100 * x:.1f}%"


def _num(x, fmt="{:.3f}") -> str:
    return "" if x is None else fmt.format(x)


def card(stages: dict[str, str | Path], out: str | Path | None = None) -> dict:
    """The report card of ``stages`` (name -> run folder, in order); written to ``out/report.md`` and
    ``out/report.json`` when ``out`` is given. Returns {"markdown", "rows", "hardware", "date"}."""
    rows = [stage_row(name, folder) for name, folder in stages.items()]
    info = hardware.cpu_info()
    machine = {"cpu": info.model, "cores": info.cores, "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available()
               else None, "torch": torch.__version__, "python": platform.python_version()}
    lines = [f"# Report card ({datetime.date.today().isoformat()})", "",
             f"Hardware: {machine['gpu'] or machine['cpu']} ({machine['cores']} CPU cores), torch {machine['torch']}",
             "", "| stage | steps | time | tokens | val loss | HellaSwag (norm) | ARC-E | ARC-C | MMLU | GSM8K pass@1 | CORE-like | RL reward |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        e = r["evals"]
        acc = lambda name: e.get(name, {}).get("acc")  # noqa: E731
        lines.append("| " + " | ".join([
            r["stage"], str(r["steps"] or ""), _num(r["wall_s"], "{:.0f} s"), _num(r["tokens"], "{:,}"),
            _num(r["val_loss"]), _pct(e.get("hellaswag", {}).get("acc_norm")), _pct(acc("arc-easy")),
            _pct(acc("arc-challenge")), _pct(acc("mmlu")), _pct(e.get("gsm8k", {}).get("pass@1")),
            _num(e.get("core_like")), _num(r["reward"])]) + " |")
    lines += ["", "Chance: HellaSwag 25%, ARC about 25%, MMLU 25%; CORE-like 0 is chance. Base models are scored "
              "as continuations, chat models by the choice letter's logit."]
    vibes = [(r["stage"], v) for r in rows for v in r["evals"].get("vibe", [])]
    if vibes:
        lines += ["", "## Vibe check (greedy)", ""]
        lines += [f"- **{stage}**, *{v['prompt']}* → {v['reply']!r}" for stage, v in vibes]
    markdown = "\n".join(lines) + "\n"
    result = {"markdown": markdown, "rows": rows, "hardware": machine, "date": datetime.date.today().isoformat()}
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.md").write_text(markdown)
        (out / "report.json").write_text(json.dumps({k: v for k, v in result.items() if k != "markdown"}, indent=1))
    return result


def measured_cards(folder: str | Path | None = None) -> list[dict]:
    """Report cards measured on a GPU, committed as ``nblib/measured/chatbot_*.json``
    (``{"preset", "device", "date", "torch", "markdown", "rows"}``), if any."""
    from nblib.runlog import MEASURED
    folder = Path(folder) if folder else MEASURED
    return [json.loads(p.read_text(encoding="utf-8")) for p in sorted(folder.glob("chatbot_*.json"))]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m nblib.report", description="Evaluate a stage, or write the report card.")
    p.add_argument("--eval", metavar="DIR", help="evaluate this stage's checkpoint (writes DIR/evals.json)")
    p.add_argument("--kind", choices=("base", "chat"), default="chat")
    p.add_argument("--limit", type=int, help="items per eval set (default: all)")
    p.add_argument("--gsm8k-k", type=int, default=0, help="also pass@k with k samples per GSM8K problem")
    p.add_argument("--reply-tokens", type=int, help="GSM8K replies of at most this many tokens (default 48 on the "
                                                    "practice sets, 256 on the real ones)")
    p.add_argument("--data-dir", help="prepared full eval sets (python -m nblib.chatdata prepare)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--card", nargs="*", metavar="STAGE=DIR", help="the stages, in order, for the report card")
    p.add_argument("--out", help="where the card's report.md and report.json go")
    args = p.parse_args(argv)
    try:
        if args.eval:
            result = evaluate_run(args.eval, args.kind, args.data_dir, args.limit, args.gsm8k_k, args.device,
                                  reply_tokens=args.reply_tokens)
            print(json.dumps({k: v for k, v in result.items() if k != "vibe"}, indent=1))
        if args.card:
            pairs = [s.split("=", 1) for s in args.card]
            if any(len(pair) != 2 for pair in pairs):
                raise ValueError("--card takes STAGE=DIR pairs, e.g. base=runs/base sft=runs/sft")
            print(card(dict(pairs), args.out)["markdown"])
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"error: {err}") from None


if __name__ == "__main__":
    main()
