"""Request checks the schema cannot express, and the conversion of a valid request for the engine.

Everything here runs before the scheduler sees the request, so a bad request costs no slot and no
memory: message consistency (a tool message must answer an earlier call), content parts (text,
media the model takes, in OpenAI's shapes), tools and tool_choice, the context budget, sampling
parameters, logit bias ids, and the token constraints for structured output, tool choice and the
thinking budget (grammar compilation runs off the event loop, under a timeout).

`prepare_chat` / `prepare_completion` do every step whose cost grows with the body (JSON parsing,
validation, prompt rendering and tokenizing) in one call, which the app runs in a worker thread:
a large body then never holds the event loop that serves everyone else.
"""

from __future__ import annotations

import asyncio
import json
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pydantic import ValidationError

from ..api import NO_AUDIO
from ..chat import ChatTemplateError, ToolDefinitionError, normalize_tools
from ..config import ContextLengthError, check_context
from ..engine.sampling import SamplingParams
from .errors import APIError, bad_request, context_length_error, from_validation, prompt_too_long, sanitize
from .media import has_media, prepare as prepare_media
from .prompts import PromptTooLong
from .protocol import ChatCompletionRequest, CompletionRequest, Message
from .security import MAX_DEPTH, deeper_than, parse_json
from .structured import BanTokens, ThinkingBudget

if TYPE_CHECKING:
    from .app import ServeConfig, ServedModel


_TOKEN_ID = re.compile(r"[0-9]{1,10}")  # ASCII digits only: "²".isdigit() and "١".isdigit() are true


@dataclass
class Prepared:
    """A valid request, converted: what `GenerationRequest` needs, and the rendered chat prompt."""

    req: ChatCompletionRequest | CompletionRequest
    ids: list[int]
    max_tokens: int
    sampling: SamplingParams
    logit_bias: dict[int, float] | None
    tools: list[dict] | None = None
    prompt_text: str = ""
    media: tuple = ()  # images, frames and audio clips: gemma4.engine.media.MediaInput over their placeholders


def prepare_chat(raw: bytes, served: ServedModel, config: ServeConfig) -> Prepared:
    """A chat body -> a Prepared request, or an APIError (blocking: run it in a worker thread)."""
    req = validate(ChatCompletionRequest, parse_json(raw))
    check_model(req.model, config)
    messages, tools = chat_inputs(req, served)
    requested = req.requested_max_tokens
    limit, media = served.context - (requested or 1), ()
    try:
        text, literals = served.prompts.render(messages, tools, req.enable_thinking)
        if has_media(messages):
            ids, media = prepare_media(text, messages, served, config,
                                       lambda t: served.prompts.encode(t, literals, limit, served.context))
        else:
            ids = served.prompts.encode(text, literals, limit, served.context)
    except PromptTooLong as error:
        raise too_long(error, requested, served) from None
    except (ValueError, TypeError, ChatTemplateError, ToolDefinitionError) as error:
        raise bad_request(f"cannot build the prompt: {sanitize(str(error))}", param="messages") from None
    return Prepared(req, ids, max_tokens(requested, len(ids), served, config), sampling(req),
                    logit_bias(req, served), tools, text, media)


def prepare_completion(raw: bytes, served: ServedModel, config: ServeConfig) -> Prepared:
    """A completion body -> a Prepared request, or an APIError (blocking: run it in a worker thread)."""
    req = validate(CompletionRequest, parse_json(raw))
    check_model(req.model, config)
    prompt = req.prompt[0] if isinstance(req.prompt, list) and isinstance(req.prompt[0], str) else req.prompt
    if isinstance(prompt, list) and max(prompt) >= served.vocab:
        raise bad_request(f"prompt token ids must be below the vocabulary size {served.vocab}", param="prompt")
    requested = req.requested_max_tokens
    try:
        ids = served.prompts.completion(prompt, limit=served.context - (requested or 1), context=served.context)
    except PromptTooLong as error:
        raise too_long(error, requested, served) from None
    if not ids:
        raise bad_request("the prompt is empty", param="prompt")
    return Prepared(req, ids, max_tokens(requested, len(ids), served, config), sampling(req),
                    logit_bias(req, served))


def too_long(error: PromptTooLong, requested: int | None, served: ServedModel) -> APIError:
    if error.exact:
        return context_length_error(ContextLengthError(served.context, error.tokens, requested or 1))
    return prompt_too_long(served.context, error.tokens, requested or 1)


def validate(cls, body: dict):
    try:
        return cls.model_validate(body)
    except ValidationError as error:
        raise from_validation(error) from None


def check_model(name: str, config: ServeConfig) -> None:
    if name != config.model_name:
        raise APIError(404, f"The model '{name[:100]}' does not exist; this server serves '{config.model_name}'.",
                       param="model", code="model_not_found")


def chat_inputs(req: ChatCompletionRequest, served: ServedModel) -> tuple[list[dict], list[dict] | None]:
    """Messages and tools as plain dicts, after the checks the renderer does not make."""
    call_ids: set[str] = set()
    messages = []
    for i, m in enumerate(req.messages):
        where = f"messages.{i}"
        if isinstance(m.content, list):
            for j, part in enumerate(m.content):
                check_part(part, f"{where}.content.{j}", served)
        if m.role in ("system", "developer", "user") and m.content is None:
            raise bad_request(f"{where}.content: a {m.role} message needs content", param=f"{where}.content")
        for call in m.tool_calls or ():
            try:
                args = json.loads(call.function.arguments)
            except (ValueError, RecursionError):
                args = None
            if not isinstance(args, dict) or deeper_than(args, MAX_DEPTH):
                raise bad_request(f"{where}.tool_calls: arguments must be a JSON object string, nested at most "
                                  f"{MAX_DEPTH} levels", param=where)
            if call.id:
                call_ids.add(call.id)
        if m.role == "tool" and (m.tool_call_id is None or m.tool_call_id not in call_ids):
            raise bad_request(f"{where}: a tool message must answer an earlier assistant tool call "
                              "(its tool_call_id matches no call)", param=f"{where}.tool_call_id")
        messages.append(m.model_dump(exclude_none=True, include=set(Message.model_fields)))
    tools = None
    if req.tools:
        try:
            tools = normalize_tools([t.model_dump(exclude_none=True) for t in req.tools])
        except ToolDefinitionError as error:
            raise bad_request(f"tools: {sanitize(str(error))}", param="tools") from None
        if not served.has_tools:
            raise bad_request("this model has no tool-calling format", param="tools")
    choice = req.tool_choice
    if choice is not None and not isinstance(choice, str):
        if not tools or choice.function.name not in {t["function"]["name"] for t in tools}:
            raise bad_request(f"tool_choice names '{choice.function.name[:64]}', which is not among the tools",
                              param="tool_choice")
    elif choice == "required" and not tools:
        raise bad_request("tool_choice 'required' needs tools", param="tool_choice")
    if req.enable_thinking and served.format.family != "gemma4":
        raise bad_request("this model has no thinking mode", param="chat_template_kwargs")
    if req.response_format is not None and req.response_format.type != "text" and (
            choice == "required" or (choice is not None and not isinstance(choice, str))):
        raise bad_request("response_format and a forced tool_choice cannot be combined", param="response_format")
    return messages, tools


def check_part(part: dict, where: str, served: ServedModel) -> None:
    kind = part.get("type")
    if kind == "text":
        if not isinstance(part.get("text"), str):
            raise bad_request(f"{where}.text must be a string", param=where)
        return
    if kind in ("image_url", "video_url"):
        if not served.capabilities["image"]:
            raise bad_request(f"{where}: this model takes no images or video; send text only", param=where)
        inner = part.get(kind)
        if not isinstance(inner, dict) or not isinstance(inner.get("url"), str) or not inner["url"]:
            raise bad_request(f'{where}.{kind} must be {{"url": "data:...;base64,..."}} (or a URL the server '
                              "allows)", param=where)
        if kind == "image_url" and inner.get("detail", "auto") not in ("low", "auto", "high"):
            raise bad_request(f"{where}.image_url.detail must be low, auto or high", param=where)
        return
    if kind == "input_audio":  # its shape and format: gemma4.media's rules (media_parts), as a 400
        if not served.capabilities["audio"]:
            raise bad_request(f"{where}: {NO_AUDIO}", param=where)
        return
    if kind in ("image", "audio", "audio_url", "video"):
        raise bad_request(f"{where}: {kind} parts are not supported by this server; images come as image_url "
                          "parts, video as video_url parts, audio as input_audio parts", param=where)
    raise bad_request(f"{where}: unknown content part type {str(kind)[:40]!r}", param=where)


def max_tokens(requested: int | None, prompt: int, served: ServedModel, config: ServeConfig) -> int:
    context = served.context
    try:
        check_context(context, prompt, requested or 1)
    except ContextLengthError as error:
        raise context_length_error(error) from None
    return requested if requested is not None else min(config.max_tokens_default, context - prompt)


def sampling(req) -> SamplingParams:
    return SamplingParams(
        temperature=1.0 if req.temperature is None else req.temperature,
        top_k=max(req.top_k or 0, 0),
        top_p=1.0 if req.top_p is None else req.top_p,
        min_p=req.min_p or 0.0,
        repetition_penalty=req.repetition_penalty or 1.0,
        presence_penalty=req.presence_penalty or 0.0,
        frequency_penalty=req.frequency_penalty or 0.0,
        seed=req.seed,
    )


def logit_bias(req, served: ServedModel) -> dict[int, float] | None:
    if not req.logit_bias:
        return None
    bias = {}
    for key, value in req.logit_bias.items():
        if not _TOKEN_ID.fullmatch(key) or int(key) >= served.vocab:
            raise bad_request(f"logit_bias keys must be token ids below {served.vocab}", param="logit_bias")
        bias[int(key)] = value
    return bias


async def constraints(req: ChatCompletionRequest, served: ServedModel, tools, prompt_text: str,
                       config: ServeConfig) -> list:
    out = []
    choice = req.tool_choice
    factory = None
    if req.response_format is not None and req.response_format.type != "text":
        schema = req.response_format.json_schema.schema_ if req.response_format.type == "json_schema" else None
        factory = lambda: served.grammars.json(schema)  # noqa: E731
    elif tools and (choice == "required" or (choice is not None and not isinstance(choice, str))):
        names = [t["function"]["name"] for t in tools] if choice == "required" else [choice.function.name]
        factory = lambda: served.grammars.tool_call(tools, names, served.ids)  # noqa: E731
    if factory is not None:
        try:
            make = await asyncio.wait_for(asyncio.to_thread(factory), config.grammar_timeout)
        except asyncio.TimeoutError:
            raise bad_request("the grammar took too long to compile", param="response_format") from None
        out.append(make())
    if tools and choice == "none":
        out.append(BanTokens([served.ids["open"]], served.vocab))
    if req.enable_thinking and req.thinking_budget is not None and served.ids["channel_close"] is not None:
        starts_open = prompt_text.rfind("<|channel>") > prompt_text.rfind("<channel|>")
        out.append(ThinkingBudget(served.ids["channel_open"], served.ids["channel_close"], req.thinking_budget,
                                  served.vocab, starts_open=starts_open))
    return out
