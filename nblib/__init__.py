"""nblib: the small library behind "LLMs from scratch, in Jupyter notebooks".

Each module is one idea a lesson taught, written once so later lessons can import it:

- ``runmode``: FAST/full switch, device, seeding (``nblib.setup`` is the config cell's call)
- ``data``: data sets by name, checked against sha256, cached, offline-capable
- ``progress``: progress bars
- ``record``: headline numbers, printed and recorded for the lessons' report
- ``names``: the names data set with the course's fixed train/dev/test split (01, 03)
- ``autograd``: the scalar ``Value`` engine (02)
- ``bpe``: byte-level BPE from scratch: train, encode, decode, GPT-2's merges (04)
- ``tokenizers``: the real GPT-2 tokenizer, offline
- ``text``: characters as tokens, train/val split, random batches (05 on)
- ``gpt``: GPT-2 with Hugging Face's parameter names (06)
- ``lm``: what both model families share: the loss (targets of -100 ignored) and the positions of new tokens (06 on)
- ``train``: the training loop: AdamW, warmup + cosine, clipping, accumulation, autocast, resume (06 on)
- ``checkpoint``: safetensors checkpoints with their config (06 on)
- ``hf_dir``: a Hugging Face model folder (config.json + model.safetensors), read and written (06, 07)
- ``sample``: temperature, top-k, top-p; the one sampler every generator of the course draws its tokens with (06 on)
- ``llama``: the Llama-style model: RMSNorm, RoPE, SwiGLU, GQA, KV cache, export (07)
- ``kvcache``: the KV cache and the padding-aware causal masks both model families share (07 on)
- ``engine``: generation step by step (``new_cache``, ``prefill``, ``decode_step``) and batched with log-probs (left padding, stop tokens, n samples per prompt), sequence log-probs (08 on)
- ``chat``: the chat tokenizer (characters + special tokens), the chat template with its assistant mask, a chat loop (08 on)
- ``tasks``: generated post-training tasks with verifiers and held-out splits: addition (with a buggy teacher), words, facts, open requests (08 on)
- ``base``: the small base model the post-training lessons share, pretrained on tinyshakespeare and cached by config (08 on)
- ``modelcache``: the cache of models later lessons reuse (base, SFT), keyed by a hash of all that decides their weights (08 on)
- ``sft``: supervised fine-tuning: padded chat batches, the masked loss, held-out loss, accuracy and format evals (08 on)
- ``rl``: the math of preference learning and RL: Bradley-Terry, GAE, the PPO, DPO and GRPO losses, KL estimates (09-11)
- ``pg``: the policy gradient on a policy small enough to solve exactly: REINFORCE, baselines, the importance ratio and GAE measured against the exact gradient (09)
- ``prefs``: simulated preferences (never human): a hidden rater and the reply pairs it labels with noise (09, 10)
- ``reward``: a language model with a scalar head: the reward model, and PPO's value model (09)
- ``ppo``: PPO for a language model: rollouts priced with a KL penalty, GAE, clipped policy and value updates (09)
- ``dpo``: direct preference optimisation: the policy's log-probs against a frozen reference, no reward model (10)
- ``grpo``: RL with a verifiable reward: groups of replies, advantages within each group, no value model (11)
- ``scaling``: FLOPs of a training run, IsoFLOP sweeps, parabola and power-law fits, the loss surface L(N, D) (12)
- ``hardware``: the GPU peak FLOP/s table, the CPU's peak, MFU, timers that wait for the device (13, 14)
- ``profiling``: torch.profiler categories, activation memory, the speed ladder (13)
- ``shards``: token shards (uint16 files, a manifest with sha256), their preparation, the rows each process reads (14)
- ``presets``: what the training program trains: its presets, their tiny forms, the checks of every setting (14)
- ``processes``: the processes of a run: torchrun's ranks, DDP wrapping, stop signals, the one-run-per-folder lock (14)
- ``runlog``: a run's ``log.jsonl``, written by rank 0 and read back, plotted or launched from a notebook (14)
- ``pretrain``: the training program, ``python -m nblib.pretrain``: the run, its measurements, exact resume, the command line (14)
- ``chatbpe``: GPT-2's BPE with the chat tokens in the padded vocabulary's rows (15)
- ``chatdata``: the chatbot's data: the real sets prepared with ``datasets``, the course's practice sets, the stages' mixtures, an identity (15)
- ``evals``: HellaSwag's acc_norm and a CORE-like mean for base models, choice letters and GSM8K for chat models, a vibe check (15)
- ``stages``: the stages after pre-training as programs (``nblib.midtrain``, ``nblib.chat_sft``): conversations as masked rows, lesson 14's run from the stage before (15)
- ``midtrain``: ``python -m nblib.midtrain`` (15)
- ``chat_sft``: ``python -m nblib.chat_sft`` (15)
- ``chat_rl``: ``python -m nblib.chat_rl``: GRPO on math word problems with a verifiable reward, resumable (15)
- ``report``: a stage's evals (``evals.json``) and the report card of a run (15)
- ``serve``: ``python -m nblib.serve``: a streaming web chat (and a terminal chat) from a stage's checkpoint (15)
- ``inference``: memory bandwidth, prefill and decode timed, the decode roofline (16)
- ``paged``: the paged KV cache (pages, page tables, slots) and continuous batching, against static batches (16)
- ``quant``: int8 weight-only quantization per output row, ``Int8Linear``, quantized models saved as safetensors (16)
- ``speculative``: speculative decoding: the accept/reject rule that keeps the target's distribution, the draft-and-check loop (16)
- ``checks``: exercise checks a learner runs on their own code, one module per lesson
"""
from nblib.record import headline
from nblib.runmode import is_fast, pick_device, seed_everything, setup

__version__ = "0.1.0"
__all__ = ["setup", "headline", "is_fast", "pick_device", "seed_everything", "__version__"]
