"""Sharded evaluation: every question gets exactly one valid label.

Constrained scoring (`eval.method=score`): a question's score for a label is the log-probability of the
label's whole token sequence, answer tokens and EOS, after the same prompt used in training:

    score(label) = sum_j log p(t_j | prompt, t_<j)      (eval.normalize=sum, the default)
    score(label) = mean_j log p(t_j | prompt, t_<j)     (eval.normalize=mean)

and the prediction is the best-scoring label. All candidates of a question are scored in one row: the
question's tokens come first, then the candidates' tokens as a trie (labels that begin alike share those
tokens), each attending to the prompt and to its ancestors only (a tree-shaped attention mask, each node
at the position it has right after the question). With the shared prefix the instruction is run once
per evaluation and broadcast to every batch.

`eval.method=generate` keeps the reference notebook's free greedy generation with substring matching,
and counts the answers that are not a valid label.

Sharding: the questions are sorted by length and cut into batches exactly as one process would, and
process r takes batches r, r+W, r+2W, ...; so every question is scored in the same batch, with the same
padding, whatever the number of processes (in bf16, where a batch's shape changes the rounding, a
question-level split changed a few predictions). The rows are gathered with their indices and put back in
order, so no question is dropped or counted twice.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import torch
from tqdm.auto import tqdm

from .batching import Encoder, batch_rounds, length_batches, tree_batch
from .forward import SharedPrefix, hidden_states, parts
from .memory import EVAL_MEMORY_SETTINGS, out_of_memory
from .reports import compute_metrics

log = logging.getLogger("trec_accel")

INVALID = "<invalid>"


class EvalError(ValueError):
    """Bad evaluation input: empty split, unknown split, empty question."""


# Logits of at most this many (row, column) pairs at a time: a batch of 512 fine questions has 87 scored
# columns of 32,000 logits each, which would be 5.7 GB in fp32 at once.
_LOGIT_CHUNK = 8192


@torch.no_grad()
def shared_prefix(model, encoder: Encoder) -> SharedPrefix:
    """The instruction run once: every scoring batch reuses it."""
    decoder, _ = parts(model)
    device = next(p for p in model.parameters()).device
    return SharedPrefix(decoder, torch.tensor([encoder.prefix_ids], device=device))


@torch.no_grad()
def score_prompts(model, encoder: Encoder, prompts: Sequence[list[int]], prefix: SharedPrefix | None,
                  normalize: str) -> torch.Tensor:
    """(len(prompts), n_labels) label scores. `prompts` are whole prompt token lists; with `prefix` (from
    `shared_prefix`) they all start with the instruction, which is not run again."""
    decoder, lm_head = parts(model)
    device = next(p for p in model.parameters()).device
    trie = encoder.trie
    p = prefix.length if prefix is not None else 0
    ids, pos, allow, n = (t.to(device) for t in tree_batch(trie, [q[p:] for q in prompts], p,
                                                            encoder.tokenizer.pad_token_id))
    if getattr(decoder.config, "_attn_implementation", "sdpa") == "flash_attention_2":
        raise EvalError("eval.method=score needs a tree-shaped attention mask, which FlashAttention-2 cannot take: "
                        "set model.attn_implementation=sdpa")
    hidden = hidden_states(decoder, ids, torch.ones_like(ids), prefix, pos, allow)
    b, m = len(prompts), ids.shape[1] - len(trie.tokens)
    # Column 0: the question's last position (first label token); 1 + j: trie node j.
    h = torch.cat([hidden[torch.arange(b, device=device), n - 1][:, None], hidden[:, m:]], 1)
    cols, targets = trie.columns.to(device), trie.targets.to(device)
    logp = torch.empty((b, len(cols)), device=device)
    step = max(1, _LOGIT_CHUNK // h.shape[1])
    for i in range(0, b, step):
        logits = lm_head(h[i : i + step]).float()                       # (rows, columns, V)
        logp[i : i + step] = logits[:, cols, targets] - torch.logsumexp(logits, -1)[:, cols]
    scores = logp @ trie.incidence.to(device)
    return scores / trie.lengths.to(device) if normalize == "mean" else scores


@torch.no_grad()
def generate_labels(model, encoder: Encoder, prompts: Sequence[list[int]],
                    max_new_tokens: int) -> list[tuple[int, str]]:
    """The notebook's method: greedy generation, then the label found in the answer (-1 when none is)."""
    device = next(p for p in model.parameters()).device
    pad = encoder.tokenizer.pad_token_id
    m = max(len(q) for q in prompts)
    ids = torch.full((len(prompts), m), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, q in enumerate(prompts):  # left padding, so every answer starts at column m
        ids[i, m - len(q):] = torch.tensor(q)
        mask[i, m - len(q):] = 1
    out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                         do_sample=False, pad_token_id=pad, eos_token_id=encoder.tokenizer.eos_token_id)
    texts = encoder.tokenizer.batch_decode(out[:, m:], skip_special_tokens=True)
    return [(match_label(t, encoder.labels), t) for t in texts]


def match_label(text: str, labels: Sequence[str]) -> int:
    """The label that appears first in the text (the longest one where several start there), or -1."""
    best = (len(text) + 1, 0, -1)
    for i, name in enumerate(labels):
        at = text.find(name)
        if at >= 0:
            best = min(best, (at, -len(name), i))
    return best[2]


def evaluate_examples(model, encoder: Encoder, examples, accelerator, batch_size: int, normalize: str = "sum",
                      shared: bool = True, method: str = "score", max_new_tokens: int = 10,
                      call_model=None, max_batch_tokens: int = 0) -> tuple[dict, list[dict]]:
    """Metrics and one prediction row per example, identical on every process.

    Questions are sorted by length and cut into batches of at most `batch_size` questions and, when
    `max_batch_tokens` is set, at most that many padded tokens: a row is as long as its batch's longest
    question plus the label trie, and questions run from 5 to 60 tokens, so the short ones go many to a
    batch and the long tail a few at a time.

    `call_model(fn)` runs `fn(model)` where the model's parameters are available: by default directly,
    during training through the wrapped module's forward (see LabelLoss).
    """
    call_model = call_model or (lambda fn: fn(model))
    from accelerate.utils import gather_object

    if not examples:
        raise EvalError("the split to evaluate is empty")
    rank, world = accelerator.process_index, accelerator.num_processes
    encoded = [encoder.encode(e.text) for e in examples]
    shortened = encoder.count_shortened(encoded, "questions", warn=accelerator.is_main_process)
    # One decision for every batch: each process must run as many forward passes as the others.
    use_shared = shared and method == "score" and all(encoder.shares_prefix(e) for e in encoded)
    p = len(encoder.prefix_ids) if use_shared else 0
    extra = len(encoder.trie.tokens) if method == "score" else max_new_tokens
    batches = length_batches([len(e.prompt_ids) - p for e in encoded], batch_size, max_batch_tokens, extra)
    prefix = call_model(lambda m: shared_prefix(m, encoder)) if use_shared else None
    rows = []
    rounds = batch_rounds(batches, rank, world)
    for chunk, counted in tqdm(rounds, desc="scoring" if method == "score" else "generating", unit="batch",
                               leave=False, dynamic_ncols=True, disable=not accelerator.is_main_process):
        prompts = [encoded[j].prompt_ids for j in chunk]
        if method == "score":
            scores = call_model(lambda m, prompts=prompts: score_prompts(m, encoder, prompts, prefix, normalize)).cpu()
            for j, sc in zip(chunk if counted else [], scores):
                rows.append({"index": j, "pred": int(sc.argmax()), "scores": [round(float(x), 4) for x in sc]})
        else:
            generated = generate_labels(model, encoder, prompts, max_new_tokens)
            for j, (pred, text) in zip(chunk if counted else [], generated):
                rows.append({"index": j, "pred": pred, "generated": text})
    rows = sorted(gather_object(rows), key=lambda r: r["index"])
    labels = list(encoder.labels)
    invalid = sum(r["pred"] < 0 for r in rows)
    names = labels + [INVALID] if invalid else labels
    gold = [examples[r["index"]].label for r in rows]
    pred = [r["pred"] if r["pred"] >= 0 else len(labels) for r in rows]
    metrics = compute_metrics(gold, pred, names)
    metrics["invalid"] = invalid
    metrics["shortened"] = shortened  # questions cut to fit the model's context
    out = []
    for r, g, p_ in zip(rows, gold, pred):
        e = examples[r["index"]]
        row = {"index": e.index, "text": e.text, "gold": labels[g], "pred": names[p_]}
        if "scores" in r:
            row["scores"] = dict(zip(labels, r["scores"]))
        else:
            row["generated"] = r["generated"]
        out.append(row)
    return metrics, out


def log_to_trackers(accelerator, metrics: dict, png: Path, step: int, prefix: str = "val") -> None:
    """W&B's extras beside the scalars every tracker gets: a per-class table and the confusion-matrix image."""
    if not accelerator.is_main_process or not any(t.name == "wandb" for t in accelerator.trackers):
        return
    import wandb
    run = accelerator.get_tracker("wandb", unwrap=True)
    table = wandb.Table(columns=["label", "precision", "recall", "f1", "support", "accuracy"],
                        data=[[k, v["precision"], v["recall"], v["f1"], v["support"], v["accuracy"]]
                              for k, v in metrics["per_class"].items()])
    run.log({f"{prefix}/per_class": table, f"{prefix}/confusion_matrix": wandb.Image(str(png))}, step=step)


def select_split(cfg, splits: dict) -> tuple[str, list]:
    """The examples named by eval.split: a split of data.path, or a data file of its own."""
    from .data import load_trec
    name = cfg.eval.split
    if name in splits:
        examples = splits[name]
    elif Path(name).exists():
        loaded = load_trec(name, cfg.data.task)
        examples = loaded.get("test") or loaded.get("train") or []
    else:
        raise EvalError(f"unknown split '{name}': {cfg.data.path} has {', '.join(sorted(splits))} "
                        "(or give a path to a data file)")
    if not examples:
        raise EvalError(f"split '{name}' is empty")
    return name, examples[: cfg.eval.max_examples or None]


def run(cfg) -> dict:
    """Evaluate the base model (zero-shot) or cfg.adapter on eval.split; write the reports to output_dir."""
    from .config import check_output_dir
    from .data import load_splits
    from .model import check_adapter, context_length, load_for_inference
    from .reports import format_report, plot_confusion_matrix, write_json, write_jsonl
    from .train import make_accelerator

    if cfg.adapter:  # before the data: a wrong adapter is the clearer error
        check_adapter(cfg.adapter, cfg)
    check_output_dir(cfg.output_dir)  # else an unwritable folder shows only after the evaluation
    split, examples = select_split(cfg, load_splits(cfg.data.path, cfg.data.task, cfg.data.val_fraction,
                                                    cfg.data.split_seed))
    accelerator = make_accelerator(cfg)
    model, tokenizer = load_for_inference(cfg, accelerator, cfg.adapter)
    encoder = Encoder(tokenizer, cfg.data.task, cfg.data.template, context_length(model))
    with accelerator.autocast(), out_of_memory("evaluation", EVAL_MEMORY_SETTINGS):
        metrics, rows = evaluate_examples(model, encoder, examples, accelerator, cfg.eval.batch_size,
                                          cfg.eval.normalize, True, cfg.eval.method, cfg.eval.max_new_tokens,
                                          max_batch_tokens=cfg.eval.max_batch_tokens)
    metrics.update(model=cfg.model.name, adapter=cfg.adapter or None, task=cfg.data.task, split=split,
                   method=cfg.eval.method)
    if accelerator.is_main_process:
        out = Path(cfg.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        write_json(metrics, out / "metrics.json")
        write_jsonl(rows, out / "predictions.jsonl")
        plot_confusion_matrix(metrics, out / "confusion_matrix.png")
        print(format_report(metrics))
        if cfg.eval.method == "generate":
            print(f"Answers that were not a valid label: {metrics['invalid']} of {metrics['n']}")
        print(f"Reports written to {out}/")
    return metrics
