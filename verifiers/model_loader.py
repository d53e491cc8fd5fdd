"""Load a target model with torch + transformers, offline, and cache the conversion.

Packaged GGUF files are de-quantised by transformers on first load (tens of
seconds); the result is written once as safetensors under the QuickDraft cache
so the next start of a worker takes seconds.
"""

from __future__ import annotations

import logging
import os
import pathlib
import shutil
from dataclasses import dataclass

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from quickdraft.catalog import gguf_location, load_tokenizer, model_cache_dir, resolve
from quickdraft.verifiers import attention, exact_quant, prefill_mlp, small_linear

log = logging.getLogger(__name__)


@dataclass(slots=True)
class LoadedModel:
    name: str
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    device: torch.device
    dtype: torch.dtype
    # Linear layers routed through the batch-invariant kernel (verifiers/small_linear.py); 0: none.
    invariant_linears: int = 0
    # Precision of prefill chunks' matrix products when it differs from ``dtype`` (None: the same).
    prefill_dtype: torch.dtype | None = None
    # Precision of the kernel's products in verification passes when it differs from ``dtype``
    # (bf16 on AMX tiles; None: the same). Every pass of the model uses it, with speculation on or off.
    decode_dtype: torch.dtype | None = None


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def pick_dtype(device: torch.device, dtype: str = "auto") -> torch.dtype:
    if dtype == "auto":
        # bf16 where the hardware runs it fast; fp32 on CPU keeps greedy decoding stable.
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


def _convert_gguf(name: str) -> str:
    """Path of a transformers model directory for a packaged GGUF model, converting once."""
    spec = resolve(name)
    target = model_cache_dir(spec) / "weights"
    if (target / "config.json").exists():
        return str(target)
    directory, gguf = gguf_location(spec)
    log.info("converting %s from GGUF (first start only)", spec.name)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=gguf, dtype=torch.float32)
    # The de-quantised weights are plain tensors now; drop the GGUF marker so they can be saved.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = target.with_name(f"weights.tmp{os.getpid()}")
    model.save_pretrained(tmp)
    try:
        tmp.replace(target)
    except OSError:  # another process converted it first
        shutil.rmtree(tmp, ignore_errors=True)
    return str(target)


def checkpoint_path(name: str) -> str:
    """The transformers model directory for ``name`` (a packaged GGUF model is converted once)."""
    spec = resolve(name)
    return spec.path or _convert_gguf(name)


def pick_prefill_dtype(device: torch.device, dtype: torch.dtype, prefill_dtype: str = "auto") -> torch.dtype | None:
    """bf16 prefill products for an fp32 CPU model where the CPU multiplies bf16 in hardware (AMX tiles
    or AVX-512 BF16) (auto), or when asked. Prefill is the same with speculation on and off, so either
    choice keeps them identical; bf16 shortens every call's time to first token (bench/RESULTS.md)."""
    if device.type != "cpu" or dtype != torch.float32 or prefill_dtype == "float32":
        return None
    if prefill_dtype == "bfloat16" or (prefill_dtype == "auto" and small_linear.bf16_isa() is not None):
        return torch.bfloat16
    if prefill_dtype != "auto":
        raise ValueError(f"prefill dtype {prefill_dtype!r}: use auto, float32 or bfloat16")
    return None


def pick_decode_dtype(invariant_linears: int, decode_dtype: str = "auto") -> torch.dtype | None:
    """bf16 products in verification passes where the kernel is installed and the CPU multiplies bf16
    (AMX tiles or AVX-512 BF16) (auto), or when asked. Every pass, speculative or plain, uses the same
    kernel, so outputs stay identical both ways; the bf16 kernel halves the weights a pass streams and
    makes its extra rows cheap, nearly free on tiles (bench/RESULTS.md)."""
    if decode_dtype not in ("auto", "float32", "bfloat16"):
        raise ValueError(f"decode dtype {decode_dtype!r}: use auto, float32 or bfloat16")
    if not invariant_linears or decode_dtype == "float32":
        return None
    if decode_dtype == "bfloat16" or small_linear.bf16_isa() is not None:
        return torch.bfloat16
    return None


def set_decode_dtype(loaded: LoadedModel, dtype: torch.dtype | None) -> None:
    """Switch a loaded model's verification passes between the bf16 kernels (linear layers, and
    attention where the CPU has AMX tiles or AVX-512 BF16) and the fp32 ones. Speculative and plain passes must use
    the same one."""
    small_linear.use_bf16_kernel(loaded.model, on=dtype is not None)
    loaded.decode_dtype = dtype


BLOCKS_CACHE = "gguf_blocks.safetensors"


def weights_stamp(directory: pathlib.Path) -> str:
    """The names, sizes and times of a checkpoint's weights files: what the blocks cache is marked with."""
    return ";".join(f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}"
                    for f in sorted(directory.glob("*.safetensors")) if f.name != BLOCKS_CACHE)


def _use_block_weights(model: PreTrainedModel, converted: str | None) -> tuple[int, int]:
    """``small_linear.use_block_weights``, cached beside a converted GGUF checkpoint (``converted``) so
    the next start reads the blocks instead of searching them (marked with the weights files' sizes
    and times: a new conversion searches again)."""
    if converted is None:
        layers, nbytes, _ = small_linear.use_block_weights(model)
        return layers, nbytes
    directory = pathlib.Path(converted)
    stamp = weights_stamp(directory)
    known = exact_quant.load(directory / BLOCKS_CACHE, stamp)
    layers, nbytes, found = small_linear.use_block_weights(model, known=known)
    if found and (found.keys() != known.keys() or any(found[k] is not known[k] for k in found)):
        try:
            exact_quant.save(directory / BLOCKS_CACHE, found, stamp)
        except Exception as exc:  # a read-only or full disk: search again next time (safetensors raises its own)
            log.warning("could not cache the GGUF blocks in %s: %s", directory, exc)
    return layers, nbytes


def load_model(name: str, device: str = "auto", dtype: str = "auto", prefill_dtype: str = "auto",
               decode_dtype: str = "auto") -> LoadedModel:
    spec = resolve(name)
    dev = pick_device(device)
    dt = pick_dtype(dev, dtype)
    path = checkpoint_path(name)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dt, attn_implementation=attention.NAME)
    model.to(dev)
    model.eval()
    if dev.type == "cuda":
        # cuDNN's attention builds an execution plan per tensor shape, and a decoding session's
        # key length grows every step: a plan build on every pass. Where torch prefers cuDNN
        # (bf16 on Hopper), that is the likely cause of bf16 steps costing ~3x fp32 ones in the
        # stack on an H200 while a fixed-shape pass cost the same (bench/RESULTS.md, "On a GPU").
        # The memory-efficient kernel takes the same masks without per-shape plans.
        torch.backends.cuda.enable_cudnn_sdp(False)
    # fp32 on CPU: the kernel is faster than BLAS at verification sizes and keeps every row's
    # result independent of the rows beside it (CUDA and bf16 keep torch's own kernels).
    invariant = small_linear.install(model) if dev.type == "cpu" and dt == torch.float32 else 0
    if invariant:
        log.info("%d linear layers use the batch-invariant %s kernel", invariant, small_linear.isa())
    tokenizer = load_tokenizer(name)
    loaded = LoadedModel(spec.name, model, tokenizer, dev, dt, invariant, pick_prefill_dtype(dev, dt, prefill_dtype))
    if loaded.prefill_dtype == torch.bfloat16:
        fused = prefill_mlp.install(model)
        if fused:
            log.info("%d MLPs take the fused bf16 prefill path", fused)
    decode = pick_decode_dtype(invariant, decode_dtype)
    if decode is not None:
        set_decode_dtype(loaded, decode)  # a clear error where the CPU multiplies no bf16
        log.info("verification passes multiply in bf16 (%s)", small_linear.bf16_isa())
    elif invariant:
        layers, nbytes = _use_block_weights(model, path if spec.path is None else None)
        if layers:
            log.info("%d of %d linear layers read their GGUF blocks in verification passes (%.0f MB; the same "
                     "results as their fp32 weights)", layers, invariant, nbytes / 1e6)
    return loaded
