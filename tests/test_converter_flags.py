"""The converter flags sd2mnn names are one table (sd2mnn.conversion.converter_flags): ConvertOptions, the
flags a component is converted with, `sd2mnn convert`'s options, sweep's variants and verify's
quantized test all read it, and none of them spells a flag of its own."""
from __future__ import annotations

import argparse
import ast
import dataclasses
from pathlib import Path

import pytest

import sd2mnn
from sd2mnn.cli import build_parser
from sd2mnn.cli.convert import options_from_args
from sd2mnn.conversion.converter_flags import CONVERTER_FLAGS, ConverterFlag
from sd2mnn.errors import InputError
from sd2mnn.core.manifest import ComponentRecord, Manifest
from sd2mnn.conversion.plan import ConvertOptions
from sd2mnn.measurement.sweep import VARIANTS, Variant
from sd2mnn.verification.verify import _precision

# ConvertOptions fields that are not converter flags: what to convert and how to run it.
# ...and "compression", per component, not a flag (sd2mnn.quantization.compression).
RUN_FIELDS = {"components", "extra", "converter", "force", "jobs", "timeout", "tokenizer_scheme", "compression"}
# The modules that used to spell these flags themselves.
READERS = ("conversion/plan.py", "measurement/sweep.py", "verification/verify.py", "cli/convert.py")


def _set_value(flag: ConverterFlag):
    return flag.low if flag.kind is int else True


def _with_needs(flag: ConverterFlag) -> dict:
    """``flag`` set, with the flag it needs."""
    values = {flag.field: _set_value(flag)}
    if flag.needs:
        needed = next(f for f in CONVERTER_FLAGS if f.field == flag.needs)
        values[needed.field] = _set_value(needed)
    return values


def _convert_parser() -> argparse.ArgumentParser:
    subparsers = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return subparsers.choices["convert"]


def test_every_convert_options_flag_is_one_row():
    fields = {f.name: f for f in dataclasses.fields(ConvertOptions)}
    table = [flag.field for flag in CONVERTER_FLAGS]
    assert len(table) == len(set(table))
    assert set(table) == set(fields) - RUN_FIELDS
    for flag in CONVERTER_FLAGS:
        assert fields[flag.field].default is (None if flag.kind is int else False), flag
        assert flag.kind in (int, bool) and flag.mnn.startswith("--") and flag.cli.startswith("--")
        assert flag.needs is None or flag.needs in table
        assert flag.kind is bool or flag.low is not None, f"{flag.cli} takes a number but has no range"
        if flag.kind is int and flag.high is not None:  # the help states the range the checks hold
            assert f"({flag.low}-{flag.high})" in flag.help, flag
    for spelling in ("mnn", "cli"):
        names = [getattr(flag, spelling) for flag in CONVERTER_FLAGS]
        assert len(names) == len(set(names))


def test_named_flags_are_the_table_rows():
    assert ConvertOptions().named_flags() == ()
    for flag in CONVERTER_FLAGS:
        values = _with_needs(flag)
        words = ConvertOptions(**values).named_flags()
        mine = [w for w in words if w.split("=")[0] == flag.mnn]
        assert mine == [flag.mnn if flag.kind is bool else f"{flag.mnn}={flag.low}"], (flag, words)
        assert len(words) == len(values)
    every = {}
    for flag in CONVERTER_FLAGS:
        every.update(_with_needs(flag))
    assert [w.split("=")[0] for w in ConvertOptions(**every).named_flags()] == [f.mnn for f in CONVERTER_FLAGS]


def test_ranges_and_needs_come_from_the_table():
    for flag in CONVERTER_FLAGS:
        if flag.kind is int:
            for bad in (flag.low - 1, *(() if flag.high is None else (flag.high + 1,))):
                with pytest.raises(InputError, match=f"^{flag.cli} must be"):
                    ConvertOptions(**{**_with_needs(flag), flag.field: bad})
                with pytest.raises(InputError, match=f"{flag.mnn} must be a whole number .*as {flag.cli}"):
                    ConvertOptions(extra=f"{flag.mnn}={bad}")
        if flag.needs:
            needed = next(f for f in CONVERTER_FLAGS if f.field == flag.needs)
            with pytest.raises(InputError, match=f"{flag.cli}.* need .*{needed.cli}"):
                ConvertOptions(**{flag.field: _set_value(flag)})


def test_every_row_is_a_convert_option(tmp_path):
    parser = _convert_parser()
    options = {option: action for action in parser._actions for option in action.option_strings}
    for flag in CONVERTER_FLAGS:
        action = options[flag.cli]
        assert action.dest == flag.field and action.help == flag.help
        argv = []
        for field, value in _with_needs(flag).items():
            row = next(f for f in CONVERTER_FLAGS if f.field == field)
            argv += [row.cli] if row.kind is bool else [row.cli, str(value)]
        args = parser.parse_args([str(tmp_path / "onnx"), str(tmp_path / "mnn"), *argv])
        assert options_from_args(args) == ConvertOptions(**_with_needs(flag))
    assert options_from_args(parser.parse_args(["a", "b"])) == ConvertOptions()
    # sd2mnn.convert's keywords are the same fields.
    with pytest.raises(InputError, match="need --weight-quant-bits"):
        sd2mnn.convert(tmp_path / "onnx", tmp_path / "mnn", hqq=True)


def test_sweep_variants_read_both_spellings():
    for flag in CONVERTER_FLAGS:
        for spelling in (flag.mnn, flag.cli):
            written = spelling if flag.kind is bool else f"{spelling}={flag.low}"
            assert Variant("v", written).convert_fields() == {flag.field: _set_value(flag), "extra": ""}
        assert Variant("v", f"{flag.mnn}X").convert_fields() == {"extra": f"{flag.mnn}X"}
    for variant in VARIANTS.values():  # the named variants use only the table's flags
        if variant.quantized_per_layer:
            continue  # made by sd2mnn quantize, from no flags
        fields = variant.convert_fields()
        assert fields["extra"] == "" and ConvertOptions(**fields).named_flags() == tuple(variant.flags.split())


def test_verify_calls_the_quantizing_rows_quantized():
    for flag in CONVERTER_FLAGS:
        words = ConvertOptions(**_with_needs(flag)).named_flags()
        record = ComponentRecord("unet", words, {}, (), (), (), (), 0.0, 0)
        manifest = Manifest("0", {}, list(words), "onnx", {"unet": record})
        quantized, basis = _precision("unet", Path("unused"), manifest, None)
        expected = any(f.quantizes for f in CONVERTER_FLAGS if f.field in _with_needs(flag))
        assert quantized is expected, (flag, basis)
    record = ComponentRecord("unet", ("--transformerFuse", "--someNewFlag=1"), {}, (), (), (), (), 0.0, 0)
    assert _precision("unet", Path("unused"), Manifest("0", {}, [], "onnx", {"unet": record}), None)[0] is False


def test_no_reader_spells_a_flag_itself():
    """Outside the table a flag's spelling appears only in prose (help, messages, examples) and
    in sweep's named variants, which are written as a user writes them."""
    spellings = {s for flag in CONVERTER_FLAGS for s in (flag.mnn, flag.cli)}
    root = Path(sd2mnn.__file__).parent
    for name in READERS:
        tree = ast.parse((root / name).read_text())
        variant_args = {id(node) for call in ast.walk(tree)
                        if isinstance(call, ast.Call) and getattr(call.func, "id", None) == "Variant"
                        for node in ast.walk(call)}
        literals = [node.value for node in ast.walk(tree)
                    if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in variant_args]
        spelled = sorted({text.split("=")[0] for text in literals} & spellings)
        assert not spelled, f"{name} spells {spelled}; read them from sd2mnn.conversion.converter_flags"
