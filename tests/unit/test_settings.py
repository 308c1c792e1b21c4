"""settings.py: KUBETUNE_* variables -> Settings; a bad value names its variable."""

from __future__ import annotations

import pytest

from kubetune import settings


def test_defaults_when_unset_or_empty() -> None:
    assert settings.from_env({}) == settings.from_env({"KUBETUNE_METRICS_PORT": " "})
    defaults = settings.from_env({})
    assert (defaults.namespace, defaults.trainer_image) == ("", settings.DEFAULT_TRAINER_IMAGE)
    assert (defaults.metrics_port, defaults.health_port) == (8080, 8081)
    assert defaults.allowed_licenses is None and defaults.log_format == "plain"


def test_every_variable_is_read() -> None:
    loaded = settings.from_env(
        {
            "KUBETUNE_NAMESPACE": " ml-team ",
            "KUBETUNE_TRAINER_IMAGE": "registry.example.com/trainer:1",
            "KUBETUNE_METRICS_PORT": "9090",
            "KUBETUNE_HEALTH_PORT": "9091",
            "KUBETUNE_PROGRESS_INTERVAL": "2.5",
            "KUBETUNE_PROGRESS_MIN_INTERVAL": "0.5",
            "KUBETUNE_LICENSE_ALLOWLIST": "CC0-1.0, Apache-2.0,,",
            "KUBETUNE_LOG_FORMAT": "json",
        }
    )
    assert loaded.namespace == "ml-team"
    assert loaded.trainer_image == "registry.example.com/trainer:1"
    assert (loaded.metrics_port, loaded.health_port) == (9090, 9091)
    assert (loaded.progress_interval, loaded.progress_min_interval) == (2.5, 0.5)
    assert loaded.allowed_licenses == ["CC0-1.0", "Apache-2.0"]
    assert loaded.log_format == "json"


def test_the_process_environment_is_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUBETUNE_HEALTH_PORT", "7000")
    monkeypatch.setenv("KUBETUNE_LICENSE_ALLOWLIST", "MIT")
    loaded = settings.from_env()
    assert (loaded.health_port, loaded.allowed_licenses) == (7000, ["MIT"])


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("KUBETUNE_METRICS_PORT", "http"),
        ("KUBETUNE_HEALTH_PORT", "70000"),
        ("KUBETUNE_PROGRESS_INTERVAL", "0"),
        ("KUBETUNE_PROGRESS_MIN_INTERVAL", "soon"),
        ("KUBETUNE_LOG_FORMAT", "xml"),
    ],
)
def test_a_bad_value_names_its_variable(variable: str, value: str) -> None:
    with pytest.raises(settings.SettingsError) as error:
        settings.from_env({variable: value})
    assert str(error.value).startswith(f"{variable}: ")
    assert value in str(error.value)


def test_render_with_a_bad_setting_is_one_error_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from pathlib import Path

    from kubetune import cli

    monkeypatch.setenv("KUBETUNE_LOG_FORMAT", "xml")
    example = Path(__file__).resolve().parents[2] / "examples" / "quickstart.yaml"
    assert cli.main(["render", str(example)]) == 10
    assert capsys.readouterr().err.splitlines() == [
        "error: KUBETUNE_LOG_FORMAT: Input should be 'plain' or 'json' (got 'xml')"
    ]
