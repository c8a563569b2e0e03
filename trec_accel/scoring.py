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

from typing import Sequence

import torch
from tqdm.auto import tqdm

from .batching import Encoder, batch_rounds, length_batches, tree_batch
from .forward import SharedPrefix, hidden_states, parts
from .reports import compute_metrics

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
    ids, pos, allow, n = tree_batch(trie, [q[p:] for q in prompts], p, encoder.tokenizer.pad_token_id, device)
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


def best_and_scores(scores: torch.Tensor) -> list[tuple[int, list[float]]]:
    """Per row of a (questions, labels) score matrix: the best label's id and every label's score, rounded to 4
    decimals as predictions show them; one transfer from the device."""
    return [(best, [round(x, 4) for x in row]) for best, row in zip(scores.argmax(1).tolist(), scores.tolist())]


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


def uses_shared_prefix(encoder: Encoder, encoded, method: str = "score") -> bool:
    """Whether scoring runs the instruction once for all batches: one decision for the whole set, since each
    process must run as many forward passes as the others."""
    return method == "score" and all(encoder.shares_prefix(e) for e in encoded)


def evaluate_examples(model, encoder: Encoder, examples, accelerator, ev, method: str = "score", shared: bool = True,
                      call_model=None, encoded=None) -> tuple[dict, list[dict]]:
    """Metrics and one prediction row per example, identical on every process; `ev` is the config's `eval`
    section (batch_size, max_batch_tokens, normalize, max_new_tokens).

    Questions are sorted by length and cut into batches of at most `ev.batch_size` questions and, when
    `ev.max_batch_tokens` is set, at most that many padded tokens: a row is as long as its batch's longest
    question plus the label trie, and questions run from 5 to 60 tokens, so the short ones go many to a
    batch and the long tail a few at a time.

    `call_model(fn)` runs `fn(model)` where the model's parameters are available: by default directly,
    during training through the wrapped module's forward (see LabelLoss). `encoded`: the questions already
    encoded without their labels (`encoder.encode(text)`), where the caller keeps them.
    """
    from accelerate.utils import gather_object

    if not examples:
        raise EvalError("the split to evaluate is empty")
    call_model = call_model or (lambda fn: fn(model))
    encoded = encoded if encoded is not None else encoder.encode_all([e.text for e in examples])
    shortened = encoder.count_shortened(encoded, "questions", warn=accelerator.is_main_process)
    use_shared = shared and uses_shared_prefix(encoder, encoded, method)
    p = len(encoder.prefix_ids) if use_shared else 0
    extra = len(encoder.trie.tokens) if method == "score" else ev.max_new_tokens
    batches = length_batches([len(e.prompt_ids) - p for e in encoded], ev.batch_size, ev.max_batch_tokens, extra)
    prefix = call_model(lambda m: shared_prefix(m, encoder)) if use_shared else None
    rows = []
    rounds = batch_rounds(batches, accelerator.process_index, accelerator.num_processes)
    for chunk, counted in tqdm(rounds, desc="scoring" if method == "score" else "generating", unit="batch",
                               leave=False, dynamic_ncols=True, disable=not accelerator.is_main_process):
        prompts = [encoded[j].prompt_ids for j in chunk]
        if method == "score":
            scores = call_model(lambda m, q=prompts: score_prompts(m, encoder, q, prefix, ev.normalize))
            for j, (best, sc) in zip(chunk if counted else [], best_and_scores(scores)):
                rows.append({"index": j, "pred": best, "scores": sc})
        else:
            generated = generate_labels(model, encoder, prompts, ev.max_new_tokens)
            for j, (pred, text) in zip(chunk if counted else [], generated):
                rows.append({"index": j, "pred": pred, "generated": text})
    metrics, out = report(sorted(gather_object(rows), key=lambda r: r["index"]), examples, list(encoder.labels))
    metrics["shortened"] = shortened  # questions cut to fit the model's context
    return metrics, out


def report(rows: list[dict], examples, labels: list[str]) -> tuple[dict, list[dict]]:
    """Metrics and the output rows from the gathered prediction rows (in example order)."""
    invalid = sum(r["pred"] < 0 for r in rows)
    names = labels + [INVALID] if invalid else labels
    gold = [examples[r["index"]].label for r in rows]
    pred = [r["pred"] if r["pred"] >= 0 else len(labels) for r in rows]
    metrics = compute_metrics(gold, pred, names)
    metrics["invalid"] = invalid
    out = []
    for r, g, p in zip(rows, gold, pred):
        e = examples[r["index"]]
        row = {"index": e.index, "text": e.text, "gold": labels[g], "pred": names[p]}
        if "scores" in r:
            row["scores"] = dict(zip(labels, r["scores"]))
        else:
            row["generated"] = r["generated"]
        out.append(row)
    return metrics, out
