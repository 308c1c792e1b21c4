"""Operator settings from the environment: the only place that reads env.

The Helm chart sets these variables; `kubetune operator` flags override some of them. Every
field is read from ``KUBETUNE_<FIELD>`` (pydantic-settings); an empty value means the default.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

DEFAULT_TRAINER_IMAGE = "ghcr.io/kubetune/trainer:0.1.0"
# spec.staging's engine images (spec.staging.image overrides): GPU and CPU builds of vLLM.
DEFAULT_VLLM_IMAGE = "docker.io/vllm/vllm-openai:v0.32.0"
DEFAULT_VLLM_CPU_IMAGE = "public.ecr.aws/q9t5s3a7/vllm-cpu-release-repo:v0.32.0"
ENV_PREFIX = "KUBETUNE_"

Port = Annotated[int, Field(gt=0, lt=65536)]
Seconds = Annotated[float, Field(gt=0)]


class SettingsError(ValueError):
    """A setting has a value the operator cannot use; the message names the variable."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_ignore_empty=True, frozen=True, extra="ignore"
    )

    namespace: str = ""  # empty: watch every namespace
    trainer_image: str = DEFAULT_TRAINER_IMAGE
    metrics_port: Port = 8080
    health_port: Port = 8081
    progress_interval: Seconds = 10.0  # seconds between reads of a running trainer's /metrics
    # At most one progress-only status patch per job per this many seconds; phase changes are
    # written at once. Lowered only by tests that want to see several progress updates.
    progress_min_interval: Seconds = 10.0
    # Comma-separated in the environment.
    license_allowlist: Annotated[tuple[str, ...], NoDecode] = ()
    log_format: Literal["plain", "json"] = "plain"
    # kopf's CRD scanning (notices CRDs installed after the start) needs list/watch on
    # customresourcedefinitions: on only where the chart grants it (rbac.watchCRDs).
    watch_crds: bool = False
    # Plan each job before creating its Job (status.plan, DoesNotFit): read the model's
    # config.json and safetensors headers from S3 with the operator's own identity (the
    # boto3 default chain: IRSA / workload identity, or AWS_* from the chart's optional Secret).
    plan_models: bool = False
    vllm_image: str = DEFAULT_VLLM_IMAGE
    vllm_cpu_image: str = DEFAULT_VLLM_CPU_IMAGE
    # How spec.staging deploys the engine: auto (an InferenceService where KServe's CRD is
    # served, a Deployment + Service elsewhere), deployment, or inferenceservice.
    staging_engine: Literal["auto", "deployment", "inferenceservice"] = "auto"

    @field_validator(
        "namespace",
        "trainer_image",
        "log_format",
        "vllm_image",
        "vllm_cpu_image",
        "staging_engine",
        mode="before",
    )
    @classmethod
    def _strip(cls, value: Any) -> Any:
        return value.strip() if isinstance(value, str) else value

    @field_validator("license_allowlist", mode="before")
    @classmethod
    def _split(cls, value: Any) -> Any:
        if isinstance(value, str):
            return tuple(item.strip() for item in value.split(",") if item.strip())
        return value

    @property
    def allowed_licenses(self) -> list[str] | None:
        return list(self.license_allowlist) or None


class _Given(Settings):
    """Settings from explicit values only, not the process environment (``from_env(env)``)."""

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings,)


def from_env(env: Mapping[str, str] | None = None) -> Settings:
    """Read KUBETUNE_* variables (``env``, default the process environment); raises
    SettingsError naming the variable at fault."""
    try:
        if env is None:
            return Settings()
        values: dict[str, Any] = {
            name: env[f"{ENV_PREFIX}{name.upper()}"].strip()
            for name in Settings.model_fields
            if env.get(f"{ENV_PREFIX}{name.upper()}", "").strip()
        }
        return Settings.model_construct(**dict(_Given(**values)))
    except ValidationError as error:
        item = error.errors()[0]
        variable = f"{ENV_PREFIX}{str(item['loc'][0]).upper()}" if item["loc"] else ENV_PREFIX
        raise SettingsError(f"{variable}: {item['msg']} (got {item['input']!r})") from None
