"""Where a batch is made: prompts become token ids, and token ids become padded tensors.

Each prompt is tokenized as one string, and the token boundaries of its parts are read off the offsets, so
training, scoring and free generation all see the tokens the model would see for the whole text. The
instruction's tokens (`prefix_ids`) are the same for every question of a task; a batch keeps them apart
from the per-question tokens so that the model can run them once per batch (see `forward.py`). Evaluation's
rows (`tree_batch`) put every candidate label after its question, as a trie under a tree-shaped mask.
"""
from __future__ import annotations

import dataclasses
import logging
import random
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from .prompts import Prompt, prompt_format
from .task import Task

IGNORE = -100

log = logging.getLogger("trec_accel")


class PromptTokenError(ValueError):
    """A prompt whose parts do not fall on token boundaries."""


@dataclass(frozen=True)
class Encoded:
    prompt_ids: list[int]  # prefix + question + cue
    label_ids: list[int]   # answer + end; empty when the label is to be predicted
    shortened: bool = False  # the question was cut to fit the model's context (see `Encoder`)


class Encoder:
    """Renders and tokenizes prompts of one task with one template. A label's tokens are those that follow the cue
    in the whole prompt: the training targets, the scoring trie's candidates and what generation is read against.

    With `max_length` (the model's context, in positions), a question whose prompt, followed by the longest label,
    would not fit is cut from its end to the longest start of it that fits; the instruction and the cue are kept.
    Callers report how many were cut (`count_shortened`).
    """

    def __init__(self, tokenizer, task: Task, template: str, max_length: int | None = None):
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError("trec-accel needs a fast (Rust) tokenizer: token offsets locate the label")
        self.tokenizer, self.task, self.labels = tokenizer, task, task.labels
        self.format = prompt_format(template, task, tokenizer)
        p = self.prompt("What is this ?")
        (ids,), (offsets,) = self._tokens([p.text])
        # The instruction's tokens as they come out inside a whole prompt (BOS included).
        self.prefix_ids: list[int] = [t for t, (s, e) in zip(ids, offsets) if e <= len(p.prefix)]
        # Candidate label sequences (answer + end), the same after every question: checked in `encode`.
        n = len(self.labels)
        self.candidates: list[list[int]] = [e.label_ids for e in self._encode_all(["What is this ?"] * n, range(n))]
        if len(set(map(tuple, self.candidates))) < len(self.candidates):
            raise PromptTokenError(f"two labels of the {task.name} task are the same tokens for this tokenizer; "
                                   "make them differ in more than spacing")
        self.trie = LabelTrie(self.candidates)
        self.max_length = max_length
        self.longest_label = max(len(c) for c in self.candidates)  # tokens after a prompt, at most
        if max_length is not None and not self._fits(bare := self._encode("", None)):
            raise PromptTokenError(f"the prompt without a question and the longest label take "
                                   f"{len(bare.prompt_ids) + self.longest_label} tokens, more than the model's "
                                   f"context of {max_length}: use a model with a longer context")

    def _tokens(self, texts: Sequence[str]) -> tuple[list[list[int]], list[list[tuple[int, int]]]]:
        """Token ids and character offsets of every text, in one call into the Rust tokenizer."""
        enc = self.tokenizer(list(texts), add_special_tokens=True, return_offsets_mapping=True)
        return enc["input_ids"], enc["offset_mapping"]

    def prompt(self, question: str, label: int | None = None) -> Prompt:
        return self.format.render(question, None if label is None else self.labels[label])

    def encode(self, question: str, label: int | None = None) -> Encoded:
        return self.encode_all([question], None if label is None else [label])[0]

    def encode_all(self, questions: Sequence[str], labels: Sequence[int] | None = None) -> list[Encoded]:
        """`encode` of every question (with its label where `labels` is given), the tokenizer run once over all
        of them: a data set costs one call into the Rust tokenizer instead of one per question."""
        labels = [None] * len(questions) if labels is None else labels
        return [self._checked(q, y, enc) for q, y, enc in zip(questions, labels, self._encode_all(questions, labels))]

    def _checked(self, question: str, label: int | None, enc: Encoded) -> Encoded:
        """`enc` (the encoding of `question`) checked against the label's candidate, and cut to fit the context."""
        if label is not None and enc.label_ids != self.candidates[label]:
            # Scoring ranks the candidates' tokens: training must target the same ones.
            raise PromptTokenError(f"the label {self.labels[label]!r} tokenizes differently after the question "
                                   f"{question!r} than after others, so scoring could not rank what training targets")
        if self.max_length is None or self._fits(enc):
            return enc
        keep, over = 0, len(question)  # question[:keep] fits, question[:over] does not
        while over - keep > 1:
            mid = (keep + over) // 2
            keep, over = (mid, over) if self._fits(self._encode(question[:mid], label)) else (keep, mid)
        return dataclasses.replace(self._encode(question[:keep], label), shortened=True)

    def _fits(self, enc: Encoded) -> bool:
        return len(enc.prompt_ids) + self.longest_label <= self.max_length

    def count_shortened(self, encoded: Sequence[Encoded], what: str, warn: bool = True) -> int:
        """How many of `encoded` had their question cut to fit; said in a warning (where `warn`) when any was."""
        n = sum(e.shortened for e in encoded)
        if n and warn:
            log.warning("%d of %d %s are too long for the model's context (%d positions, with the instruction and the "
                        "longest label): each was cut from its end to fit", n, len(encoded), what, self.max_length)
        return n

    def _encode(self, question: str, label: int | None) -> Encoded:
        return self._encode_all([question], [label])[0]

    def _encode_all(self, questions: Sequence[str], labels: Sequence[int | None]) -> list[Encoded]:
        """The prompts of `questions` (with `labels` where not None), tokenized and split; not yet checked."""
        prompts = [self.prompt(q, y) for q, y in zip(questions, labels)]
        ids, offsets = self._tokens([p.text for p in prompts])
        return [self._split(p, i, o) for p, i, o in zip(prompts, ids, offsets)]

    def _split(self, p: Prompt, ids: list[int], offsets: list[tuple[int, int]]) -> Encoded:
        """A tokenized prompt cut into its prompt and answer tokens by the characters' offsets."""
        cut = len(p.prefix) + len(p.question)  # first character of the answer
        n_prompt = sum(1 for s, e in offsets if e <= cut or (s == e == 0))
        if any(s < cut < e for s, e in offsets):
            raise PromptTokenError(f"a token spans the end of the prompt and the start of the label in {p.text!r}")
        return Encoded(ids[:n_prompt], ids[n_prompt:])

    def shares_prefix(self, enc: Encoded) -> bool:
        n = len(self.prefix_ids)
        return enc.prompt_ids[:n] == self.prefix_ids and len(enc.prompt_ids) > n


class LabelTrie:
    """The candidate label sequences as a trie: labels that begin alike share their first tokens.

    Node j stands for a proper prefix of one or more candidates; feeding its last token after the question
    gives the distribution of the next token of every candidate through it. A candidate's last token is
    only predicted, never fed. The fine labels share their coarse part ("LOC:city", "LOC:country"), so the
    50 fine candidates need 86 fed tokens rather than 219 (Mistral tokenizer).
    """

    def __init__(self, candidates: Sequence[list[int]]):
        index: dict[tuple[int, ...], int] = {}
        self.tokens, self.depth, self.parent = [], [], []   # per node: token fed, its depth (1..), parent or -1
        for cand in candidates:
            for j in range(1, len(cand)):
                key = tuple(cand[:j])
                if key not in index:
                    index[key] = len(self.tokens)
                    self.tokens.append(cand[j - 1])
                    self.depth.append(j)
                    self.parent.append(index[key[:-1]] if j > 1 else -1)
        n = len(self.tokens)
        # ancestor[j, k]: node k is node j or one of its ancestors (what node j attends to besides the prompt).
        self.ancestor = torch.eye(n, dtype=torch.bool)
        for j in range(n):
            if self.parent[j] >= 0:
                self.ancestor[j] |= self.ancestor[self.parent[j]]
        # Every scored token as (column, token, label): column 0 is the question's last position, 1 + j is node j.
        cols, toks, labs = [], [], []
        for k, cand in enumerate(candidates):
            for j, t in enumerate(cand):
                cols.append(0 if j == 0 else 1 + index[tuple(cand[:j])])
                toks.append(t)
                labs.append(k)
        self.columns, self.targets = torch.tensor(cols), torch.tensor(toks)
        self.incidence = torch.zeros((len(cols), len(candidates)))   # scored token -> its label
        self.incidence[torch.arange(len(cols)), torch.tensor(labs)] = 1.0
        self.lengths = torch.tensor([len(c) for c in candidates], dtype=torch.float32)


def tree_batch(trie: LabelTrie, prompts: Sequence[list[int]], p: int, pad_id: int, device=None):
    """Inputs, positions and the tree mask for scoring every candidate after each prompt, on `device`.

    `prompts` are the per-question tokens after the shared prefix of length `p` (p = 0: whole prompts).
    A row holds the question padded to the batch's longest (m tokens), then the trie's nodes, each at the
    position it would have right after its own question and attending to the prompt and its ancestors.
    The mask (B, 1, m + k, p + m + k) is built where it is used: on the CPU it cost more than the forward pass.
    """
    lengths = [len(q) for q in prompts]
    m, b, k = max(lengths), len(prompts), len(trie.tokens)
    ids = torch.tensor([q + [pad_id] * (m - len(q)) + trie.tokens for q in prompts], dtype=torch.long).to(device)
    n = torch.tensor(lengths, device=device)
    depth = torch.tensor(trie.depth, device=device)
    pos = torch.cat([torch.arange(m, device=device).expand(b, m), n[:, None] + depth[None] - 1], 1) + p
    r = torch.arange(m, device=device)
    real = r[None, :] < n[:, None]                                          # (B, m) question tokens, not padding
    # Question rows: causal over real tokens; a padding row sees itself only (its output is never used).
    q_rows = (r[None, :, None] >= r[None, None, :]) & (real[:, None, :] | (r[:, None] == r[None, :])[None])
    node_rows = torch.cat([real[:, None, :].expand(b, k, m), trie.ancestor.to(device).expand(b, k, k)], 2)
    q_rows = torch.cat([q_rows, torch.zeros((b, m, k), dtype=torch.bool, device=device)], 2)
    allow = torch.cat([torch.ones((b, m + k, p), dtype=torch.bool, device=device),
                       torch.cat([q_rows, node_rows], 1)], 2)
    return ids, pos, allow.unsqueeze(1), n


@dataclass
class Batch:
    """Padded tensors of one micro-batch.

    `prefix_ids` (1, P) holds the shared instruction when the batch is made for the shared-prefix path;
    then `input_ids` (B, S) holds only what follows it. On the plain path `prefix_ids` is None and
    `input_ids` holds whole sequences. The loss is taken at K label slots per row: `label_positions` (B, K)
    are the columns whose next token is a label token, `label_targets` (B, K) those tokens, IGNORE in the
    slots a shorter label leaves empty. Shapes depend only on the batch size, the padded width and K, so a
    batch of a known shape can be replayed from a CUDA graph.
    """
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    label_positions: torch.Tensor
    label_targets: torch.Tensor
    prefix_ids: torch.Tensor | None = None

    @property
    def n_label_tokens(self) -> int:
        return int((self.label_targets != IGNORE).sum())

    @property
    def n_tokens(self) -> int:
        """Tokens the model runs: the prefix once, plus the unpadded per-example tokens."""
        return self.prefix_length + int(self.attention_mask.sum())

    @property
    def prefix_length(self) -> int:
        return 0 if self.prefix_ids is None else self.prefix_ids.shape[1]

    @property
    def shape(self) -> tuple[int, ...]:
        """What a CUDA graph of this batch is keyed by: batch, width, label slots, prefix length."""
        return (*self.input_ids.shape, self.label_targets.shape[1], self.prefix_length)

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return tuple(t for t in (self.input_ids, self.attention_mask, self.label_positions, self.label_targets,
                                 self.prefix_ids) if t is not None)

    def to(self, device) -> "Batch":
        def move(t):
            return None if t is None else t.to(device, non_blocking=True)

        return Batch(*(move(t) for t in (self.input_ids, self.attention_mask, self.label_positions,
                                         self.label_targets, self.prefix_ids)))


def padded_width(length: int, multiple: int) -> int:
    """`length` tokens rounded up to a multiple of `multiple`: the width a batch is padded to (`collate`)."""
    return -(-length // multiple) * multiple


def collate(examples: Sequence[Encoded], pad_id: int, prefix_ids: Sequence[int] | None = None,
            label_slots: int = 0, width_multiple: int = 1) -> Batch:
    """Right-pad to the longest sequence of the batch, rounded up to `width_multiple` (so that widths repeat);
    with `prefix_ids`, cut the shared prefix off each one. `label_slots` fixes K (at least the longest label
    of the batch; 0: exactly that)."""
    p = len(prefix_ids) if prefix_ids is not None else 0
    seqs = [(e.prompt_ids + e.label_ids)[p:] for e in examples]
    longest = max(len(s) for s in seqs)
    width = padded_width(longest, width_multiple)
    k = max(label_slots, max(len(e.label_ids) for e in examples))
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    positions = torch.zeros((len(seqs), k), dtype=torch.long)
    targets = torch.full((len(seqs), k), IGNORE, dtype=torch.long)
    for i, (s, e) in enumerate(zip(seqs, examples)):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
        n = len(e.label_ids)
        # Position t predicts token t + 1: the label's tokens are predicted from the n positions before them.
        positions[i, :n] = torch.arange(len(s) - n - 1, len(s) - 1)
        targets[i, :n] = torch.tensor(e.label_ids, dtype=torch.long)
    prefix = torch.tensor([list(prefix_ids)], dtype=torch.long) if prefix_ids is not None else None
    return Batch(ids, mask, positions, targets, prefix)


def row_width(e: Encoded, p: int, width_multiple: int) -> int:
    """The padded width of `e`'s row after the `p` shared-prefix tokens (see `collate`)."""
    return padded_width(len(e.prompt_ids) + len(e.label_ids) - p, width_multiple)


def passes(examples: Sequence[Encoded], p: int, width_multiple: int, max_tokens: int) -> list[list[int]]:
    """The rows of one micro-batch (indices into `examples`) as the forward/backward passes that run them: one
    pass in the given order when its padded tokens (rows x width after the `p` prefix tokens, rounded up to
    `width_multiple`) are within `max_tokens` (0: no cap), else length-sorted passes that each are. Their
    gradients add up to the micro-batch's, since the loss is a sum over label tokens."""
    widths = [row_width(e, p, width_multiple) for e in examples]
    if not max_tokens or len(widths) * max(widths) <= max_tokens:
        return [list(range(len(examples)))]
    return length_batches(widths, len(widths), max_tokens)


def epoch_order(lengths: Sequence[int], seed: int, epoch: int, group_by_length: bool, batch: int) -> list[int]:
    """The data order of one epoch: a seeded shuffle, the same on every process and after a resume.

    With `group_by_length`, the shuffle is cut into mega-batches of 50 batches, each sorted by length, and
    the batches are shuffled again, so batches pad little and still come in random order.
    """
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    if not group_by_length:
        return order
    mega = batch * 50
    batches = []
    for i in range(0, len(order), mega):
        chunk = sorted(order[i : i + mega], key=lambda j: lengths[j], reverse=True)
        batches += [chunk[k : k + batch] for k in range(0, len(chunk), batch)]
    rng.shuffle(batches)
    return [j for b in batches for j in b]


def shard(items: Sequence, rank: int, world: int) -> list:
    """This process's share of a global batch: contiguous slices, the last ones possibly shorter."""
    per = -(-len(items) // world)
    return list(items[rank * per : (rank + 1) * per])


def batch_rounds(batches: Sequence, rank: int, world: int) -> list[tuple[object, bool]]:
    """This process's evaluation batches as (batch, counted): batches rank, rank+W, rank+2W, ...

    Every process gets the same number: under ZeRO-3 and FSDP each forward pass gathers weights from all
    processes, so one with a batch fewer runs the last batch again, not counted.
    """
    rounds = -(-len(batches) // world)
    return [(batches[i], True) if (i := rank + k * world) < len(batches) else (batches[-1], False)
            for k in range(rounds)]


def length_batches(lengths: Sequence[int], max_items: int, max_tokens: int = 0, extra: int = 0) -> list[list[int]]:
    """Indices sorted by length, cut into batches of at most `max_items`, and, when `max_tokens` is set,
    of at most that many padded tokens (items x (longest + `extra`)); a single item always makes a batch."""
    order = sorted(range(len(lengths)), key=lambda j: lengths[j])
    batches: list[list[int]] = []
    for j in order:
        cur = batches[-1] if batches else None
        if cur is None or len(cur) >= max_items or (max_tokens and (len(cur) + 1) * (lengths[j] + extra) > max_tokens):
            batches.append([j])
        else:
            cur.append(j)
    return batches


def micro_batches(order: Sequence[int], start: int, global_batch: int) -> Iterator[tuple[int, list[int]]]:
    """Yield (position after the batch, indices) for each full global micro-batch from `start` on.

    A ragged tail is dropped (as `drop_last` does), so every process gets a full share of every batch; the
    seeded shuffle drops different examples each epoch.
    """
    for i in range(start, len(order) - global_batch + 1, global_batch):
        yield i + global_batch, list(order[i : i + global_batch])
