"""The prior text: public text every tenant's suffix drafts may copy from (suffix_cache/prior_text.py)."""

import asyncio
import json
from array import array

import pytest
from typer.testing import CliRunner

from quickdraft.suffix_cache.base import Scope, SessionKey
from quickdraft.suffix_cache.hybrid import HybridDrafter
from quickdraft.suffix_cache.prior_text import (
    PriorText,
    PriorTextError,
    batch_encoder,
    load_prior_text,
    source_files,
    stdlib_dir,
)
from quickdraft.suffix_cache.suffix import SuffixDrafter

A = Scope("tenant-a", "tok")
B = Scope("tenant-b", "tok")
LINE = [40, 41, 42, 43, 44, 45, 46, 47]  # a line of public code


def prior(*texts: list[int], tokenizer: str = "tok") -> PriorText:
    return PriorText("made by hand", tokenizer, [array("i", t) for t in texts])


def test_the_prior_drafts_what_neither_the_session_nor_the_tenant_has_shown():
    without = SuffixDrafter()
    key = SessionKey(A, "s")
    without.begin_call(key, [1, 2, 3, *LINE[:3]])
    assert without.propose(key, 8).token_ids == []
    d = SuffixDrafter()
    d.use_prior(prior([7, 7, *LINE, 9]))
    d.begin_call(key, [1, 2, 3, *LINE[:3]])
    tree = d.propose(key, 8)
    assert tree.token_ids[:5] == LINE[3:8]
    assert tree.match_len == 3


def test_every_tenant_drafts_from_the_prior_and_none_writes_into_it():
    d = HybridDrafter()
    d.use_prior(prior(LINE))
    index = d.members[0].prior_index("tok")
    assert index.frozen_tokens == len(index)  # laid out once built: no tenant's text reaches it
    size = len(index)
    # Tenant A's answer goes to A's own index, not to the prior.
    first = SessionKey(A, "one")
    d.begin_call(first, [5, 5])
    d.accept(first, [60, 61, 62, 63, 64])
    d.end_call(first)
    assert len(index) == size
    for scope in (A, B):
        key = SessionKey(scope, "probe")
        d.begin_call(key, [9, *LINE[:2]])
        assert d.propose(key, 8).token_ids[:3] == LINE[2:5]
    key = SessionKey(B, "probe-2")
    d.begin_call(key, [9, 60, 61])
    assert 62 not in d.propose(key, 8).token_ids  # A's answer never drafts for B


def test_the_prior_is_per_vocabulary():
    d = SuffixDrafter()
    d.use_prior(prior(LINE, tokenizer="other-vocabulary"))
    key = SessionKey(A, "s")
    d.begin_call(key, [9, *LINE[:3]])
    assert d.propose(key, 8).token_ids == []


def drafter_with(prior_text: list[int], tenant_answer: list[int]) -> SuffixDrafter:
    """A suffix drafter given the prior text, after one call of tenant A that answered ``tenant_answer``."""
    d = SuffixDrafter()
    d.use_prior(prior(prior_text))
    earlier = SessionKey(A, "earlier")
    d.begin_call(earlier, [1])
    d.accept(earlier, tenant_answer)
    d.end_call(earlier)
    return d


def test_the_tenant_own_answer_outranks_the_prior():
    d = drafter_with([*LINE[:3], 70, 71, 72], [*LINE[:3], 80, 81, 82])
    key = SessionKey(A, "now")
    d.begin_call(key, [2, *LINE[:3]])
    tree = d.propose(key, 8)
    assert tree.token_ids[0] == 80
    assert 70 in tree.token_ids  # at the same match length, the prior's continuation is the second guess
    assert tree.probs[0] > tree.probs[tree.token_ids.index(70)]


def test_the_prior_is_not_read_after_a_long_match_in_the_tenant_text():
    d = drafter_with([*LINE[:5], 70, 71, 72], [*LINE[:5], 80, 81, 82])
    assert d.params.prior_below == 4
    key = SessionKey(A, "now")
    d.begin_call(key, [2, *LINE[:5]])  # the tenant's answer matches 5 tokens: its copy alone
    assert d.propose(key, 8).token_ids[:3] == [80, 81, 82]
    assert 70 not in d.propose(key, 32).token_ids
    d.begin_call(key, [2, *LINE[2:5]])  # 3 tokens: the prior joins
    assert 70 in d.propose(key, 32).token_ids


def test_prior_tokens_are_cached_per_vocabulary_and_rebuilt_when_the_cache_is_damaged(tmp_path):
    source = tmp_path / "corpus"
    (source / "pkg").mkdir(parents=True)
    (source / "pkg" / "a.py").write_text("def a():\n    return 1\n")
    (source / "b.md").write_text("some words")
    (source / "tests").mkdir()
    (source / "tests" / "test_a.py").write_text("assert a() == 1")
    (source / "image.png").write_bytes(b"\x89PNG")
    for hidden in (".git", "site-packages", "pkg/Testing"):  # never read, at any depth
        (source / hidden).mkdir()
        (source / hidden / "c.py").write_text("hidden = True\n")
    calls = []

    def encode(texts):
        calls.append(len(texts))
        return [[ord(c) for c in t] for t in texts]

    cache = tmp_path / "cache"
    first = load_prior_text(str(source), "tok", encode, cache_dir=cache)
    assert [bytes(t.tolist()).decode() for t in first.texts] == ["some words", "def a():\n    return 1\n"]
    assert first.tokens == 10 + 22 and calls == [2]
    again = load_prior_text(str(source), "tok", encode, cache_dir=cache)
    assert calls == [2] and [t.tolist() for t in again.texts] == [t.tolist() for t in first.texts]
    assert again.fingerprint == first.fingerprint
    # Another vocabulary is tokenized on its own.
    load_prior_text(str(source), "tok-2", encode, cache_dir=cache)
    assert calls == [2, 2]
    cached = cache / f"tok-{first.fingerprint}.bin"  # (not a prefix test: a fingerprint may start with "2")
    assert cached.is_file() and len(list(cache.iterdir())) == 2
    whole = cached.read_bytes()
    negative = whole[:-4] + (-1).to_bytes(4, "little", signed=True)  # a -1 would read as a boundary
    for damaged in (whole[:-3], b"NOTPRIOR" + whole[8:], negative):
        cached.write_bytes(damaged)
        repaired = load_prior_text(str(source), "tok", encode, cache_dir=cache)
        assert [t.tolist() for t in repaired.texts] == [t.tolist() for t in first.texts]
        assert cached.read_bytes() == whole
    assert calls == [2, 2, 2, 2, 2]
    assert load_prior_text("none", "tok", encode, cache_dir=cache) is None
    # A cache that cannot be written: the tokens still serve this process.
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    unwritten = load_prior_text(str(source), "tok", encode, cache_dir=blocked / "prior")
    assert [t.tolist() for t in unwritten.texts] == [t.tolist() for t in first.texts]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("a-file")] == ["a-file"]


def test_a_source_that_is_no_folder_of_text_is_refused_with_the_reason(tmp_path):
    with pytest.raises(PriorTextError, match="is not a folder"):
        source_files(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(PriorTextError, match="holds no text files"):
        source_files(str(tmp_path / "empty"))
    from conftest import trace_files

    from quickdraft.cli import app

    result = CliRunner().invoke(app, ["replay", str(trace_files(1)[0]), "--oracle", "--prior-text", "missing"],
                                env={"COLUMNS": "300"})
    assert result.exit_code == 2
    assert "prior text source 'missing' is not a folder" in result.output


def test_a_source_larger_than_the_limit_is_refused_before_it_is_read(tmp_path):
    big = tmp_path / "big"
    big.mkdir()
    (big / "a.txt").write_text("x" * 300_000)
    assert len(source_files(str(big), max_mb=1)) == 1
    with pytest.raises(PriorTextError, match=r"holds 0.3 MB of text files, over the limit of 0.1 MB"):
        load_prior_text(str(big), "tok", lambda texts: pytest.fail("tokenized a refused source"),
                        cache_dir=tmp_path / "cache", max_mb=0.1)
    from conftest import trace_files

    from quickdraft.cli import app

    result = CliRunner().invoke(app, ["replay", str(trace_files(1)[0]), "--oracle", "--prior-text", str(big)],
                                env={"COLUMNS": "300", "QUICKDRAFT_PRIOR_TEXT_MAX_MB": "0.1"})
    assert result.exit_code == 2
    assert "raise prior_text_max_mb" in result.output


def test_the_standard_library_prior_on_the_real_tokenizer_lifts_the_first_dev_trajectory(tmp_path):
    """The default source, tokenized by SmolLM2's tokenizer, in the oracle replay of a real trajectory."""
    from conftest import trace_files

    from quickdraft.bench.oracle_replay import replay_oracle
    from quickdraft.catalog import load_tokenizer, tokenizer_id

    files = source_files("stdlib")
    assert any(f.name == "json" or f.parent.name == "json" for f in files)
    rel = [f.relative_to(stdlib_dir()).parts for f in files]
    assert not any("test" in part or part == "site-packages" for parts in rel for part in parts)
    tok = load_tokenizer("smollm2-135m")
    text = load_prior_text("stdlib", tokenizer_id(tok), batch_encoder(tok))
    assert text.tokens > 1_000_000 and len(text.texts) == len(files)
    first = files[0].read_text(encoding="utf-8", errors="replace")
    assert text.texts[0].tolist() == tok.encode(first, add_special_tokens=False)
    trace = trace_files(1)
    plain = replay_oracle(trace, "suffix", progress=False)
    lifted = replay_oracle(trace, "suffix", progress=False, prior_text="stdlib")
    assert plain.prior_tokens == 0 and lifted.prior_tokens == text.tokens
    assert lifted.output_tokens == plain.output_tokens
    assert lifted.tokens_per_step > plain.tokens_per_step
    json.dumps(lifted.to_dict())


def _service(prior_text: str):
    from tokenizers import Tokenizer

    from quickdraft.catalog import load_tokenizer, tokenizer_id
    from quickdraft.proxy.service import DecodeProxyService
    from quickdraft.proxy.worker_pool import ModelMeta, WorkerClient, WorkerPool
    from quickdraft.settings import Settings

    hf = load_tokenizer("smollm2-135m")
    try:  # a grpc.aio channel wants an event loop; an async test before this one may have left none set
        asyncio.get_event_loop_policy().get_event_loop()
    except RuntimeError:
        asyncio.set_event_loop(asyncio.new_event_loop())
    worker = WorkerClient.connect("127.0.0.1:1")  # never called: the service only reads its model's vocabulary
    worker.meta = ModelMeta("smollm2-135m", 8192, 49152, frozenset(), tokenizer_id(hf),
                            Tokenizer.from_str(hf.backend_tokenizer.to_str()))
    return DecodeProxyService(Settings(prior_text=prior_text, record_requests=False), WorkerPool([worker])), \
        tokenizer_id(hf)


def test_the_proxy_gives_every_drafter_each_model_vocabulary_prior_once(tmp_path, monkeypatch):
    """The service loads the prior text of the vocabulary a worker reports, once, off the event loop,
    and says when it is done (health waits for it)."""
    import quickdraft.proxy.service as service_module

    monkeypatch.setenv("QUICKDRAFT_CACHE", str(tmp_path))
    loads = []
    real_load = service_module.load_prior_text
    monkeypatch.setattr(service_module, "load_prior_text", lambda *a, **k: loads.append(a) or real_load(*a, **k))
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "notes.md").write_text("The quick brown fox jumps over the lazy dog. " * 20)
    service, vocabulary = _service(str(folder))
    assert service.prior_texts_loaded()  # nothing asked yet
    service.load_prior_texts()
    service.load_prior_texts()  # asked again: still one load
    service._priors[vocabulary].result(timeout=60)
    assert service.prior_texts_loaded() and len(loads) == 1
    suffix_index = service.drafters["suffix"].prior_index(vocabulary)
    assert suffix_index is not None and len(suffix_index) > 100
    assert service.drafters["hybrid"].members[0].prior_index(vocabulary) is suffix_index
    assert len(list((tmp_path / "prior").iterdir())) == 1


def test_a_prior_text_that_cannot_be_read_leaves_the_proxy_drafting_without_it(tmp_path):
    service, vocabulary = _service(str(tmp_path / "missing"))
    service.load_prior_texts()
    service._priors[vocabulary].result(timeout=60)
    assert service.prior_texts_loaded()
    assert service.drafters["suffix"].prior_index(vocabulary) is None
