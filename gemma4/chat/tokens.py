"""Special-token strings and ids of the Gemma 4 and Gemma 3 prompt formats (spec 4.2 and 7).

The chat code works on strings only; the ids are here so the tokenizer can assert them against
`tokenizer.json` at load and the engine knows which ids end a turn.
"""

# Shared by both families (ids 0-4).
PAD, EOS, BOS, UNK, MASK = "<pad>", "<eos>", "<bos>", "<unk>", "<mask>"

# Gemma 4 markers. Opening markers put the bar first (`<|x>`), closing markers last (`<x|>`).
TOOL_OPEN, TOOL_CLOSE = "<|tool>", "<tool|>"  # tool declaration, inside the system turn
TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<|tool_call>", "<tool_call|>"  # a call the model makes
TOOL_RESPONSE_OPEN, TOOL_RESPONSE_CLOSE = "<|tool_response>", "<tool_response|>"  # the host's answer
STRING_DELIM = '<|"|>'  # quotes strings inside tool syntax
THINK = "<|think|>"  # switches thinking on when placed in the system turn
CHANNEL_OPEN, CHANNEL_CLOSE = "<|channel>", "<channel|>"  # wraps `thought\n...reasoning...`
TURN_OPEN, TURN_CLOSE = "<|turn>", "<turn|>"
IMAGE_OPEN, IMAGE_CLOSE = "<|image>", "<image|>"
AUDIO_OPEN, AUDIO_CLOSE = "<|audio>", "<audio|>"
IMAGE, AUDIO, VIDEO = "<|image|>", "<|audio|>", "<|video|>"  # placeholders the processor expands

GEMMA4_SPECIAL_TOKEN_IDS: dict[str, int] = {
    PAD: 0, EOS: 1, BOS: 2, UNK: 3, MASK: 4,
    TOOL_OPEN: 46, TOOL_CLOSE: 47,
    TOOL_CALL_OPEN: 48, TOOL_CALL_CLOSE: 49,
    TOOL_RESPONSE_OPEN: 50, TOOL_RESPONSE_CLOSE: 51,
    STRING_DELIM: 52,
    THINK: 98,
    CHANNEL_OPEN: 100, CHANNEL_CLOSE: 101,
    TURN_OPEN: 105, TURN_CLOSE: 106,
    "\n": 107, "\n\n": 108,
    IMAGE_OPEN: 255999, AUDIO_OPEN: 256000,
    IMAGE: 258880, AUDIO: 258881, IMAGE_CLOSE: 258882, AUDIO_CLOSE: 258883, VIDEO: 258884,
}

# Gemma 3 reuses ids 105/106 for its turn markers.
START_OF_TURN, END_OF_TURN = "<start_of_turn>", "<end_of_turn>"
START_OF_IMAGE, END_OF_IMAGE = "<start_of_image>", "<end_of_image>"
IMAGE_SOFT_TOKEN = "<image_soft_token>"

GEMMA3_SPECIAL_TOKEN_IDS: dict[str, int] = {
    PAD: 0, EOS: 1, BOS: 2, UNK: 3, MASK: 4,
    START_OF_TURN: 105, END_OF_TURN: 106,
    START_OF_IMAGE: 255999, END_OF_IMAGE: 256000,
    IMAGE_SOFT_TOKEN: 262144,
}

# Ids that end generation for instruction-tuned models. Gemma 4 also stops at `<|tool_response>`
# (50): the host then appends the tool result and the model continues in the same turn.
STOP_TOKEN_IDS: dict[str, frozenset[int]] = {
    "gemma4": frozenset({1, 106, 50}),
    "gemma3": frozenset({1, 106}),
}
