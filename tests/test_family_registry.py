"""A family is one registry entry the engines ask: no module outside the families' own code decides
what to do by comparing a Family attribute (``family.denoiser == "transformer"``, ``family.name !=
SD15.name``, ``family is SD15``) or a component or tokenizer folder name (``name == "unet"``,
``"text_encoder_3" in ...``). Such a branch is what a new family would have to find and edit."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

import sd2mnn
from sd2mnn.errors import InputError
from sd2mnn.exporters import exporter_for
from sd2mnn.families import FAMILIES
from sd2mnn.recipes import steps_for

PACKAGE = Path(sd2mnn.__file__).parent
# The families' own code: their specs, and the per-family recipe and exporter modules.
FAMILY_CODE = ("families",)
FAMILY_MODULES = {f.steps_module for f in FAMILIES.values()} | {f.exporter_module for f in FAMILIES.values()} \
    | {"sd2mnn.exporters.vae"}
FAMILY_ATTRIBUTES = {"name", "denoiser", "tokenizer_model", "title"}
FAMILY_CONSTANTS = {"SD15", "TAIYI", "SD35"}
COMPONENT_NAMES = {n for f in FAMILIES.values()
                   for n in (*f.components, *map(f.model_folder, f.components), *f.prompt_formats, f.denoiser)}


def _names_a_family(node: ast.AST) -> bool:
    """``family``, ``self.family``, ``source.family``, ``SD15``: an expression that is a Family."""
    if isinstance(node, ast.Name):
        return node.id in FAMILY_CONSTANTS or node.id.endswith("family")
    return isinstance(node, ast.Attribute) and node.attr.endswith("family")


def _is_family_fact(node: ast.AST) -> bool:
    if isinstance(node, ast.Attribute) and node.attr in FAMILY_ATTRIBUTES:
        return _names_a_family(node.value)
    return isinstance(node, ast.Name) and node.id in FAMILY_CONSTANTS


def _is_component_literal(node: ast.AST) -> bool:
    if isinstance(node, ast.Constant):
        return node.value in COMPONENT_NAMES
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return any(_is_component_literal(e) for e in node.elts)
    return False


def branches_on_family(source: str) -> list[str]:
    """The lines of ``source`` that compare a Family attribute or a component name."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            if any(_is_family_fact(o) or _is_component_literal(o) for o in operands):
                found.append(f"{node.lineno}: {ast.unparse(node)}")
        elif isinstance(node, ast.Match):
            patterns = [p for case in node.cases for p in ast.walk(case.pattern) if isinstance(p, ast.MatchValue)]
            if _is_family_fact(node.subject) or any(_is_component_literal(p.value) for p in patterns):
                found.append(f"{node.lineno}: match {ast.unparse(node.subject)}")
    return found


def engine_modules() -> list[Path]:
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE)
        module = ".".join(("sd2mnn", *rel.with_suffix("").parts))
        if rel.parts[0] not in FAMILY_CODE and module not in FAMILY_MODULES:
            out.append(path)
    return out


@pytest.mark.parametrize("snippet", [
    'if family.denoiser == "transformer": pass',
    "if self.family.name != SD15.name: pass",
    "x = family is not SD15",
    'x = name in ("text_encoder_3", "x")',
    'x = "tokenizer_3" == folder',
    'x = source.family.tokenizer_model == "BPE"',
    "match family.denoiser:\n    case _: pass",
    'match name:\n    case "unet": pass',
])
def test_the_check_finds_a_branch_on_the_family(snippet):
    assert branches_on_family(snippet)


@pytest.mark.parametrize("snippet", [
    'x = outputs["text_encoder"]',  # a lookup in a table, not a decision
    "x = name == family.text_encoder",  # asking the family
    'x = var.name == "input_ids"',  # a tensor's name
])
def test_the_check_leaves_asking_the_family_alone(snippet):
    assert not branches_on_family(snippet)


def test_no_engine_module_branches_on_the_family():
    modules = engine_modules()
    assert PACKAGE / "generation" / "pipeline.py" in modules and PACKAGE / "exporting" / "export.py" in modules
    assert not any(p.parts[-2] == "families" for p in modules)
    found = {str(p.relative_to(PACKAGE)): hits for p in modules if (hits := branches_on_family(p.read_text()))}
    assert found == {}


def test_each_family_names_its_code():
    for family in FAMILIES.values():
        assert family.title
        if family.steps_module:
            assert steps_for(family) is not None
        else:  # a family sd2mnn exports, converts and verifies but does not draw with in Python
            with pytest.raises(InputError, match=f"sd2mnn cannot draw with {family.title} bundles in Python yet"):
                steps_for(family)
        exporter = exporter_for(family)
        assert set(exporter.order) == set(family.components) == set(exporter.jobs) == set(exporter.terms)
