"""One settings object for every command (pydantic-settings).

Sources, strongest first: command-line flags, environment variables
(``QUICKDRAFT_GRPC_PORT=50052``, lists and maps as JSON), the TOML file named by
``--config`` or ``QUICKDRAFT_CONFIG``, then the defaults below. ``quickdraft up``,
the compose file and the tests mean the same thing by each option.
"""

from __future__ import annotations

import os
from typing import Any, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, TomlConfigSettingsSource

from quickdraft.proto.tls import TlsConfig


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="QUICKDRAFT_", extra="forbid")

    # -- proxy ----------------------------------------------------------------
    host: str = Field("127.0.0.1", description="address the proxy listens on")
    grpc_port: int = Field(50051, description="gRPC port of the proxy")
    http_port: int = Field(8000, ge=0, description="port of the OpenAI-compatible HTTP endpoint; 0: off")
    workers: list[str] = Field(default_factory=list, description="worker addresses HOST:PORT")
    api_keys: dict[str, str] = Field(
        default_factory=dict, description="API key -> tenant; empty: every request is tenant 'default'"
    )
    default_model: str = Field("smollm2-135m", description="model served when a request says 'auto'")
    up_models: list[str] = Field(
        default_factory=lambda: ["smollm2-135m", "gemma3-270m"],
        description="models `quickdraft up` starts a worker for (the small and the large model)",
    )
    default_drafter: str = Field("hybrid", description="drafter used when a request names none")
    max_draft_tokens: int = Field(
        32, ge=0, le=64,
        description="most draft tree nodes one verification step may send (adaptive speculation sends fewer "
                    "where they would not pay)",
    )
    adaptive_speculation: bool = Field(
        True, description="size each draft by the worker's load and the session's acceptance (never slower)"
    )
    prior_text: str = Field(
        "stdlib",
        description="public text every tenant's suffix drafts may also copy from: 'stdlib' (the standard library "
                    "sources of the Python running QuickDraft), a folder of text files, or 'none'",
    )
    prior_text_max_mb: float = Field(
        64.0, gt=0,
        description="largest prior text source accepted, in MB of text (its index takes about 11 bytes per byte)",
    )
    verify_timeout_s: float = Field(
        120.0, gt=0,
        description="a verification step a worker has not answered in this time (plus 10 ms per history token it "
                    "was sent, for long prefills) moves the session to another worker of the model, or fails "
                    "UNAVAILABLE if there is none: a hung worker must not hold a request forever",
    )
    default_max_tokens: int = Field(256, ge=1, description="completion budget when a request sets none")
    max_tokens_cap: int = Field(4096, ge=1, description="largest max_tokens a request may ask for")
    max_concurrent_requests: int = Field(256, ge=1, description="requests in flight before RESOURCE_EXHAUSTED")
    max_concurrent_per_tenant: int = Field(64, ge=1, description="requests in flight per tenant")
    max_sessions_per_tenant: int = Field(1024, ge=1, description="session histories kept per tenant (LRU)")
    redis_url: str | None = Field(None, description="Redis for shared drafting state; none: in-process")
    redis_prefix: str = Field("qd", description="prefix of every Redis key QuickDraft writes")
    redis_max_tokens: int = Field(4_000_000, ge=1, description="response tokens kept per tenant in Redis")
    database_url: str = Field("sqlite:///~/.cache/quickdraft/quickdraft.db",
                              description="SQL records of requests and runs (SQLAlchemy URL: sqlite:///PATH, "
                                          "postgresql://USER@HOST/DB)")
    log_format: Literal["rich", "json"] = Field(
        "rich", description="rich: readable lines on a terminal; json: one JSON object per line (log pipelines)")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="least severe level logged")
    record_requests: bool = Field(True, description="write a SQL record of every request the proxy answers")
    record_runs: bool = Field(True, description="write a SQL record of every replay and benchmark run")

    # -- worker ---------------------------------------------------------------
    model: str = Field("smollm2-135m", description="model a worker loads (catalog name or path)")
    worker_port: int = Field(50061, description="port of `quickdraft worker`")
    device: str = Field("auto", description="auto, cpu or cuda[:N]")
    dtype: str = Field("auto", description="auto (bf16 on CUDA, fp32 on CPU), float32, bfloat16")
    prefill_dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="precision of prefill chunks' matrix products for an fp32 CPU model: auto (bf16 where "
                            "the CPU multiplies it: AMX tiles or AVX-512 BF16; attention too only on AMX), float32, "
                            "bfloat16; the same with speculation on and off")
    decode_dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="precision of verification passes' matrix products for an fp32 CPU model: auto (bf16 "
                            "where the CPU multiplies it: AMX tiles or AVX-512 BF16), float32, bfloat16; the same "
                            "with speculation on and off")
    kv_budget_mb: int = Field(2048, ge=64, description="KV cache memory for all sessions of a worker")
    heap_keep_mb: int = Field(
        1024, ge=0, le=2047,
        description="worker: freed memory (blocks up to 32 MB) kept in the process for the next pass instead of going "
                    "back to the kernel, up to this much free at the heap's top (glibc; prefill temporaries then "
                    "cost no page faults); 0: the C library's defaults"
    )
    kv_active_s: float = Field(
        10.0, ge=0, description="a session used this recently is not evicted, even over the KV budget (no thrash)"
    )
    threads: int = Field(0, ge=0, description="torch CPU threads; 0: torch's default")
    max_batch: int = Field(16, ge=1, description="worker: sessions' steps sharing one forward pass, at most")
    max_batch_tokens: int = Field(2048, ge=16, description="worker: positions in one batched pass, about")
    max_queue: int = Field(256, ge=1, description="worker: steps waiting before RESOURCE_EXHAUSTED")
    register_with: list[str] = Field(
        default_factory=list, description="proxies (HOST:PORT) a worker announces itself to"
    )
    advertise: str | None = Field(None, description="HOST:PORT proxies reach this worker on; default: host:port")
    registration_token: str | None = Field(
        None,
        description="secret shared by a proxy and its workers (set it on both, e.g. as "
                    "QUICKDRAFT_REGISTRATION_TOKEN): a proxy with one refuses any worker that does not present it "
                    "when it registers, and a worker with one answers only callers that present it; none: any host "
                    "that reaches the proxy may register a worker, and any that reaches a worker may call it",
    )
    # -- TLS (proxy, workers and clients alike) -------------------------------------
    tls_cert_file: str | None = Field(
        None, description="PEM certificate chain this process's ports serve (the proxy's gRPC and HTTP ports, a "
                          "worker's port), also presented to peers that ask for a client certificate; none: its "
                          "ports speak plaintext")
    tls_key_file: str | None = Field(None, description="PEM private key of tls_cert_file")
    tls_ca_file: str | None = Field(
        None, description="PEM roots that certify the peers this process calls (a proxy its workers, a worker the "
                          "proxies it registers with, the CLI the proxy), or 'system' for the system's roots; none: "
                          "those calls are plaintext")
    tls_client_ca_file: str | None = Field(
        None, description="accept only callers whose client certificate these PEM roots sign (mutual TLS); none: "
                          "any caller (tokens and API keys still apply)")
    oracle_traces: list[str] = Field(
        default_factory=list,
        description="trajectories whose recorded responses the worker emits instead of the model's choice",
    )
    pass_cost_ms: float | None = Field(
        None, ge=0, description="with oracle traces: a fixed cost per pass instead of the model (quick checks only)"
    )

    config_file: str | None = Field(None, exclude=True)

    @field_validator("registration_token")
    @classmethod
    def _printable_token(cls, token: str | None) -> str | None:
        # It travels as gRPC metadata, which takes printable ASCII only; a secret read from a file
        # often ends in a newline. Checked here so a bad one stops the command at start, not a
        # registration loop later.
        token = (token or "").strip()
        if token and not all("!" <= ch <= "~" for ch in token):
            raise ValueError("registration_token must be printable ASCII without spaces")
        return token or None

    @field_validator("tls_cert_file", "tls_key_file", "tls_ca_file", "tls_client_ca_file")
    @classmethod
    def _blank_is_none(cls, path: str | None) -> str | None:
        # An empty environment variable turns a setting from the config file off.
        return (path or "").strip() or None

    @property
    def tls(self) -> TlsConfig:
        """The TLS settings, unchecked (``TlsConfig.check`` reads the files)."""
        return TlsConfig(self.tls_cert_file, self.tls_key_file, self.tls_ca_file, self.tls_client_ca_file)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        path = os.environ.get("QUICKDRAFT_CONFIG")
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if path:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=path))
        return tuple(sources)


def load_settings(config: str | None = None, **overrides: Any) -> Settings:
    """Settings from the config file (if any), the environment, and explicit overrides."""
    if config:
        os.environ["QUICKDRAFT_CONFIG"] = config
    return Settings(**{k: v for k, v in overrides.items() if v is not None})
