"""The OpenAI-compatible request shapes, as strict pydantic models with every size bounded.

Validation is strict (JSON types only: `"stream": "yes"`, `max_tokens: 1.5` or `true` are errors)
and every list, string and number that could make the server allocate has a cap, so a hostile
request is refused before any work. Unknown fields are accepted and logged (clients send many
vendor extensions), except the ones that would change what runs: a request-supplied
`chat_template` is refused. Responses are built as plain dicts in `app.py`.
"""

from __future__ import annotations

import logging
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

log = logging.getLogger(__name__)

MAX_STOP = 16  # stop strings per request
MAX_STOP_CHARS = 256
MAX_TOP_LOGPROBS = 20
MAX_LOGIT_BIAS = 300
MAX_TOOLS = 64
MAX_MESSAGES = 1024
MAX_TEXT = 4_000_000  # characters of one string field (the body cap bounds the total anyway)
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1  # what torch.Generator.manual_seed accepts

Text = Annotated[str, Field(max_length=MAX_TEXT)]
Name = Annotated[str, Field(min_length=1, max_length=256)]
StopItem = Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]
PositiveInt = Annotated[int, Field(ge=1)]
Bias = Annotated[float, Field(ge=-100, le=100)]


class _Model(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow", frozen=True)

    @model_validator(mode="after")
    def _log_extra(self):
        if self.model_extra:
            log.debug("ignoring unknown request fields: %s", sorted(self.model_extra)[:20])
        return self


class StreamOptions(_Model):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class SamplingFields(_Model):
    """What both endpoints accept to steer sampling (OpenAI fields and the usual vLLM extensions)."""

    model: Name
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Annotated[int, Field(ge=1, le=1)] = 1  # one choice per request; clients can send several requests
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    top_k: Annotated[int, Field(ge=-1, le=1_000_000)] | None = None  # -1 and 0 mean off
    min_p: Annotated[float, Field(ge=0, le=1)] | None = None
    repetition_penalty: Annotated[float, Field(gt=0, le=10)] | None = None
    presence_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    seed: Annotated[int, Field(ge=SEED_MIN, le=SEED_MAX)] | None = None
    stop: StopItem | Annotated[list[StopItem], Field(max_length=MAX_STOP)] | None = None
    logit_bias: Annotated[dict[str, Bias], Field(max_length=MAX_LOGIT_BIAS)] | None = None
    user: Annotated[str, Field(max_length=256)] | None = None

    @property
    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


# -- chat ---------------------------------------------------------------------------------------

class FunctionCall(_Model):
    name: Name
    arguments: Text = "{}"


class ToolCallIn(_Model):
    id: Annotated[str, Field(max_length=256)] | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(_Model):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | Annotated[list[dict[str, Any]], Field(max_length=256)] | None = None
    name: Annotated[str, Field(max_length=256)] | None = None
    tool_calls: Annotated[list[ToolCallIn], Field(max_length=MAX_TOOLS)] | None = None
    tool_call_id: Annotated[str, Field(max_length=256)] | None = None
    reasoning_content: Text | None = None
    reasoning: Text | None = None


class FunctionDef(_Model):
    name: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.\-]+$")]
    description: Annotated[str, Field(max_length=8192)] | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Model):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(_Model):
    name: Name


class NamedToolChoice(_Model):
    type: Literal["function"]
    function: NamedFunction


class JsonSchemaFormat(_Model):
    name: Annotated[str, Field(max_length=64)] = "response"
    description: Annotated[str, Field(max_length=8192)] | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Model):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_present(self):
        if self.type == "json_schema" and (self.json_schema is None or self.json_schema.schema_ is None):
            raise ValueError("response_format of type json_schema needs json_schema.schema")
        return self


class ChatCompletionRequest(SamplingFields):
    messages: Annotated[list[Message], Field(min_length=1, max_length=MAX_MESSAGES)]
    max_tokens: PositiveInt | None = None
    max_completion_tokens: PositiveInt | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    tools: Annotated[list[Tool], Field(max_length=MAX_TOOLS)] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high", "xhigh"] | None = None
    chat_template_kwargs: Annotated[dict[str, Any], Field(max_length=8)] | None = None
    thinking_budget: Annotated[int, Field(ge=0)] | None = None  # extension: max reasoning tokens
    chat_template: None = None  # a request may not supply template code

    @model_validator(mode="after")
    def _checks(self):
        kwargs = self.chat_template_kwargs or {}
        if unknown := sorted(set(kwargs) - {"enable_thinking"}):
            raise ValueError(f"chat_template_kwargs may only set enable_thinking, not {unknown}")
        if not isinstance(kwargs.get("enable_thinking", False), bool):
            raise ValueError("chat_template_kwargs.enable_thinking must be a boolean")
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self

    @property
    def enable_thinking(self) -> bool:
        kwargs = self.chat_template_kwargs or {}
        if "enable_thinking" in kwargs:
            return kwargs["enable_thinking"]
        return self.reasoning_effort not in (None, "none")

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


# -- completions --------------------------------------------------------------------------------

class CompletionRequest(SamplingFields):
    prompt: Text | Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1, max_length=1_000_000)] | \
        Annotated[list[Text], Field(min_length=1, max_length=1)]
    max_tokens: PositiveInt | None = 16  # the OpenAI default for completions
    logprobs: Annotated[int, Field(ge=0, le=5)] | None = None
    echo: Literal[False] = False
    suffix: None = None
    best_of: Annotated[int, Field(ge=1, le=1)] | None = None

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_tokens
