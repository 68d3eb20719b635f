"""Model math only: norms, RoPE, attention, MLP/MoE and the decoder. Imports nothing of the engine."""

from .decoder import DecoderOutput, Gemma, ModelCache, TextModel

__all__ = ["Gemma", "TextModel", "DecoderOutput", "ModelCache"]
