"""Conversion, generation and verification of the demo pipeline give exactly what they gave
before the model family facts moved into sd2mnn.families (tests/data/demo_behaviour.json)."""
from __future__ import annotations

import json

from behaviour import FIXTURE, fingerprint


def test_demo_behaviour_is_unchanged(tmp_path):
    recorded = json.loads(FIXTURE.read_text())
    now = fingerprint(tmp_path)
    assert now["manifest"]["family"] == "sd15"
    assert now["files"] == recorded["files"]
    assert now["manifest"] == recorded["manifest"]
    assert now["pixels"] == recorded["pixels"]
    # New in verify's report for families of several text encoders: the family, notes, and the
    # conditioning check of each text encoder (SD1.5's one is "conditioning", as recorded).
    verification = now["verification"]
    assert verification.pop("family") == "sd15" and verification.pop("notes") == []
    assert verification.pop("conditionings") == [verification["conditioning"]]
    assert verification["conditioning"].pop("component") == "text_encoder"
    assert now["verification"] == recorded["verification"]
