"""The inference service's settings: environment variables ``SOMAFLOW_SERVE_*`` (pydantic-settings).

``somaflow serve`` turns its options into these variables; a container sets them
directly. Lists take JSON or commas (``SOMAFLOW_SERVE_MODELS=stneuronet,3cnet``),
mappings take JSON (``SOMAFLOW_SERVE_WEIGHTS='{"unet2d": "/weights/unet.safetensors"}'``).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from somaflow.inference import SHIPPED

#: largest batch Triton's dynamic batcher forms, per model: the detectors' examples are whole
#: movie batches (up to 180 x 304 x 304 floats each), the classifiers' small crops and windows
DEFAULT_MAX_BATCH = {"stneuronet": 4, "convnet2p1d": 4, "meanimage2d": 16, "unet2d": 16,
                     "3cnet": 256, "3cnet-plus": 256, "lstm": 256}


def _split(value: Any) -> Any:
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            import json

            return json.loads(text)
        return [v.strip() for v in text.split(",") if v.strip()]
    return value


class ServeSettings(BaseSettings):
    """Every setting of the inference service."""

    model_config = SettingsConfigDict(env_prefix="SOMAFLOW_SERVE_", frozen=True, extra="forbid")

    host: str = Field("127.0.0.1", description="address the HTTP, gRPC and metrics ports bind to "
                                               "(0.0.0.0: every interface, as in a container)")
    http_port: int = Field(8000, ge=0, le=65535, description="HTTP (Open Inference Protocol) port")
    grpc_port: int = Field(8001, ge=0, le=65535, description="gRPC port")
    metrics_port: int = Field(8002, ge=0, le=65535, description="Prometheus metrics port (/metrics)")
    models: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: list(SHIPPED), description="registry names of the models to serve")
    weights: dict[str, str] = Field(
        default_factory=dict, description="model -> safetensors checkpoint path or URL; others: the shipped ones")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="cuda: one model instance per visible GPU; cpu: one on the CPU; auto: cuda when "
                            "torch sees a GPU")
    precision: Literal["fp32", "fp16", "bf16"] = Field(
        "fp32", description="compute precision on GPUs (inputs and outputs stay float32); the CPU runs fp32")
    max_batch_size: int | dict[str, int] = Field(
        default_factory=dict, description="largest dynamic batch: one number for every model, or model -> number "
                                          "(defaults: DEFAULT_MAX_BATCH)")
    preferred_batch_sizes: dict[str, list[int]] = Field(
        default_factory=dict, description="model -> batch sizes the batcher forms without waiting longer "
                                          "(default: none, i.e. as large as possible)")
    max_queue_delay_us: int = Field(2000, ge=0, description="how long a request may wait for others to join "
                                                            "its batch (microseconds)")
    max_request_bytes: int = Field(64 << 20, gt=0, description="largest tensor payload of one request (bytes); "
                                                               "larger requests get HTTP 400 before any model code")
    token: SecretStr | None = Field(None, description="access token: inference requests must carry it in the "
                                                      "'somaflow-token' header (Triton's restricted API)")
    log_verbose: int = Field(0, ge=0, description="Triton's verbose log level")

    @field_validator("models", mode="before")
    @classmethod
    def _models_list(cls, v: Any) -> Any:
        return _split(v)

    @model_validator(mode="after")
    def _known(self) -> ServeSettings:
        per_model = self.max_batch_size if isinstance(self.max_batch_size, dict) else {}
        unknown = [m for m in [*self.models, *self.weights, *per_model, *self.preferred_batch_sizes]
                   if m not in SHIPPED]
        if unknown:
            raise ValueError(f"unknown model(s) {sorted(set(unknown))}; somaflow serves {', '.join(SHIPPED)}")
        if not self.models:
            raise ValueError("no models to serve")
        for m in self.models:
            if self.batch_limit(m) < 1:
                raise ValueError(f"max_batch_size of {m} must be at least 1, got {self.batch_limit(m)}")
        for m, sizes in self.preferred_batch_sizes.items():
            if any(s < 1 or s > self.batch_limit(m) for s in sizes):
                raise ValueError(f"preferred batch sizes of {m} must lie in 1..{self.batch_limit(m)}, got {sizes}")
        return self

    def batch_limit(self, model: str) -> int:
        """The largest dynamic batch of ``model``."""
        if isinstance(self.max_batch_size, int):
            return self.max_batch_size
        return self.max_batch_size.get(model, DEFAULT_MAX_BATCH[model])
