"""Prior text: public text every tenant's suffix drafts may copy from.

A tenant's first calls have no earlier responses to copy, and an agent's own wording (the code it
writes, the idioms around it) is often text that no session has shown yet but that public code
has. The suffix drafter therefore keeps, per vocabulary, a third index beside the session's and
the tenant's: the prior text, consulted at a lower weight (``SuffixParams.prior_weight``).
It holds no tenant's data, so one copy serves every tenant of that vocabulary.

The default source is the standard library of the Python running QuickDraft (its ``.py`` files,
leaving out every path with "test" in a part of it, and installed packages): public, on every
machine that runs the proxy, and the language most coding agents write. A folder of text files
may be named instead. Its tokens are cached per vocabulary under ``$QUICKDRAFT_CACHE/prior``
(default ``~/.cache/quickdraft/prior``), so only the first start pays for tokenizing it.

This module needs no tokenizer library: the caller hands over its vocabulary's ``encode``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pathlib
import sys
import sysconfig
import tempfile
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

STDLIB = "stdlib"
NONE = "none"
# Text files read from a folder source (a standard-library source reads only its .py files).
TEXT_SUFFIXES = (".py", ".md", ".rst", ".txt", ".sh", ".json", ".toml", ".yaml", ".yml", ".cfg", ".ini")
_FORMAT = b"QDPRIOR1"
# A source's text beyond this is refused: its index takes about INDEX_BYTES_PER_BYTE bytes per byte
# of text once built (37 a token; about 1.6 times as much while it is built), all of it in the
# proxy's memory. The standard library's is 12 MB.
MAX_MB = 64.0
INDEX_BYTES_PER_BYTE = 11

log = logging.getLogger(__name__)

Encode = Callable[[list[str]], list[list[int]]]  # texts -> their token ids, in order


class PriorTextError(ValueError):
    """The prior text source cannot be used (a missing folder, no text in it)."""


@dataclass(frozen=True, slots=True)
class PriorText:
    """A vocabulary's prior text: one token sequence per source file."""

    source: str
    tokenizer: str
    texts: list[array]
    fingerprint: str = ""  # of the source's files and the vocabulary: equal fingerprints, equal texts

    @property
    def tokens(self) -> int:
        return sum(len(t) for t in self.texts)


def is_off(source: str | None) -> bool:
    """Whether a ``prior_text`` setting asks for no prior text."""
    return not source or source == NONE


def stdlib_dir() -> pathlib.Path:
    return pathlib.Path(sysconfig.get_paths()["stdlib"])


def source_files(source: str, max_mb: float = MAX_MB) -> list[pathlib.Path]:
    """The files a source names, in a stable order (sorted by their path under the source); a
    source holding more than ``max_mb`` megabytes of them is refused."""
    if source == STDLIB:
        root, suffixes = stdlib_dir(), (".py",)
    else:
        root, suffixes = pathlib.Path(source).expanduser(), TEXT_SUFFIXES
    if not root.is_dir():
        raise PriorTextError(f"prior text source {source!r} is not a folder (use {STDLIB!r}, {NONE!r} or a folder)")
    found = []
    # Walked with pruning rather than globbed: the standard library's folder holds the installed
    # packages too (tens of thousands of paths), and none of an excluded folder's files is wanted.
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if not _left_out(d)]
        here = pathlib.Path(folder)
        found.extend(here / n for n in names
                     if not _left_out(n) and pathlib.PurePath(n).suffix in suffixes and (here / n).is_file())
    found.sort(key=lambda p: p.relative_to(root).as_posix())
    if not found:
        raise PriorTextError(f"prior text source {source!r} holds no text files ({', '.join(suffixes)})")
    size_mb = sum(p.stat().st_size for p in found) / 1e6
    if size_mb > max_mb:
        index_mb = size_mb * INDEX_BYTES_PER_BYTE
        raise PriorTextError(
            f"prior text source {source!r} holds {size_mb:,.1f} MB of text files, over the limit of {max_mb:g} MB "
            f"(prior_text_max_mb): its index would take about {index_mb:,.0f} MB of the proxy's memory. "
            "Name a smaller folder, or raise prior_text_max_mb")
    return found


def _left_out(part: str) -> bool:
    # Tests are mostly fixtures and odd inputs; installed packages are not the language's text.
    return "test" in part.lower() or part.startswith(".") or part in ("site-packages", "dist-packages")


def _fingerprint(source: str, files: Sequence[pathlib.Path], tokenizer: str) -> str:
    digest = hashlib.sha256(f"{source}\n{tokenizer}\n{sys.version_info[:2]}\n".encode())
    for path in files:
        st = path.stat()
        digest.update(f"{path}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def _write(path: pathlib.Path, texts: Sequence[array]) -> None:
    lengths = array("q", (len(t) for t in texts))
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f"{path.name}.")  # writers never share a file
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(_FORMAT)
            f.write(array("q", [len(texts)]).tobytes())
            f.write(lengths.tobytes())
            for t in texts:
                f.write(t.tobytes())
        os.replace(tmp, path)  # a reader never sees half a file
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise


def _read(path: pathlib.Path) -> list[array] | None:
    try:
        data = path.read_bytes()
    except OSError:
        return None
    at = len(_FORMAT)
    if not data.startswith(_FORMAT) or len(data) < at + 8:
        return None
    count = array("q", data[at:at + 8])[0]
    at += 8
    if count < 0 or len(data) < at + 8 * count:
        return None
    lengths = array("q", data[at:at + 8 * count])
    at += 8 * count
    if any(n < 0 for n in lengths) or at + 4 * sum(lengths) != len(data):  # cut short or overlong: tokenize again
        return None
    texts = []
    for n in lengths:
        texts.append(array("i", data[at:at + 4 * n]))
        at += 4 * n
    if any(t and min(t) < 0 for t in texts):  # no token id is negative (-1 would read as a boundary)
        return None
    return texts


def batch_encoder(tokenizer: Any) -> Encode:
    """``Encode`` for a ``tokenizers.Tokenizer`` or a transformers fast tokenizer (its backend does
    the work, in parallel, without the warning about texts longer than the model's context)."""
    backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
    if not hasattr(backend, "encode_batch"):
        raise TypeError(f"cannot tokenize prior text with {type(tokenizer).__name__}: it has no fast backend")
    if getattr(backend, "truncation", None) is not None or getattr(backend, "padding", None) is not None:
        # A tokenizer.json may carry a truncation or padding setting: the whole text is wanted, unpadded.
        backend = type(backend).from_str(backend.to_str())
        backend.no_truncation()
        backend.no_padding()
    return lambda texts: [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]


def load_prior_text(source: str, tokenizer: str, encode: Encode, cache_dir: pathlib.Path | None = None,
                    progress: bool = False, max_mb: float = MAX_MB) -> PriorText | None:
    """The source's tokens for a vocabulary (None for ``"none"``), from the cache when it has them."""
    if is_off(source):
        return None
    files = source_files(source, max_mb)
    if cache_dir is None:
        from quickdraft.catalog import cache_root

        cache_dir = cache_root() / "prior"
    fingerprint = _fingerprint(source, files, tokenizer)
    cached = cache_dir / f"{tokenizer}-{fingerprint}.bin"
    texts = _read(cached)
    if texts is None:
        texts = _tokenize(files, encode, progress)
        try:
            cache_dir.mkdir(parents=True, exist_ok=True)
            _write(cached, texts)
        except OSError as exc:  # a read-only or full cache: the tokens are still good for this process
            log.warning("could not cache the prior text's tokens in %s: %s", cache_dir, exc)
    return PriorText(source, tokenizer, texts, fingerprint)


def _tokenize(files: Sequence[pathlib.Path], encode: Encode, progress: bool) -> list[array]:
    from rich.progress import Progress

    texts: list[array] = []
    batch = 64
    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task("tokenizing the prior text", total=len(files))
        for i in range(0, len(files), batch):
            chunk = [p.read_text(encoding="utf-8", errors="replace") for p in files[i:i + batch]]
            texts.extend(array("i", ids) for ids in encode(chunk))
            bar.update(task, advance=len(chunk))
    return texts
