"""The MNNConvert flags sd2mnn offers as options of its own, in one table.

ConvertOptions' checks, the flags each component is converted with, sweep's reading of a
variant's flags, verify's telling of quantized weights and `sd2mnn convert`'s options are all
read from CONVERTER_FLAGS: a new flag is one row here (and its ConvertOptions field).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Mapping

from sd2mnn.errors import InputError


@dataclass(frozen=True)
class ConverterFlag:
    field: str  # the ConvertOptions field, also `sd2mnn.convert`'s keyword
    mnn: str  # MNNConvert's spelling: --weightQuantBits
    cli: str  # `sd2mnn convert`'s option: --weight-quant-bits
    kind: type  # int: takes a whole number (--weightQuantBits=8); bool: a switch (--fp16)
    help: str  # the option's help in `sd2mnn convert --help`
    low: int | None = None  # an int flag's range, both ends included
    high: int | None = None
    needs: str | None = None  # the field that must be set for this one to mean anything
    quantizes: bool = False  # its weights are not fp32: verify holds them to the quantized limits

    @property
    def metavar(self) -> str | None:
        return "N" if self.kind is int else None

    def is_set(self, value) -> bool:
        return value is not None if self.kind is int else bool(value)

    def in_range(self, number: int) -> bool:
        return (self.low is None or number >= self.low) and (self.high is None or number <= self.high)

    @property
    def bounds(self) -> str:
        """The range in words: "between 2 and 8", "at least 1"."""
        if self.low is not None and self.high is not None:
            return f"between {self.low} and {self.high}"
        return f"at least {self.low}" if self.low is not None else f"at most {self.high}"

    def converter_word(self, value) -> str | None:
        """The MNNConvert flag that ``value`` of this option stands for, or None when unset."""
        if not self.is_set(value):
            return None
        return f"{self.mnn}={value}" if self.kind is int else self.mnn


CONVERTER_FLAGS: tuple[ConverterFlag, ...] = (
    ConverterFlag("weight_quant_bits", "--weightQuantBits", "--weight-quant-bits", int,
                  "quantize weights to N bits (2-8)", low=2, high=8, quantizes=True),
    ConverterFlag("weight_quant_block", "--weightQuantBlock", "--weight-quant-block", int,
                  "quantization block size (with --weight-quant-bits)", low=1, needs="weight_quant_bits"),
    ConverterFlag("weight_quant_asymmetric", "--weightQuantAsymmetric", "--weight-quant-asymmetric", bool,
                  "asymmetric weight quantization", needs="weight_quant_bits"),
    ConverterFlag("hqq", "--hqq", "--hqq", bool,
                  "HQQ weight quantization (with --weight-quant-bits)", needs="weight_quant_bits", quantizes=True),
    ConverterFlag("transformer_fuse", "--transformerFuse", "--transformer-fuse", bool,
                  "fuse attention (MNN documents it for OpenCL/Metal)"),
    ConverterFlag("fp16", "--fp16", "--fp16", bool, "store float weights as fp16", quantizes=True),
)

BY_MNN_SPELLING: dict[str, ConverterFlag] = {flag.mnn: flag for flag in CONVERTER_FLAGS}
# Both spellings, as a sweep variant may write either.
BY_SPELLING: dict[str, ConverterFlag] = {**BY_MNN_SPELLING, **{flag.cli: flag for flag in CONVERTER_FLAGS}}


def check_values(values: Mapping[str, object]) -> None:
    """Refuse an option out of its range, then options set without the one they need."""
    for flag in CONVERTER_FLAGS:
        value = values.get(flag.field)
        if flag.kind is int and value is not None and not flag.in_range(value):
            rule = "positive" if (flag.low, flag.high) == (1, None) else flag.bounds
            raise InputError(f"{flag.cli} must be {rule}, got {value}")
    for needed in CONVERTER_FLAGS:
        dependents = [flag for flag in CONVERTER_FLAGS if flag.needs == needed.field]
        if not needed.is_set(values.get(needed.field)) and any(f.is_set(values.get(f.field)) for f in dependents):
            names = [f.cli for f in dependents]
            listed = " and ".join([", ".join(names[:-1]), names[-1]] if len(names) > 1 else names)
            verb = "need" if len(names) > 1 else "needs"
            raise InputError(f"{listed} {verb} {needed.cli}{' ' + needed.metavar if needed.metavar else ''}")


def check_extra_value(name: str, value: str | None, token: str) -> None:
    """Hold a value that EXTRA gives one of these flags to the option's range (the converter
    takes --weightQuantBits=99 or =abc without a word)."""
    flag = BY_MNN_SPELLING.get(name)
    if flag is None or flag.kind is not int or value is None:
        return
    number = int(value) if re.fullmatch(r"[+-]?\d+", value.strip()) else None
    if number is None or not flag.in_range(number):
        raise InputError(
            f"extra converter flag {token!r}: {name} must be a whole number {flag.bounds} "
            f"(as {flag.cli}), got {value!r}"
        )


def converter_words(values: Mapping[str, object]) -> tuple[str, ...]:
    """The MNNConvert flags the options in ``values`` (field -> value) stand for, in table order."""
    words = (flag.converter_word(values.get(flag.field)) for flag in CONVERTER_FLAGS)
    return tuple(word for word in words if word is not None)


def quantizing_words(flags: Iterable[str]) -> list[str]:
    """The converter flags among ``flags`` that leave the weights other than fp32."""
    return [word for word in flags
            if word.split("=")[0] in BY_MNN_SPELLING and BY_MNN_SPELLING[word.split("=")[0]].quantizes]
