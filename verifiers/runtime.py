"""The model runtime of a worker: session KV reuse and one-pass draft verification.

The proxy owns every session's token history. A verify call says how many of
those tokens it believes this worker holds (``known_len``, with the last few as
an anchor), sends the ones after them, and a draft tree. The worker keeps exactly
the known prefix of its cache, prefills the new tokens (in chunks, so long
prompts never build a huge attention matrix), scores the draft in the same pass
as the last chunk (with the batch-invariant CPU kernel: as the last new token,
when more than a few arrive; see ``_prefill_head``), keeps the KV of the
accepted branch and drops the rest. If it
does not hold the known prefix (restarted, evicted, or diverged) it says so and
the proxy resends the whole history.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from quickdraft.catalog import chat_prompt_ids
from quickdraft.verifiers import small_linear
from quickdraft.verifiers.attention import CAUSAL_CHUNK_KWARG, PLAN_KWARG
from quickdraft.verifiers.batching import PackedCache, PackedItem, PackedPlan
from quickdraft.verifiers.kv_cache import (
    SessionKV,
    SessionStore,
    cache_keyword,
    cache_length,
    keep_positions,
    set_cache_length,
)
from quickdraft.verifiers.model_loader import LoadedModel
from quickdraft.verifiers.oracle_target import OracleTarget
from quickdraft.verifiers.tree_verify import (
    Sampling,
    TokenStats,
    accept_walk,
    sliding_window_mask,
    token_stats,
    tree_inputs,
)

PREFILL_CHUNK = 1024


class VerifyError(ValueError):
    """The request cannot be served as asked (bad tree, beyond the context, ...)."""


@dataclass(slots=True)
class VerifyInput:
    session_key: str
    known_len: int
    anchor: Sequence[int]
    new_tokens: Sequence[int]
    draft_tokens: Sequence[int] = ()
    draft_parents: Sequence[int] = ()
    sampling: Sampling = field(default_factory=Sampling)
    top_logprobs: int = 0
    seed: int = 0


@dataclass(slots=True)
class VerifyOutput:
    resync_required: bool = False
    tokens: list[int] = field(default_factory=list)
    accepted_nodes: list[int] = field(default_factory=list)
    stats: list[TokenStats] = field(default_factory=list)
    cached_len: int = 0
    computed_tokens: int = 0
    forward_ms: float = 0.0
    batch_size: int = 1          # sessions that shared the forward pass
    batch_tokens: int = 0        # positions the pass scored, all sessions


@dataclass(slots=True)
class _Staged:
    """One session's step inside a batch, between preparation and the forward pass."""

    req: VerifyInput
    session: SessionKV
    feed: list[int]
    draft_tokens: list[int]
    draft_parents: list[int]
    history_len: int
    computed: int
    index: int = 0


@dataclass(frozen=True, slots=True)
class WorkerInfo:
    model: str
    context_length: int
    vocab_size: int
    eos_token_ids: tuple[int, ...]
    tokenizer_id: str
    tokenizer_json: bytes
    device: str
    dtype: str


def kv_bytes_per_token(config, dtype: torch.dtype) -> int:
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * config.num_hidden_layers * heads * head_dim * torch.tensor([], dtype=dtype).element_size()


class ModelRuntime:
    def __init__(self, loaded: LoadedModel, kv_budget_bytes: int = 2 << 30, kv_active_s: float = 10.0) -> None:
        self.loaded = loaded
        self.oracle: OracleTarget | None = None
        self.pass_cost_ms: float | None = None
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.device = loaded.device
        config = self.model.config
        self.context_length = int(getattr(config, "max_position_embeddings", 2048))
        self.vocab_size = int(config.vocab_size)
        # Models with local-attention layers (Gemma 3: a 512-token window on most layers) get a
        # second mask for those layers; the cache keeps every position, the mask limits the view.
        layer_types = set(getattr(config, "layer_types", None) or ())
        self.sliding_window = int(config.sliding_window) if "sliding_attention" in layer_types else 0
        self.sessions = SessionStore(config.num_hidden_layers, kv_budget_bytes, kv_active_s)
        self.kv_bytes_per_token = kv_bytes_per_token(config, loaded.dtype)
        self._lock = threading.Lock()  # one forward pass at a time
        self._info = self._make_info()
        # The two-pass prefill attention is asked for through the model's keyword arguments, which
        # transformers hands down to every attention call; a model whose forward takes none keeps SDPA.
        takes_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD
                           for p in inspect.signature(self.model.forward).parameters.values())
        self._prefill_kwargs = {CAUSAL_CHUNK_KWARG: True} if takes_kwargs else {}
        self._cache_kw = cache_keyword(self.model)

    # -- metadata ------------------------------------------------------------
    def _eos_ids(self) -> tuple[int, ...]:
        ids: set[int] = set()
        gen = getattr(self.model, "generation_config", None)
        for source in (getattr(gen, "eos_token_id", None), self.tokenizer.eos_token_id):
            if isinstance(source, int):
                ids.add(source)
            elif source:
                ids.update(int(x) for x in source)
        for special in ("<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|endoftext|>"):
            tid = self.tokenizer.convert_tokens_to_ids(special)
            if isinstance(tid, int) and tid != self.tokenizer.unk_token_id and tid is not None:
                ids.add(tid)
        return tuple(sorted(ids))

    def follow_recordings(self, oracle: OracleTarget, pass_cost_ms: float | None = None) -> None:
        """Emit recorded responses instead of the model's choices (see oracle_target.py). With
        ``pass_cost_ms`` the model is not run at all: each pass costs that long (quick checks only)."""
        self.oracle = oracle
        self.pass_cost_ms = pass_cost_ms

    def turn_end_token(self) -> int:
        """The token that closes an assistant turn in this model's chat format."""
        for special in ("<|im_end|>", "<end_of_turn>", "<|eot_id|>"):
            tid = self.tokenizer.convert_tokens_to_ids(special)
            if isinstance(tid, int) and tid != self.tokenizer.unk_token_id:
                return tid
        return int(self.tokenizer.eos_token_id)

    def _make_info(self) -> WorkerInfo:
        from quickdraft.catalog import tokenizer_id

        backend = getattr(self.tokenizer, "backend_tokenizer", None) or getattr(self.tokenizer, "_tokenizer", None)
        tok_json = backend.to_str().encode() if backend is not None else json.dumps({}).encode()
        return WorkerInfo(
            model=self.loaded.name,
            context_length=self.context_length,
            vocab_size=self.vocab_size,
            eos_token_ids=self._eos_ids(),
            tokenizer_id=tokenizer_id(self.tokenizer),
            tokenizer_json=tok_json,
            device=str(self.device),
            dtype=str(self.loaded.dtype).removeprefix("torch."),
        )

    def info(self) -> WorkerInfo:
        return self._info

    def tokenize(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> list[int]:
        return chat_prompt_ids(self.tokenizer, messages, add_generation_prompt)

    def release(self, session_key: str) -> bool:
        with self._lock:
            return self.sessions.release(session_key)

    # -- verification ----------------------------------------------------------
    def _resync(self, req: VerifyInput) -> SessionKV | None:
        """The session with exactly ``known_len`` tokens cached, or None if it must be resent."""
        session = self.sessions.get(req.session_key)
        if req.known_len == 0:
            if session is None:
                session = self.sessions.create(req.session_key)
            session.tokens = []
            set_cache_length(session.cache, 0)
            return session
        if session is None or len(session.tokens) < req.known_len:
            return None
        anchor = list(req.anchor)
        if anchor and session.tokens[req.known_len - len(anchor) : req.known_len] != anchor:
            return None
        if len(session.tokens) > req.known_len:
            del session.tokens[req.known_len :]
            set_cache_length(session.cache, req.known_len)
        return session

    def _check(self, req: VerifyInput) -> None:
        if len(req.draft_tokens) != len(req.draft_parents):
            raise VerifyError("draft tree: token_ids and parents differ in length")
        for i, (tok, parent) in enumerate(zip(req.draft_tokens, req.draft_parents, strict=True)):
            if not -1 <= parent < i:
                raise VerifyError(f"draft tree: node {i} has parent {parent}; parents must precede children")
            if not 0 <= tok < self.vocab_size:
                raise VerifyError(f"draft tree: token {tok} is outside the vocabulary ({self.vocab_size})")
        for tok in req.new_tokens:
            if not 0 <= tok < self.vocab_size:
                raise VerifyError(f"token {tok} is outside the vocabulary ({self.vocab_size})")
        if req.known_len == 0 and not req.new_tokens:
            raise VerifyError("nothing to verify: no cached history and no new tokens")

    def verify(self, req: VerifyInput) -> VerifyOutput:
        """One session's step (raises VerifyError for a request that cannot be served)."""
        result = self.verify_batch([req])[0]
        if isinstance(result, VerifyError):
            raise result
        return result

    def verify_batch(self, reqs: Sequence[VerifyInput]) -> list[VerifyOutput | VerifyError]:
        """Steps of several sessions in one forward pass (one request per session). A request
        that cannot be served gets its VerifyError in its slot; the others proceed."""
        results: list[VerifyOutput | VerifyError | None] = [None] * len(reqs)
        with self._lock, torch.inference_mode():
            started = time.perf_counter()
            staged: list[_Staged] = []
            keys: set[str] = set()
            touched: list[str] = []  # sessions whose cache a pass may have written
            try:
                for i, req in enumerate(reqs):
                    try:
                        if req.session_key in keys:
                            raise VerifyError("one batch holds two steps of the same session")
                        keys.add(req.session_key)
                        self._check(req)
                        step = self._prepare(req)
                    except VerifyError as exc:
                        results[i] = exc
                        continue
                    if step is None:
                        results[i] = VerifyOutput(resync_required=True)
                        continue
                    touched.append(req.session_key)
                    if self.pass_cost_ms is not None:
                        results[i] = self._fixed_cost_pass(step.session, step.feed, step.draft_tokens,
                                                           step.draft_parents)
                    else:
                        step.index = i
                        step.feed = self._prefill_head(step.session, step.feed)
                        staged.append(step)
                if len(staged) == 1:
                    results[staged[0].index] = self._single_pass(staged[0])
                elif staged:
                    for step, out in zip(staged, self._packed_pass(staged), strict=True):
                        results[step.index] = out
            except BaseException:
                # A pass that failed part-way (out of memory, say) has written keys and values, in some
                # layers or all, that the sessions' token lists do not account for. Kept, a retry would
                # attend to them: the sessions are dropped, and their next step resends the history.
                for key in touched:
                    self.sessions.release(key)
                raise
            self.sessions.enforce_budget(keep=keys)
            elapsed = (time.perf_counter() - started) * 1e3
            scored = sum(step.computed for step in staged)
            for out in results:
                if isinstance(out, VerifyOutput):
                    out.forward_ms = elapsed
                    out.batch_size = len(staged)
                    out.batch_tokens = scored
            return results  # type: ignore[return-value]

    def _prepare(self, req: VerifyInput) -> _Staged | None:
        """Resync the session and settle what this step computes; None: the proxy must resend history."""
        session = self._resync(req)
        if session is None:
            return None
        feed = [int(t) for t in req.new_tokens]
        if not feed:
            # Everything is cached already: re-run the last token to get its logits.
            feed = [session.tokens.pop()]
            set_cache_length(session.cache, len(session.tokens))
        total = len(session.tokens) + len(feed)
        if total + 1 > self.context_length:
            raise VerifyError(
                f"the session holds {total} tokens; {self.loaded.name} has a context of "
                f"{self.context_length} tokens"
            )
        draft_tokens, draft_parents = self._fit_draft(req, total)
        if self.oracle is not None:
            session.oracle = self.oracle.follow(session.tokens + feed, session.oracle)
        return _Staged(req, session, feed, draft_tokens, draft_parents, total, len(feed) + len(draft_tokens))

    def _fit_draft(self, req: VerifyInput, total: int) -> tuple[list[int], list[int]]:
        """Drop draft nodes that would run past the context window."""
        room = self.context_length - total - 1
        tokens: list[int] = []
        parents: list[int] = []
        depths: list[int] = []
        # A prefix of the node list is still a tree with the same indices.
        for tok, parent in zip(req.draft_tokens, req.draft_parents, strict=True):
            depth = 1 if parent < 0 else depths[parent] + 1
            if depth > room:
                break
            tokens.append(int(tok))
            parents.append(int(parent))
            depths.append(depth)
        return tokens, parents

    def _prefill_head(self, session: SessionKV, feed: list[int]) -> list[int]:
        """Prefill the new tokens that are not scored with the draft (the model's own causal mask,
        chunks of PREFILL_CHUNK); returns the ones that are.

        With the batch-invariant kernel, the split depends on the new tokens alone, never on the
        draft: up to MAX_ROWS new tokens are all scored with the draft, more are prefilled but the
        last one. So speculation on and off run the same prefill passes, and every position they
        score lands on the same side of the kernel's row limit in both; the pass that scores the
        draft runs the kernel whatever its size (``small_linear.invariant``).
        """
        if self.loaded.invariant_linears:
            cut = len(feed) - 1 if len(feed) > small_linear.MAX_ROWS else 0
        else:
            cut = (len(feed) - 1) // PREFILL_CHUNK * PREFILL_CHUNK
        dev = self.device
        for start in range(0, cut, PREFILL_CHUNK):
            chunk = feed[start:min(cut, start + PREFILL_CHUNK)]
            past = cache_length(session.cache)
            ids = torch.tensor([chunk], dtype=torch.long, device=dev)
            pos = torch.arange(past, past + len(chunk), device=dev)[None]
            with small_linear.prefill_precision(self.loaded.prefill_dtype):
                self.model(input_ids=ids, position_ids=pos, use_cache=True, logits_to_keep=1,
                           **{self._cache_kw: session.cache}, **self._prefill_kwargs)
            session.tokens.extend(chunk)
        return feed[cut:]

    def _masks(self, past: int, step: _Staged) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        pos, mask = tree_inputs(past, len(step.feed), step.draft_parents, self.device)
        sliding = sliding_window_mask(mask, pos, past, self.sliding_window) if self.sliding_window else None
        return pos, mask, sliding

    def _single_pass(self, step: _Staged) -> VerifyOutput:
        past = cache_length(step.session.cache)
        pos, mask, sliding = self._masks(past, step)
        ids = torch.tensor([step.feed + step.draft_tokens], dtype=torch.long, device=self.device)
        attention_mask = mask if sliding is None else {"full_attention": mask, "sliding_attention": sliding}
        with small_linear.invariant(self.loaded.decode_dtype is not None):
            result = self.model(input_ids=ids, position_ids=pos, attention_mask=attention_mask,
                                use_cache=True, logits_to_keep=len(step.draft_tokens) + 1,
                                **{self._cache_kw: step.session.cache})
        return self._finish(step, past, result.logits[0])

    def _packed_pass(self, steps: list[_Staged]) -> list[VerifyOutput]:
        items: list[PackedItem] = []
        ids: list[int] = []
        positions: list[torch.Tensor] = []
        keep: list[int] = []
        pasts: list[int] = []
        for step in steps:
            past = cache_length(step.session.cache)
            pos, mask, sliding = self._masks(past, step)
            start = len(ids)
            items.append(PackedItem(step.session.cache, start, len(step.feed) + len(step.draft_tokens), mask, sliding))
            ids.extend(step.feed + step.draft_tokens)
            positions.append(pos[0])
            last_feed = start + len(step.feed) - 1
            keep.extend(range(last_feed, last_feed + len(step.draft_tokens) + 1))
            pasts.append(past)
        plan = PackedPlan(items)
        n = len(ids)
        # Every attention call takes its masks from the plan; this one only satisfies the model's API.
        placeholder = torch.ones((1, 1, n, n), dtype=torch.bool, device=self.device)
        attention_mask = placeholder if not self.sliding_window else \
            {"full_attention": placeholder, "sliding_attention": placeholder}
        # Each session's rows computed as if it were alone.
        with small_linear.invariant(self.loaded.decode_dtype is not None):
            result = self.model(
                input_ids=torch.tensor([ids], dtype=torch.long, device=self.device),
                position_ids=torch.cat(positions)[None],
                attention_mask=attention_mask,
                use_cache=True,
                logits_to_keep=torch.tensor(keep, device=self.device),
                **{PLAN_KWARG: plan, self._cache_kw: PackedCache(plan, self.model.config.num_hidden_layers)},
            )
        logits = result.logits[0]
        outs = []
        row = 0
        for step, past in zip(steps, pasts, strict=True):
            rows = len(step.draft_tokens) + 1
            outs.append(self._finish(step, past, logits[row:row + rows]))
            row += rows
        return outs

    def _finish(self, step: _Staged, past: int, logits: torch.Tensor) -> VerifyOutput:
        """Choose the emitted tokens from this step's logits and keep the accepted branch's KV."""
        session, req = step.session, step.req
        base = past + len(step.feed)
        recorded = self._recorded_walk(session, step.history_len, step.draft_tokens, step.draft_parents)
        if recorded is not None:
            emitted, accepted = recorded
            rows = [0, *(1 + j for j in accepted)][: len(emitted)]
        else:
            emitted, accepted, rows = accept_walk(
                logits, step.draft_tokens, step.draft_parents, req.sampling, seed=req.seed, position=base
            )
        keep_positions(session.cache, base, [base + j for j in accepted])
        session.tokens.extend(step.feed)
        session.tokens.extend(step.draft_tokens[j] for j in accepted)
        stats = token_stats(logits[rows], req.top_logprobs) if req.top_logprobs > 0 else []
        return VerifyOutput(
            tokens=emitted,
            accepted_nodes=accepted,
            stats=stats,
            cached_len=len(session.tokens),
            computed_tokens=step.computed,
        )

    @staticmethod
    def _recorded_walk(session: SessionKV, history_len: int, draft_tokens: list[int],
                       draft_parents: list[int]) -> tuple[list[int], list[int]] | None:
        cursor = session.oracle
        if cursor is None or history_len - cursor.prompt_len >= len(cursor.response):
            return None
        return OracleTarget.walk(cursor, history_len, draft_tokens, draft_parents)

    def _fixed_cost_pass(self, session: SessionKV, feed: list[int], draft_tokens: list[int],
                         draft_parents: list[int]) -> VerifyOutput:
        time.sleep(self.pass_cost_ms / 1e3)
        session.tokens.extend(feed)
        recorded = self._recorded_walk(session, len(session.tokens), draft_tokens, draft_parents)
        emitted, accepted = recorded if recorded is not None else ([self.turn_end_token()], [])
        session.tokens.extend(draft_tokens[j] for j in accepted)
        return VerifyOutput(tokens=emitted, accepted_nodes=accepted, cached_len=len(session.tokens),
                            computed_tokens=len(feed) + len(draft_tokens))


def session_key(tenant: str, session_id: str) -> str:
    """The worker-side key of a proxy session (opaque, fixed length)."""
    return hashlib.sha256(f"{tenant}\x00{session_id}".encode()).hexdigest()[:32]
