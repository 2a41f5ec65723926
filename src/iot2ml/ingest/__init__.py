"""Decode, validate, deduplicate and batch telemetry from the broker into the lake, exactly once."""

from .decode import Decoder, Decoded, InMessage

__all__ = ["Decoded", "Decoder", "InMessage"]
