"""Configuration from the environment: defaults, every variable, one clear error per bad value."""

from __future__ import annotations

from pathlib import Path

import pytest

from loader.errors import ConfigError
from loader.settings import Settings


def test_defaults_from_an_empty_environment() -> None:
    settings = Settings.from_env({})
    assert settings.resource_api_url == "https://api.azaion.com"
    assert settings.cdn_url == "https://cdn.azaion.com"
    assert settings.images_path == Path("/opt/azaion/images.enc")
    assert settings.api_version == "latest"
    assert settings.model_cache_dir == Path("/var/lib/azaion-loader/models")
    assert settings.socket_path == Path("/run/azaion-loader.sock")
    assert settings.docker_host is None


def test_every_variable_is_read() -> None:
    settings = Settings.from_env(
        {
            "RESOURCE_API_URL": "http://127.0.0.1:8080/",
            "CDN_URL": "https://cdn.example.test/base",
            "IMAGES_PATH": "/data/images.enc",
            "API_VERSION": "2.4.1",
            "MODEL_CACHE_DIR": "/cache",
            "LOADER_SOCKET": "./loader.sock",
            "DOCKER_HOST": "unix:///run/docker.sock",
            "CONNECT_TIMEOUT": "3",
            "API_TIMEOUT": "7.5",
            "READ_TIMEOUT": "120",
            "API_RETRIES": "0",
            "SHUTDOWN_GRACE": "2",
            "MAX_UPLOAD_BYTES": "1024",
            "LOG_LEVEL": "DEBUG",
        }
    )
    assert settings.resource_api_url == "http://127.0.0.1:8080"
    assert settings.cdn_url == "https://cdn.example.test/base"
    assert settings.images_path == Path("/data/images.enc")
    assert settings.api_version == "2.4.1"
    assert settings.socket_path == Path("loader.sock")
    assert settings.docker_host == "unix:///run/docker.sock"
    assert (settings.connect_timeout, settings.api_timeout, settings.read_timeout) == (3, 7.5, 120)
    assert settings.api_retries == 0
    assert settings.max_upload_bytes == 1024
    assert settings.log_level == "debug"


def test_empty_values_mean_the_default() -> None:
    assert Settings.from_env({"API_VERSION": "", "CDN_URL": "  "}) == Settings()


@pytest.mark.parametrize(
    ("name", "value", "problem"),
    [
        ("RESOURCE_API_URL", "ftp://api", "http:// or https://"),
        ("RESOURCE_API_URL", "api.azaion.com", "http:// or https://"),
        ("CDN_URL", "https://", "must name a host"),
        ("CDN_URL", "https://cdn/?x=1", "query"),
        ("API_VERSION", "has space", "Docker tag"),
        ("API_VERSION", "-lead", "Docker tag"),
        ("LOADER_SOCKET", "/" + "s" * 120, "107 bytes"),
        ("IMAGES_PATH", "a\0b", "NUL"),
        ("DOCKER_HOST", "/var/run/docker.sock", "unix://"),
        ("API_TIMEOUT", "soon", "number of seconds"),
        ("READ_TIMEOUT", "0", "positive"),
        ("CONNECT_TIMEOUT", "-1", "positive"),
        ("SHUTDOWN_GRACE", "nan", "positive"),
        ("API_RETRIES", "-1", "whole number"),
        ("API_RETRIES", "1000", "whole number"),
        ("MAX_UPLOAD_BYTES", "8G", "bytes"),
        ("LOG_LEVEL", "loud", "one of"),
        ("ALLOWED_GROUPS", "no-such-group-azl", "no group named"),
        ("ALLOWED_GROUPS", " , ", "at least one"),
        ("ALLOWED_UIDS", "no-such-user-azl", "no user named"),
        ("TLS_CA_FILE", "/nonexistent/ca.pem", "cannot read it"),
    ],
)
def test_a_bad_value_names_its_variable(name: str, value: str, problem: str) -> None:
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({name: value})
    assert caught.value.variable == name
    assert caught.value.message.startswith(f"{name}: ")
    assert problem in caught.value.message


def test_allowed_callers_by_name_or_number() -> None:
    settings = Settings.from_env({"ALLOWED_GROUPS": "root, 4242", "ALLOWED_UIDS": "0,1000"})
    assert settings.allowed_groups == (0, 4242)
    assert settings.allowed_uids == (0, 1000)


@pytest.mark.parametrize(("raw", "value"), [("1", True), ("yes", True), ("0", False), ("", False)])
def test_require_integrity(raw: str, value: bool) -> None:
    assert Settings.from_env({"REQUIRE_INTEGRITY": raw}).require_integrity is value
