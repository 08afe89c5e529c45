"""Teacher specs from ``configs/teachers.yaml``: endpoint, model id, prices, rate-limit tiers.

Costs are bounded before a request is sent: a byte-level BPE token covers at least one byte, so the
UTF-8 size of the canonical messages and tools (plus a margin per message for the chat template's
special tokens) bounds the prompt's token count, and ``max_tokens`` bounds the completion.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from mlx_distill.config import ConfigError, configs_dir, read_yaml
from mlx_distill.teacher.errors import MissingAPIKey
from mlx_distill.teacher.types import ChatRequest, Usage, canonical_json

KNOWN_QUIRKS = ("mlx_lm_server",)
# Chat templates add role markers and separators around every message. The canonical JSON of a
# message already spends ~30 bytes on '{"content":"","role":"user"}', which covers them; the
# per-message margin is extra safety. Tools are rendered by templates as JSON with spaces after
# ',' and ':' (at most ~1.5x the compact bytes; we count 2x) behind a fixed preamble that explains
# the calling convention (~350 bytes in Qwen's template). Providers may add a default system prompt.
TEMPLATE_TOKENS_PER_MESSAGE = 8
TEMPLATE_TOKENS_PER_TOOL = 16
TOOL_JSON_EXPANSION = 2
TOOL_PREAMBLE_TOKENS = 1024
TEMPLATE_TOKENS_PER_REQUEST = 64
# Images are billed by resolution, not by the bytes of their URL: assume at most this many tokens.
IMAGE_TOKEN_BOUND = 4096
AD_HOC_TIER = "local"
AD_HOC_LIMITS = {"concurrency": 64, "rpm": 1_000_000, "tpm": 1_000_000_000}
SPEC_KEYS = {"base_url", "model", "api_key_env", "pricing", "tiers", "tier", "max_top_logprobs",
             "max_tokens", "quirks"}


@dataclass(frozen=True)
class Tier:
    concurrency: int
    rpm: int
    tpm: int


@dataclass(frozen=True)
class Pricing:
    """USD per 1M tokens."""

    input_cache_hit: float = 0.0
    input_cache_miss: float = 0.0
    output: float = 0.0

    @property
    def is_free(self) -> bool:
        return not (self.input_cache_hit or self.input_cache_miss or self.output)

    def cost(self, usage: Usage) -> float:
        cached = min(max(usage.cached_tokens, 0), usage.prompt_tokens)
        return (cached * self.input_cache_hit
                + (usage.prompt_tokens - cached) * self.input_cache_miss
                + usage.completion_tokens * self.output) / 1e6

    def worst_case(self, request: Any) -> float:
        """Upper bound of ``request``'s cost (a ChatRequest or wire.CompletionRequest), unsent."""
        prompt, completion = token_bounds(request)
        return (prompt * max(self.input_cache_miss, self.input_cache_hit)
                + completion * self.output) / 1e6


def _image_parts(messages: list[dict[str, Any]]) -> int:
    count = 0
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list):
            count += sum(1 for part in content
                         if isinstance(part, dict) and part.get("type") not in (None, "text"))
    return count


def token_bounds(request: Any) -> tuple[int, int]:
    """(prompt tokens, completion tokens) that ``request`` can at most be billed for."""
    extra = getattr(request, "extra", None) or {}
    choices = max(1, int(extra.get("n") or 1))
    max_tokens = max(int(request.max_tokens or 0), int(extra.get("max_completion_tokens") or 0))
    if isinstance(request, ChatRequest):
        tools = request.tools or []
        prompt = (len(canonical_json(request.messages).encode("utf-8"))
                  + TEMPLATE_TOKENS_PER_MESSAGE * len(request.messages)
                  + IMAGE_TOKEN_BOUND * _image_parts(request.messages))
        if tools:
            prompt += (TOOL_JSON_EXPANSION * len(canonical_json(tools).encode("utf-8"))
                       + TEMPLATE_TOKENS_PER_TOOL * len(tools) + TOOL_PREAMBLE_TOKENS)
    else:
        prompt = len(str(request.prompt).encode("utf-8"))
    return prompt + TEMPLATE_TOKENS_PER_REQUEST, max_tokens * choices


@dataclass(frozen=True)
class TeacherSpec:
    name: str
    base_url: str
    model: str
    api_key_env: str | None
    pricing: Pricing
    tiers: dict[str, Tier]
    tier: str
    max_top_logprobs: int = 20
    max_tokens: int = 1024
    quirks: tuple[str, ...] = field(default=())

    @property
    def limits(self) -> Tier:
        return self.tiers[self.tier]

    @property
    def base_host(self) -> str:
        parts = urlsplit(self.base_url)
        host = (parts.hostname or "").lower()
        return f"{host}:{parts.port}" if parts.port else host

    def fingerprint(self) -> str:
        """Who answers: same host and model id ⇒ same teacher (the cache key includes this)."""
        return f"{self.base_host}/{self.model}"

    def with_tier(self, tier: str | None) -> TeacherSpec:
        if tier is None or tier == self.tier:
            return self
        if tier not in self.tiers:
            raise ConfigError(
                f"teacher {self.name}: tier {tier!r} unknown; tiers: {sorted(self.tiers)}")
        return replace(self, tier=tier)


def api_key(spec: TeacherSpec) -> str | None:
    """The API key from the environment variable the spec names (None when it needs no key)."""
    if not spec.api_key_env:
        return None
    value = os.environ.get(spec.api_key_env, "").strip()
    if not value:
        raise MissingAPIKey(
            f"teacher {spec.name}: set the environment variable {spec.api_key_env} to your API key")
    return value


# ---- loading and validation ----

def teachers_path() -> Path:
    return configs_dir() / "teachers.yaml"


def _number(where: str, value: Any, *, integer: bool = False, positive: bool = False) -> Any:
    kinds = (int,) if integer else (int, float)
    ok = isinstance(value, kinds) and not isinstance(value, bool)
    ok = ok and (value > 0 if positive else value >= 0)
    if not ok:
        what = "integer" if integer else "number"
        raise ConfigError(f"{where}: expected a {'positive' if positive else 'non-negative'} "
                          f"{what}, got {value!r}")
    return value


def _mapping(where: str, value: Any, keys: set[str], required: set[str]) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a mapping with keys {sorted(keys)}, got {value!r}")
    unknown = sorted(set(value) - keys)
    if unknown:
        raise ConfigError(f"{where}.{unknown[0]}: unknown key; expected {sorted(keys)}")
    missing = sorted(required - set(value))
    if missing:
        raise ConfigError(f"{where}.{missing[0]}: required key is missing")
    return value


def _check_url(where: str, url: Any) -> str:
    parts = urlsplit(url) if isinstance(url, str) else None
    if parts is not None and (parts.username or parts.password):  # never echo it: a secret
        raise ConfigError(f"{where}: credentials in the URL are not allowed; put the API key in "
                          "an environment variable named by api_key_env")
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{where}: expected an http(s) URL such as https://host/v1, got {url!r}")
    return url.rstrip("/")


def _spec_from_dict(name: str, data: Any, where: str) -> TeacherSpec:
    data = _mapping(where, data, SPEC_KEYS, SPEC_KEYS - {"quirks"})
    model = data["model"]
    if not isinstance(model, str) or not model:
        raise ConfigError(f"{where}.model: expected a non-empty string, got {model!r}")
    key_env = data["api_key_env"]
    if key_env is not None and (not isinstance(key_env, str) or not key_env.isidentifier()):
        raise ConfigError(f"{where}.api_key_env: expected an environment variable NAME or null, "
                          f"got {key_env!r}")
    price_keys = {"input_cache_hit", "input_cache_miss", "output"}
    prices = _mapping(f"{where}.pricing", data["pricing"], price_keys, price_keys)
    pricing = Pricing(**{k: float(_number(f"{where}.pricing.{k}", v)) for k, v in prices.items()})
    tiers_raw = data["tiers"]
    if not isinstance(tiers_raw, dict) or not tiers_raw:
        raise ConfigError(f"{where}.tiers: expected a non-empty mapping of tier names")
    tiers = {}
    tier_keys = {"concurrency", "rpm", "tpm"}
    for tier_name, limits in tiers_raw.items():
        at = f"{where}.tiers.{tier_name}"
        limits = _mapping(at, limits, tier_keys, tier_keys)
        tiers[str(tier_name)] = Tier(**{k: _number(f"{at}.{k}", v, integer=True, positive=True)
                                        for k, v in limits.items()})
    tier = data["tier"]
    if tier not in tiers:
        raise ConfigError(f"{where}.tier: {tier!r} is not one of the tiers {sorted(tiers)}")
    quirks = data.get("quirks") or []
    if not isinstance(quirks, list) or any(q not in KNOWN_QUIRKS for q in quirks):
        raise ConfigError(
            f"{where}.quirks: expected a list of {list(KNOWN_QUIRKS)}, got {quirks!r}")
    return TeacherSpec(
        name=name,
        base_url=_check_url(f"{where}.base_url", data["base_url"]),
        model=model,
        api_key_env=key_env,
        pricing=pricing,
        tiers=tiers,
        tier=str(tier),
        max_top_logprobs=_number(f"{where}.max_top_logprobs", data["max_top_logprobs"],
                                 integer=True),
        max_tokens=_number(f"{where}.max_tokens", data["max_tokens"], integer=True, positive=True),
        quirks=tuple(quirks),
    )


def load_teachers(path: str | os.PathLike | None = None) -> dict[str, TeacherSpec]:
    path = Path(path) if path is not None else teachers_path()
    data = read_yaml(path)
    if not isinstance(data, dict) or not isinstance(data.get("teachers"), dict):
        raise ConfigError(f"{path}: teachers: expected a mapping of teacher names to specs")
    return {str(name): _spec_from_dict(str(name), spec, f"{path}: teachers.{name}")
            for name, spec in data["teachers"].items()}


def ad_hoc_spec(url: str, *, model: str | None = None,
                api_key_env: str | None = None) -> TeacherSpec:
    """A free teacher at ``url`` (e.g. a server on this machine), keyless unless ``api_key_env``."""
    base_url = _check_url("teacher URL", url)
    return TeacherSpec(name=base_url, base_url=base_url, model=model or "local",
                       api_key_env=api_key_env, pricing=Pricing(),
                       tiers={AD_HOC_TIER: Tier(**AD_HOC_LIMITS)}, tier=AD_HOC_TIER)


def load_teacher(name_or_url: str, *, model: str | None = None, tier: str | None = None,
                 path: str | os.PathLike | None = None) -> TeacherSpec:
    """A teacher by name from teachers.yaml, or an ad-hoc spec for an ``http(s)://`` URL."""
    if "://" in name_or_url:
        return ad_hoc_spec(name_or_url, model=model).with_tier(tier)
    teachers = load_teachers(path)
    if name_or_url not in teachers:
        where = Path(path) if path is not None else teachers_path()
        raise ConfigError(f"{where}: teachers.{name_or_url}: no such teacher; "
                          f"known: {sorted(teachers)} (or pass an http(s):// URL)")
    spec = teachers[name_or_url]
    if model:
        spec = replace(spec, model=model)
    return spec.with_tier(tier)
