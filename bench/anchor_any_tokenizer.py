"""The SuffixDecoding anchor's oracle replay (``shared/anchor/anchor_replay.py``) with any tokenizer
``quickdraft replay --oracle --tokenizer NAME`` takes, the prompts rendered exactly as that replay
renders them (Gemma 3 270M has no chat template: QuickDraft writes its turn format), so a
comparison on another vocabulary is like for like. Run it with the anchor's build on the path
(``shared/anchor/build_anchor.sh``)::

    PYTHONPATH=~/.cache/quickdraft-anchor/lib python -m quickdraft.bench.anchor_any_tokenizer \\
        ../shared/traces/swebench-dev --tokenizer gemma3-270m --tree --spec-factor 2 --min-prob 0.05

``--tokenizer`` is a catalog name or a path, as for ``quickdraft replay`` (``--gguf`` is not
needed: the catalog knows each model's file, and it is ignored); every other option is the
anchor script's own. ``$QUICKDRAFT_ANCHOR_DIR`` names the anchor's folder when it is not
``shared/anchor`` beside the checkout.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
from typing import Any

from quickdraft.bench.traces import find_shared
from quickdraft.catalog import chat_prompt_ids, load_tokenizer


def anchor_dir() -> pathlib.Path:
    if os.environ.get("QUICKDRAFT_ANCHOR_DIR"):
        return pathlib.Path(os.environ["QUICKDRAFT_ANCHOR_DIR"])
    found = find_shared("anchor/anchor_replay.py")
    if found is None:
        raise FileNotFoundError("no shared/anchor/anchor_replay.py found: set QUICKDRAFT_ANCHOR_DIR")
    return found.parent


class _Rendering:
    """The tokenizer, its chat template replaced by QuickDraft's rendering (the tokenizer itself,
    shared by every caller of ``load_tokenizer``, is left as it is)."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tokenizer, name)

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            tokenize: bool = True) -> list[int]:
        return chat_prompt_ids(self._tokenizer, messages, add_generation_prompt)


def _tokenizer(name: str, gguf: str | None = None) -> _Rendering:
    # The anchor script's loader takes (path, gguf file); the catalog resolves both from the name.
    return _Rendering(load_tokenizer(name))


def main() -> None:
    spec = importlib.util.spec_from_file_location("anchor_replay", anchor_dir() / "anchor_replay.py")
    anchor = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(anchor)
    anchor.load_tokenizer = _tokenizer
    anchor.main()


if __name__ == "__main__":
    main()
