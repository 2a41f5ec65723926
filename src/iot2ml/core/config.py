"""One typed settings object for every component.

Precedence: explicit argument > environment (``IOT2ML_<FIELD>``) > ``iot2ml.toml`` > default.
The TOML file is ``$IOT2ML_CONFIG`` if set, else ``./iot2ml.toml`` if present.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError, computed_field, field_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, TomlConfigSettingsSource

from .errors import ConfigError


class Settings(BaseSettings):
    """Settings of the whole platform. Every component reads the same object."""

    model_config = SettingsConfigDict(env_prefix="IOT2ML_", extra="forbid", validate_default=True)

    data_dir: Path = Field(Path("./data"), description="Where the lake, broker store, catalog and run files live.")
    host: str = Field("127.0.0.1", description="Address the broker and the API listen on.")
    nats_port: int = Field(4222, ge=0, le=65535, description="NATS client port of the embedded broker (0 = pick a free one).")
    mqtt_port: int = Field(1883, ge=0, le=65535, description="MQTT port of the embedded broker (0 = pick a free one).")
    http_port: int = Field(8080, ge=0, le=65535, description="HTTP API port (0 = pick a free one).")
    catalog_url: str | None = Field(None, description="SQLAlchemy URL of the device catalog; default sqlite under data_dir.")
    lake_uri: str | None = Field(None, description="Where Delta tables live: a path or s3://bucket/prefix; default data_dir/lake.")
    lake_storage_options: dict[str, str] = Field(default_factory=dict, description="deltalake storage options (S3 endpoint, keys).")
    mqtt_url: str | None = Field(None, description="External MQTT broker to ingest from, e.g. mqtt://host:1883.")
    mqtt_username: str | None = Field(None, description="Username for the external MQTT broker.")
    mqtt_password: str | None = Field(None, description="Password for the external MQTT broker.")
    tls: bool = Field(False, description="HTTPS for the API and serving, MQTT over TLS with client certificates "
                      "on mqtts_port; the server certificate is tls_cert_file or one the platform CA signs.")
    mqtts_port: int | None = Field(None, ge=0, le=65535, description="MQTT-over-TLS port (devices log in with "
                                   "their certificate); setting it turns TLS on; default 8883 with tls.")
    tls_cert_file: Path | None = Field(None, description="Server certificate (PEM) of the TLS listeners; "
                                       "setting it turns TLS on. Default: made and signed by the platform CA.")
    tls_key_file: Path | None = Field(None, description="Private key (PEM) of tls_cert_file.")
    plain_mqtt: bool = Field(True, description="Keep the plain MQTT listener (token log-in) when TLS is on.")
    ca_cert_file: Path | None = Field(None, description="Your own CA certificate (PEM) for device certificates; "
                                      "default: a CA made under data_dir/ca.")
    ca_key_file: Path | None = Field(None, description="The private key (PEM) of ca_cert_file.")
    device_cert_days: float = Field(365.0, gt=0, description="Days a device certificate is valid.")
    max_payload_bytes: int = Field(256 * 1024, gt=0, description="Largest accepted message or HTTP body, in bytes.")
    flush_interval: float = Field(0.5, gt=0, le=60, description="Seconds between lake commits while data flows.")
    flush_max_rows: int = Field(200_000, gt=0, description="Commit early once this many readings are buffered.")
    queue_max_messages: int = Field(200_000, gt=0, description="Messages buffered in the ingest before it stops reading.")
    queue_max_bytes: int = Field(16 * 1024**2, gt=0, description="Payload bytes buffered in the ingest before it stops reading.")
    dedup_window: float = Field(600.0, ge=0, description="Seconds a (device_id, msg_id) pair is remembered to drop resends.")
    raw_retention_days: float = Field(30.0, gt=0, description="Rows of the raw table older than this are deleted.")
    compact_interval: float = Field(60.0, gt=0, description="Seconds between background compaction passes.")
    compact_min_files: int = Field(16, ge=2, description="Compact a table once it has this many small files.")
    vacuum_retention_hours: float = Field(1.0, ge=0, description="Hours a file replaced by compaction stays for readers.")
    stream_max_bytes: int = Field(10 * 1024**3, gt=0, description="Broker-side buffer of telemetry (JetStream stream bytes).")
    stream_max_age_hours: float = Field(72.0, gt=0, description="Broker-side buffer of telemetry, by age.")
    mlflow_tracking_uri: str | None = Field(None, description="MLflow tracking/registry URI; default sqlite under data_dir.")
    mlflow_artifact_root: str | None = Field(None, description="Where model artifacts go (path or s3://); default data_dir/mlartifacts.")
    schedule_poll: float = Field(10.0, gt=0, description="Seconds between checks of the retraining schedules.")
    serve_port: int = Field(8090, ge=0, le=65535, description="Port of the serving runtime (0 = pick a free one).")
    serve_poll: float = Field(1.0, gt=0, le=60, description="Seconds between checks for deployment or champion changes.")
    serve_max_models: int = Field(16, ge=1, description="Model versions kept loaded per serving process (LRU).")
    serve_max_model_mb: float = Field(4096.0, gt=0, description="Memory the loaded models may take, in MB (LRU).")
    serve_max_batch: int = Field(512, ge=1, description="Most rows one model call answers (micro-batching).")
    serve_log_predictions: bool = Field(True, description="Write every answer to the prediction_log table.")
    capture_sample: float = Field(1.0, ge=0, le=1, description="Share of the instances each model answers "
                                  "(REST, MQTT, streamed rows) kept in the model_inputs table for drift (0 = none).")
    capture_max_per_second: int = Field(1000, ge=0, description="Most instances per model and second kept in "
                                        "model_inputs; the rest are counted as capped.")
    platform_wait: float = Field(30.0, ge=0, description="Seconds a command that needs the running platform "
                                 "(simulate) waits for one that is starting.")
    monitor_group_wait: float = Field(30.0, ge=0, description="Seconds a new alert group waits before its first "
                                      "notification (Alertmanager's group_wait).")
    monitor_group_interval: float = Field(300.0, gt=0, description="Seconds between notifications about changes "
                                          "of a notified alert group (Alertmanager's group_interval).")
    monitor_repeat_interval: float = Field(4 * 3600.0, ge=0, description="Seconds before an unchanged firing "
                                           "group is notified again (Alertmanager's repeat_interval).")
    auth_access_ttl: float = Field(900.0, gt=0, description="Seconds a user's access token (JWT) is valid.")
    auth_refresh_ttl: float = Field(7 * 86400.0, gt=0, description="Seconds a refresh token is valid (each "
                                    "refresh answers a new one).")
    auth_audience: str = Field("iot2ml", min_length=1, description="The 'aud' claim access tokens carry and "
                               "must carry to be accepted.")
    auth_max_failures: int = Field(5, ge=1, description="Failed logins in a row before a user is locked out.")
    auth_max_failures_per_address: int = Field(20, ge=1, description="Failed logins from one client address "
                                               "before it is locked out.")
    auth_lockout: float = Field(30.0, ge=0, description="Seconds of the first lockout; each further failure "
                                "doubles it.")
    auth_lockout_max: float = Field(900.0, ge=0, description="Longest lockout, in seconds.")
    query_timeout: float = Field(30.0, gt=0, description="Seconds a SQL query may run.")
    query_max_rows: int = Field(100_000, gt=0, description="Most rows a SQL query returns.")
    # Limits (auth/limits.py)
    limit_device_rate: float = Field(1000.0, ge=0, description="Requests (HTTP) and messages (MQTT) a device "
                                     "may send per second, sustained (0 = no limit).")
    limit_device_burst: float = Field(20_000.0, ge=1, description="Requests or messages a device may send at "
                                      "once above limit_device_rate (token bucket size).")
    limit_device_bytes: float = Field(8 * 1024**2, ge=0, description="Payload bytes a device may send per "
                                      "second, sustained: telemetry, MQTT messages, prediction bodies (0 = no limit).")
    limit_device_bytes_burst: float = Field(64 * 1024**2, ge=1, description="Payload bytes a device may send at "
                                            "once above limit_device_bytes (token bucket size).")
    limit_key_rate: float = Field(1000.0, ge=0, description="HTTP requests an API key or a user may make per "
                                  "second, sustained (0 = no limit).")
    limit_key_burst: float = Field(20_000.0, ge=1, description="HTTP requests an API key or a user may make at "
                                   "once above limit_key_rate (token bucket size).")

    @field_validator("data_dir")
    @classmethod
    def _expand(cls, value: Path) -> Path:
        return value.expanduser()

    @property
    def catalog(self) -> str:
        """The catalog URL in force."""
        return self.catalog_url or f"sqlite:///{(self.data_dir / 'catalog.db').absolute()}"

    @computed_field  # type: ignore[prop-decorator]
    @property
    def tls_on(self) -> bool:
        """TLS is on: ``tls``, or a TLS port or certificate given."""
        return self.tls or self.mqtts_port is not None or self.tls_cert_file is not None

    @computed_field  # type: ignore[prop-decorator]
    @property
    def http_scheme(self) -> str:
        """``https`` when TLS is on (the API and serving then answer HTTPS only), else ``http``."""
        return "https" if self.tls_on else "http"

    @computed_field  # type: ignore[prop-decorator]
    @property
    def mqtt_plain_on(self) -> bool:
        """The plain MQTT listener (token log-in) runs: TLS is off, or ``plain_mqtt`` keeps it."""
        return self.plain_mqtt or not self.tls_on

    @property
    def mqtts_port_in_force(self) -> int | None:
        """The MQTT-over-TLS port (8883 unless set), or ``None`` while TLS is off."""
        if not self.tls_on:
            return None
        return 8883 if self.mqtts_port is None else self.mqtts_port

    @property
    def lake(self) -> str:
        """The lake root in force."""
        return self.lake_uri or str((self.data_dir / "lake").absolute())

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        toml = os.environ.get("IOT2ML_CONFIG") or "iot2ml.toml"
        return (init_settings, env_settings, TomlConfigSettingsSource(settings_cls, toml_file=toml))


def load_settings(**overrides: Any) -> Settings:
    """Build the settings, dropping ``None`` overrides; a bad value raises ``ConfigError``."""
    given = {k: v for k, v in overrides.items() if v is not None}
    try:
        return Settings(**given)
    except ValidationError as err:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '?'}={e.get('input')!r}: {e['msg']}" for e in err.errors()
        )
        raise ConfigError(f"bad setting: {problems}") from None
