"""Training-step throughput of our BERT vs `transformers` with the same config, in one process, lever by lever.

Pre-training: batch 32 x 128 tokens, 20 masked positions per sequence, MLM + NSP loss, AdamW
step; for the `mini` preset and for L6/H384 (MiniLM's shape). Our MLM head runs only at the
masked positions; the reference computes logits at every position and ignores the rest.
Fine-tuning: sequence classification on real MRPC train batches with dynamic padding.

Ours is measured in variants that add one lever at a time (`--variants`):
    torch-kernels   torch's F.dropout and SDPA with attention dropout (the unfused path on CPU), fp32
    cpu-dropout     bert.kernels' CPU dropout and written-out attention, fp32
    bf16            + bf16 autocast (fp32 master weights)
    compile         + torch.compile (dynamic shapes)
Each variant is measured alternately with the reference (ours, reference, ours, ...) so that drift
in machine load hits both alike; ratios are reference time / ours. Both use AdamW as each system
does by default (ours: torch's fused kernel via bert.optim.adamw; the reference: torch's default).
Prints one JSON object.

    python benchmarks/model_step.py [--rounds 5] [--steps 3] [--threads 2] [--variants torch-kernels,cpu-dropout,bf16]
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers

import bert
from bert.kernels import cpu_kernels
from bert.model import BertForPreTraining, BertForSequenceClassification

ROOT = Path(__file__).resolve().parents[1]
DATASETS = ROOT.parent / "shared" / "datasets"


def hf_config(c: bert.BertConfig, **extra) -> transformers.BertConfig:
    return transformers.BertConfig(
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads,
        intermediate_size=c.intermediate_size,
        attn_implementation="sdpa",
        **extra,
    )


def pretraining_batch(c: bert.BertConfig, batch: int, seq: int, masked: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, c.vocab_size, (batch, seq), generator=g)
    types = (torch.arange(seq) >= seq // 2).long().expand(batch, seq).contiguous()
    mask = torch.ones(batch, seq, dtype=torch.long)
    positions = torch.stack([torch.randperm(seq - 2, generator=g)[:masked] + 1 for _ in range(batch)])
    original = torch.gather(ids, 1, positions)
    nsp = torch.randint(0, 2, (batch,), generator=g)
    # the reference takes full-length labels: -100 everywhere but the masked positions
    labels = torch.full_like(ids, -100).scatter_(1, positions, original)
    return ids, types, mask, positions, original, nsp, labels


def time_steps(step, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps


def alternate(ours_step, ref_step, rounds: int, steps: int) -> tuple[float, float]:
    ours_step(), ref_step()  # warm-up
    ours_t, ref_t = [], []
    for _ in range(rounds):
        ours_t.append(time_steps(ours_step, steps))
        ref_t.append(time_steps(ref_step, steps))
    return statistics.median(ours_t), statistics.median(ref_t)


def make_step(model, optimizer, forward, precision=None):
    def step():
        optimizer.zero_grad(set_to_none=True)
        with precision.autocast() if precision is not None else contextlib.nullcontext():
            loss = forward()
        loss.backward()
        optimizer.step()

    return step


VARIANTS = ("torch-kernels", "cpu-dropout", "bf16", "compile")


def ours_variant(model, variant: str):
    """(model to call, precision) for a variant: bf16 and compile include the levers before them."""
    from bert.precision import Precision

    precision = Precision("bf16" if variant in ("bf16", "compile") else "fp32", "cpu")
    if variant == "compile":
        model = torch.compile(model, dynamic=True)
    return model, precision


def bench_pretraining(name: str, c: bert.BertConfig, args) -> dict:
    from bert.optim import build_optimizer

    ids, types, mask, positions, original, nsp, labels = pretraining_batch(c, args.batch, args.seq, args.masked)
    torch.manual_seed(0)
    ref = transformers.BertForPreTraining(hf_config(c)).train()
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-4)
    ref_step = make_step(
        ref,
        ref_opt,
        lambda: ref(input_ids=ids, token_type_ids=types, attention_mask=mask, labels=labels, next_sentence_label=nsp).loss,
    )
    tokens = args.batch * args.seq
    result = {"config": name, "batch": [args.batch, args.seq], "masked_per_seq": args.masked, "variants": {}}
    for variant in args.variants:
        torch.manual_seed(0)
        raw = BertForPreTraining(c).train()
        model, precision = ours_variant(raw, variant)
        ours_opt = build_optimizer(raw, "adamw", lr=1e-4, weight_decay=0.01)
        with cpu_kernels("torch" if variant == "torch-kernels" else "fast"):
            ours_step = make_step(model, ours_opt, lambda: model(ids, types, mask, positions, original, nsp).loss, precision)
            t_ours, t_ref = alternate(ours_step, ref_step, args.rounds, args.steps)
        result["variants"][variant] = {"ours_tokens_per_s": round(tokens / t_ours, 1),
                                       "transformers_tokens_per_s": round(tokens / t_ref, 1),
                                       "ratio": round(t_ref / t_ours, 3)}
    return result


def mrpc_batches(batch_size: int, n_batches: int):
    tok = transformers.BertTokenizerFast(vocab_file=str(DATASETS / "bert-base-uncased" / "vocab.txt"))
    with open(DATASETS / "glue" / "MRPC" / "train.tsv", encoding="utf-8-sig", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    header, rows = rows[0], rows[1 : 1 + batch_size * n_batches]
    a, b, y = header.index("#1 String"), header.index("#2 String"), header.index("Quality")
    batches = []
    for i in range(0, len(rows), batch_size):
        chunk = rows[i : i + batch_size]
        enc = tok([r[a] for r in chunk], [r[b] for r in chunk], padding=True, truncation=True, max_length=128, return_tensors="pt")
        enc["labels"] = torch.tensor([int(r[y]) for r in chunk])
        batches.append(enc)
    return batches


def bench_classification(name: str, c: bert.BertConfig, args) -> dict:
    from bert.optim import adamw, param_groups

    batches = mrpc_batches(args.batch, args.steps)
    torch.manual_seed(0)
    ref = transformers.BertForSequenceClassification(hf_config(c, num_labels=2)).train()
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=2e-5)

    def run(model, opt, call, precision=None):
        def all_batches():
            for enc in batches:
                opt.zero_grad(set_to_none=True)
                with precision.autocast() if precision is not None else contextlib.nullcontext():
                    loss = call(model, enc)
                loss.backward()
                opt.step()

        return all_batches

    ref_run = run(ref, ref_opt, lambda m, e: m(**e).loss)
    examples = sum(len(e["labels"]) for e in batches)
    tokens = sum(int(e["attention_mask"].sum()) for e in batches)
    result = {"config": name, "task": "MRPC train, dynamic padding", "batches": len(batches),
              "batch_size": args.batch, "variants": {}}
    for variant in args.variants:
        torch.manual_seed(0)
        raw = BertForSequenceClassification(c, 2).train()
        model, precision = ours_variant(raw, variant)
        ours_opt = adamw(param_groups(raw, 0.01), lr=2e-5)
        with cpu_kernels("torch" if variant == "torch-kernels" else "fast"):
            ours_run = run(model, ours_opt, lambda m, e: m(e["input_ids"], e["token_type_ids"], e["attention_mask"],
                                                           e["labels"]).loss, precision)
            t_ours, t_ref = alternate(ours_run, ref_run, args.rounds, 1)
        result["variants"][variant] = {"ours_examples_per_s": round(examples / t_ours, 1),
                                       "transformers_examples_per_s": round(examples / t_ref, 1),
                                       "ours_real_tokens_per_s": round(tokens / t_ours, 1),
                                       "ratio": round(t_ref / t_ours, 3)}
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=3, help="steps per timed round (classification: batches)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--masked", type=int, default=20)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--variants", default="torch-kernels,cpu-dropout,bf16", help=f"comma list of {', '.join(VARIANTS)}")
    p.add_argument("--configs", default="mini,L6-H384")
    args = p.parse_args()
    args.variants = [v for v in args.variants.split(",") if v]
    unknown = set(args.variants) - set(VARIANTS)
    if unknown:
        p.error(f"unknown variants {sorted(unknown)}; known: {', '.join(VARIANTS)}")
    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    configs = {
        "mini": bert.preset("mini"),
        "L6-H384": bert.BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536),
    }
    configs = {k: v for k, v in configs.items() if k in args.configs.split(",")}
    result = {
        "benchmark": "model_step",
        "device": "cpu",
        "threads": args.threads,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "machine": platform.machine(),
        "ratio_means": "transformers step time / ours (higher = ours faster)",
        "pretraining": [bench_pretraining(n, c, args) for n, c in configs.items()],
        "sequence_classification": [bench_classification(n, c, args) for n, c in configs.items()],
    }
    json.dump(result, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
