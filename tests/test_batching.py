import pytest

from trec_accel.batching import (
    IGNORE,
    Encoded,
    Encoder,
    batch_rounds,
    collate,
    epoch_order,
    length_batches,
    micro_batches,
    passes,
    shard,
)
from trec_accel.labels import COARSE_LABELS, FINE_LABELS
from trec_accel.task import BUILTIN, COARSE


@pytest.fixture(params=["coarse", "fine"])
def encoder(request, tokenizer):
    return Encoder(tokenizer, BUILTIN[request.param], "notebook")


def test_prompt_is_the_notebook_format(encoder):
    p = encoder.prompt("Who wrote Hamlet ?", 3)
    assert p.prefix.startswith("[INST] ") and p.prefix.endswith(" [/INST]\n")
    assert p.question == " Who wrote Hamlet ? ="
    assert p.answer == " " + encoder.labels[3] and p.end == "</s>"
    assert p.text.endswith("\n Who wrote Hamlet ? = " + encoder.labels[3] + "</s>")
    if encoder.task.name == "fine":
        assert all(name in p.prefix for name in FINE_LABELS)
    else:
        assert all(name in p.prefix for name in COARSE_LABELS)


def test_tokens_are_those_of_the_whole_text(encoder, tokenizer):
    for label in range(len(encoder.labels)):
        e = encoder.encode("How far is it from Denver to Aspen ?", label)
        whole = tokenizer(encoder.prompt("How far is it from Denver to Aspen ?", label).text)["input_ids"]
        assert e.prompt_ids + e.label_ids == whole
        assert e.label_ids == encoder.candidates[label]
        assert e.label_ids[-1] == tokenizer.eos_token_id
        assert tokenizer.decode(e.label_ids, skip_special_tokens=True).strip() == encoder.labels[label]
        assert encoder.shares_prefix(e)


def test_encode_all_is_encode_of_each(encoder, tokenizer):
    questions = ["Who wrote Hamlet ?", "How far is it from Denver to Aspen ?", "What is été in English ?",
                 "Why " + "very " * 60 + "long ?"]
    labels = [0, 1, 2, 3]
    assert encoder.encode_all(questions) == [encoder.encode(q) for q in questions]
    assert encoder.encode_all(questions, labels) == [encoder.encode(q, y) for q, y in zip(questions, labels)]
    # With a context too short for the long question, both cut it the same way.
    short = Encoder(tokenizer, encoder.task, "notebook", len(encoder.prefix_ids) + encoder.longest_label + 30)
    cut = short.encode_all(questions, labels)
    assert cut == [short.encode(q, y) for q, y in zip(questions, labels)]
    assert [e.shortened for e in cut] == [False, False, False, True]


def test_prompt_without_label_is_the_prefix_of_the_labelled_one(encoder):
    q = "What is the oldest university in the US ?"
    assert encoder.encode(q).prompt_ids == encoder.encode(q, 2).prompt_ids
    assert encoder.encode(q).label_ids == []


def test_loss_slots_are_the_label_tokens_only(encoder, tokenizer):
    exs = [encoder.encode("Who is Colin Powell ?", 3),
           encoder.encode("What is the population of the city of Mumbai ?", 5)]
    for prefix in (None, encoder.prefix_ids):
        for slots, multiple in ((0, 1), (6, 16)):
            b = collate(exs, tokenizer.pad_token_id, prefix, label_slots=slots, width_multiple=multiple)
            p = 0 if prefix is None else len(prefix)
            longest = max(len(e.prompt_ids) + len(e.label_ids) - p for e in exs)
            assert b.input_ids.shape[1] == -(-longest // multiple) * multiple
            assert b.label_targets.shape[1] == max(slots, max(len(e.label_ids) for e in exs))
            for i, e in enumerate(exs):
                seq = (e.prompt_ids + e.label_ids)[p:]
                n = len(e.label_ids)
                # Exactly the label tokens (answer + EOS) are targets, each predicted from the position before it.
                assert b.label_targets[i, :n].tolist() == e.label_ids
                assert (b.label_targets[i, n:] == IGNORE).all()
                assert b.input_ids[i, b.label_positions[i, :n] + 1].tolist() == e.label_ids
                assert b.label_positions[i, 0] == len(e.prompt_ids) - p - 1
                assert (b.attention_mask[i, len(seq):] == 0).all() and (b.attention_mask[i, : len(seq)] == 1).all()
                assert b.input_ids[i, : len(seq)].tolist() == seq
            assert b.n_label_tokens == sum(len(e.label_ids) for e in exs)
    shared = collate(exs, tokenizer.pad_token_id, encoder.prefix_ids)
    assert shared.prefix_ids[0].tolist() == encoder.prefix_ids


def test_epoch_order_is_a_seeded_permutation():
    lengths = list(range(100))
    a = epoch_order(lengths, 42, 0, False, 8)
    assert sorted(a) == lengths and a == epoch_order(lengths, 42, 0, False, 8)
    assert a != epoch_order(lengths, 42, 1, False, 8) and a != epoch_order(lengths, 7, 0, False, 8)
    g = epoch_order(lengths, 42, 0, True, 4)
    assert sorted(g) == lengths
    # Length grouping: each batch of 4 spans similar lengths (sorted within mega-batches).
    spreads = [max(lengths[j] for j in g[i:i + 4]) - min(lengths[j] for j in g[i:i + 4]) for i in range(0, 100, 4)]
    assert sum(spreads) / len(spreads) < 10


def test_shards_and_micro_batches_partition_the_data():
    order = list(range(10))
    assert [shard(order[:4], r, 2) for r in range(2)] == [[0, 1], [2, 3]]
    batches = list(micro_batches(order, 0, 4))
    assert [b for _, b in batches] == [[0, 1, 2, 3], [4, 5, 6, 7]]  # the ragged tail is dropped
    assert [p for p, _ in batches] == [4, 8]
    assert [b for _, b in micro_batches(order, 4, 4)] == [[4, 5, 6, 7]]


def test_slow_tokenizer_is_refused():
    class Slow:
        is_fast = False
    with pytest.raises(ValueError, match="fast"):
        Encoder(Slow(), COARSE, "notebook")


@pytest.mark.parametrize("n, world", [(5, 2), (4, 2), (1, 3), (7, 3), (3, 1)])
def test_batch_rounds_count_every_batch_once_with_equal_rounds(n, world):
    batches = [[i] for i in range(n)]
    per_rank = [batch_rounds(batches, r, world) for r in range(world)]
    assert len({len(rounds) for rounds in per_rank}) == 1  # ZeRO-3 / FSDP: the same number of forward passes
    counted = sorted(b[0] for rounds in per_rank for b, c in rounds if c)
    assert counted == list(range(n))
    assert sum(not c for rounds in per_rank for _, c in rounds) == -n % world


@pytest.mark.parametrize("task", ["coarse", "fine"])
def test_label_trie_feeds_each_shared_label_beginning_once(tokenizer, task):
    enc = Encoder(tokenizer, BUILTIN[task], "notebook")
    trie, cands = enc.trie, enc.candidates
    beginnings = {tuple(c[:j]) for c in cands for j in range(1, len(c))}
    assert len(trie.tokens) == len(beginnings)
    if task == "fine":  # "LOC:city" and "LOC:country" share "LOC:"
        assert len(trie.tokens) < sum(len(c) - 1 for c in cands) / 2
    for j in range(len(trie.tokens)):  # a node's ancestors spell the label beginning it stands for
        path = [trie.tokens[k] for k in range(len(trie.tokens)) if trie.ancestor[j, k]]
        assert tuple(path) in beginnings and len(path) == trie.depth[j]
    for k, c in enumerate(cands):  # each label is scored on exactly its own tokens, each after its beginning
        rows = trie.incidence[:, k].nonzero().flatten()
        assert trie.targets[rows].tolist() == c
        for j, r in enumerate(rows.tolist()[1:], start=1):
            node = int(trie.columns[r]) - 1
            assert [trie.tokens[x] for x in range(len(trie.tokens)) if trie.ancestor[node, x]] == c[:j]


def test_length_batches_cap_items_and_padded_tokens():
    lengths = [30, 5, 6, 5, 60, 7, 8, 6, 59, 10]
    batches = length_batches(lengths, max_items=4, max_tokens=100, extra=10)
    assert sorted(j for b in batches for j in b) == list(range(len(lengths)))
    flat = [lengths[j] for b in batches for j in b]
    assert flat == sorted(lengths)
    for b in batches:
        assert len(b) <= 4
        assert len(b) == 1 or len(b) * (max(lengths[j] for j in b) + 10) <= 100
    assert [len(b) for b in batches] == [4, 3, 1, 1, 1]  # short ones up to four at a time, the long tail alone
    assert [len(b) for b in length_batches(lengths, max_items=4)] == [4, 4, 2]


def test_passes_keep_a_micro_batch_whole_under_the_cap_and_split_it_sorted_over_it():
    # rows of 4 prefix tokens + 2..14 question and label tokens; widths after the prefix padded to 4
    examples = [Encoded(list(range(4 + n)), [7]) for n in (5, 1, 12, 3, 6)]
    widths = [8, 4, 16, 4, 8]
    assert passes(examples, 4, 4, 0) == [[0, 1, 2, 3, 4]]      # no cap: one pass, the order kept
    assert passes(examples, 4, 4, 5 * 16) == [[0, 1, 2, 3, 4]]  # 5 rows x 16 fit exactly
    groups = passes(examples, 4, 4, 24)
    assert sorted(j for g in groups for j in g) == [0, 1, 2, 3, 4]
    assert [widths[j] for g in groups for j in g] == sorted(widths)  # short rows first, as length_batches cuts
    for g in groups:
        assert len(g) * max(widths[j] for j in g) <= 24
    assert [len(g) for g in groups] == [3, 1, 1]                # 4, 4, 8 | 8 | 16: the long tail alone
    assert passes(examples, 4, 4, 1) == [[1], [3], [0], [4], [2]]  # a single row always makes a pass
