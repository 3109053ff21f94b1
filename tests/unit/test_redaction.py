"""Credentials masked: the masking functions on hard inputs, and each place a setting shows."""

from __future__ import annotations

import logging

import pytest
from pydantic import ValidationError
from sqlalchemy.exc import ArgumentError

from fictures_ai.config import Settings, describe_settings_error
from fictures_ai.database import masked, normalise_url
from fictures_ai.observability.tracing import build_tracer_provider
from fictures_ai.redaction import mask_credentials, mask_setting, mask_url
from fictures_ai.services.keys.base import first_line

CANARY = "canary-7f3a"


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql://user:PASSWORD@host/db", "postgresql://user:***@host/db"),
        ("postgresql+psycopg://u:pw@db:5432/keys", "postgresql+psycopg://u:***@db:5432/keys"),
        ("redis://:pass@cache:6379/0", "redis://:***@cache:6379/0"),
        ("rediss://default:pass@cache:6380", "rediss://default:***@cache:6380"),
        # Percent-encoded special characters, and the same characters left unencoded.
        ("postgresql://u:a%40b%3Ac%2Fd%23e%25f@h/db", "postgresql://u:***@h/db"),
        ("postgresql://u:a@b@h/db", "postgresql://u:***@h/db"),
        ("postgresql://u:a#b@h/db", "postgresql://u:***@h/db"),
        ("postgresql://u:a/b@h/db", "postgresql://u:***@h/db"),
        ("postgresql://u:a:b@h/db", "postgresql://u:***@h/db"),
        ("postgresql://u:a?b@h/db", "postgresql://u:***@h/db"),
        ("postgresql://u:a b@h/db", "postgresql://u:***@h/db"),
        ("postgresql://u:a%b@h/db", "postgresql://u:***@h/db"),
        # A user name with an @ (some hosted databases use user@server).
        ("postgresql://u@srv:pw@h/db", "postgresql://u@srv:***@h/db"),
        # Passwords as query parameters, which psycopg and redis-py accept too.
        ("postgresql://u@h/db?password=pw&sslmode=require", "postgresql://u@h/db?password=***&sslmode=require"),
        ("postgresql://u@h/db?sslmode=require&sslpassword=pw", "postgresql://u@h/db?sslmode=require&sslpassword=***"),
        ("redis://cache:6379/0?password=pw", "redis://cache:6379/0?password=***"),
        ("https://collector:4318?api_key=k&access_token=t", "https://collector:4318?api_key=***&access_token=***"),
        # Several hosts, IPv6, and URLs that fail to parse.
        ("postgresql://u:pw@h1:5432,h2:5433/db", "postgresql://u:***@h1:5432,h2:5433/db"),
        ("postgresql://u:pw@[::1]:5432/db", "postgresql://u:***@[::1]:5432/db"),
        ("http://u:pw@[bad", "http://u:***@[bad"),
        ("http://[bad@x", "http://***@x"),
        ("postgresql://u:pw@h:notaport/db", "postgresql://u:***@h:notaport/db"),
        # A lone userinfo: a user name in a database URL, maybe a token anywhere else.
        ("postgresql://fictures@h/db", "postgresql://fictures@h/db"),
        ("redis://pw@cache:6379", "redis://***@cache:6379"),
        ("https://token@collector:4318", "https://***@collector:4318"),
        # Nothing to hide.
        ("sqlite:////var/lib/fictures-ai/keys.db", "sqlite:////var/lib/fictures-ai/keys.db"),
        ("postgresql://h/db?application_name=fictures", "postgresql://h/db?application_name=fictures"),
        ("http://collector:4318", "http://collector:4318"),
        ("", ""),
    ],
)  # fmt: skip
def test_mask_url_hides_the_password_of_hard_urls(url: str, shown: str) -> None:
    assert mask_url(url) == shown


@pytest.mark.parametrize(
    "value",
    [
        f"postgresql://u:{CANARY}@h/db",
        f"postgresql://u:{CANARY}@@h/db",
        f"postgresql://u:x@{CANARY}@h/db",
        f"postgresql://u:x@{CANARY}:12@h/db",
        f"postgresql://u:{CANARY}#/:@h/db?x=1",
        f"postgresql://u@h/db?password={CANARY}",
        f"postgresql://u@h/db?PASSWORD='{CANARY} x'",
        f"redis://:{CANARY}@h",
        f"redis://{CANARY}@h",
        f"rediss://u:{CANARY}@h:6380/0",
        f"http://otel:{CANARY}@collector",
        f"http://collector?token={CANARY}",
        f"host=db user=u password={CANARY} dbname=keys",  # a libpq string where a URL belongs
        f"host=db password='{CANARY} with spaces'",
        CANARY,  # a bare password where a URL belongs
        f"  {CANARY}  ",
        f"://{CANARY}",
    ],
)
def test_a_credential_setting_never_shows_its_password(value: str) -> None:
    assert CANARY not in mask_setting(value)


def test_mask_credentials_masks_every_url_in_a_message() -> None:
    text = (
        f"cannot reach 'postgresql://u:{CANARY}@db/keys' nor redis://:{CANARY}@cache "
        f"(options: password={CANARY}, pepper={CANARY}); see http://docs.example/errors"
    )
    shown = mask_credentials(text)
    assert CANARY not in shown
    assert "'postgresql://u:***@db/keys'" in shown
    assert "redis://:***@cache" in shown
    assert "http://docs.example/errors" in shown


def test_masking_text_without_credentials_changes_nothing() -> None:
    for text in ("Qwen/Qwen3-0.6B", "http://localhost:3000,https://fictures.example", "key: x"):
        assert mask_credentials(text) == text


def test_settings_with_credentials_are_marked_secret() -> None:
    # Any setting named like a URL, endpoint, token, secret or password holds one.
    words = {"token", "secret", "password", "credential", "headers", "pepper"}
    named = {
        name
        for name in Settings.model_fields
        if name.endswith(("_url", "_endpoint")) or words & set(name.split("_"))
    }
    assert named <= Settings.secret_fields()
    assert Settings.secret_fields() == {
        "database_url",
        "api_key_pepper",
        "fictures_database_url",
        "redis_url",
        "otlp_endpoint",
        "webhook_secret",
    }


def secret_settings() -> Settings:
    return Settings(  # type: ignore[call-arg]
        _env_file=None,
        database_url=f"postgresql://server:{CANARY}%40x@db:5432/fictures_ai",
        api_key_store="fictures",
        fictures_database_url=f"postgresql://web@db/fictures?password={CANARY}",
        redis_url=f"redis://{CANARY}@cache:6379/0",
        otlp_endpoint=f"http://otel:{CANARY}@collector:4318",
        api_key_pepper=CANARY * 4,
    )


def test_the_start_up_line_and_repr_mask_every_credential() -> None:
    settings = secret_settings()
    changed = settings.non_default_items()
    assert changed["database_url"] == "postgresql://server:***@db:5432/fictures_ai"
    assert changed["fictures_database_url"] == "postgresql://web@db/fictures?password=***"
    assert changed["redis_url"] == "redis://***@cache:6379/0"
    assert changed["otlp_endpoint"] == "http://otel:***@collector:4318"
    assert changed["api_key_pepper"] == "***"
    assert CANARY not in str(changed)
    assert CANARY not in repr(settings)
    assert "redis_url='redis://***@cache:6379/0'" in repr(settings)
    # The values themselves are untouched: the services connect with them.
    assert settings.redis_url == f"redis://{CANARY}@cache:6379/0"


@pytest.mark.parametrize(
    "pepper",
    [
        f"https://averyveryveryverylongsecretpepper-{CANARY}",
        f"x://{CANARY}" + "0" * 32,
        f"postgresql://u:x@h/{CANARY}" + "0" * 32,
    ],
)
def test_the_pepper_is_hidden_whole_even_when_it_looks_like_a_url(pepper: str) -> None:
    # mask_setting would show a URL's host and path: the pepper has none, it is all secret.
    settings = Settings(_env_file=None, api_key_pepper=pepper)  # type: ignore[call-arg]
    assert settings.non_default_items()["api_key_pepper"] == "***"
    assert "api_key_pepper='***'" in repr(settings)
    assert CANARY not in repr(settings)


def test_a_too_short_pepper_that_looks_like_a_url_is_refused_masked(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("API_KEY_PEPPER", f"x://{CANARY}")
    with pytest.raises(ValidationError) as caught:
        Settings(_env_file=None)  # type: ignore[call-arg]
    assert describe_settings_error(caught.value).startswith("API_KEY_PEPPER='***': ")


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("DATABASE_URL", f"mysql://u:{CANARY}@db/keys"),
        ("DATABASE_URL", f"postgresql://u:{CANARY}@x@db/keys"),  # an unencoded @
        ("DATABASE_URL", f"postgresql://u:x@{CANARY}:5432@db/keys"),  # ... before a colon
        ("DATABASE_URL", f"host=db password={CANARY}"),
        ("FICTURES_DATABASE_URL", CANARY),
        ("OTLP_ENDPOINT", f"http://otel:{CANARY}@collector:port"),
        ("OTLP_ENDPOINT", f"grpc://otel:{CANARY}@collector"),
        ("API_KEY_PEPPER", CANARY),  # too short
        ("API_KEY_PEPPER", f"x://{CANARY}"),  # too short, and shaped like a URL
    ],
)
def test_invalid_credential_settings_are_refused_without_showing_them(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError) as caught:
        Settings(_env_file=None)  # type: ignore[call-arg]
    described = describe_settings_error(caught.value)
    assert described.startswith(f"{name}=")
    assert CANARY not in described
    # pydantic's own text (a traceback's last line) does not quote the inputs either.
    assert CANARY not in str(caught.value)


def test_a_model_level_error_does_not_show_the_other_settings(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # An "after" model validator's input is every setting at once.
    monkeypatch.setenv("DATABASE_URL", f"postgresql://u:{CANARY}@db/keys")
    monkeypatch.setenv("REDIS_URL", f"redis://:{CANARY}@cache")
    monkeypatch.setenv("API_KEY_STORE", "fictures")
    with pytest.raises(ValidationError) as caught:
        Settings(_env_file=None)  # type: ignore[call-arg]
    assert "API_KEY_STORE=fictures needs FICTURES_DATABASE_URL" in describe_settings_error(
        caught.value
    )
    assert CANARY not in describe_settings_error(caught.value)
    assert CANARY not in str(caught.value)


def test_database_urls_are_masked_and_never_quoted_in_parse_errors() -> None:
    url = normalise_url(f"postgresql://u@h/db?password={CANARY}")
    assert masked(url) == "postgresql+psycopg://u@h/db?password=***"
    assert masked(normalise_url(f"postgresql://u:{CANARY}@h/db")) == (
        "postgresql+psycopg://u:***@h/db"
    )
    for bad in (f"postgresql://u:x@{CANARY}@h/db", f"postgresql://u:x@{CANARY}:1@h/db"):
        with pytest.raises(ArgumentError) as caught:
            normalise_url(bad)
        assert CANARY not in str(caught.value)
        assert "percent-encoded" in str(caught.value)
        # Nor does a traceback: SQLAlchemy's own error (it quotes the port) is not chained.
        assert caught.value.__cause__ is None
        assert caught.value.__suppress_context__ or caught.value.__context__ is None


def test_a_driver_message_quoting_a_url_is_masked() -> None:
    error = RuntimeError(f'invalid dsn: "postgresql://u:{CANARY}@h/db"\nmore')
    assert first_line(error) == 'invalid dsn: "postgresql://u:***@h/db"'


def test_the_tracing_line_masks_the_endpoint(caplog: pytest.LogCaptureFixture) -> None:
    settings = Settings(  # type: ignore[call-arg]
        _env_file=None, otlp_endpoint=f"http://otel:{CANARY}@127.0.0.1:9"
    )
    with caplog.at_level(logging.INFO, logger="fictures_ai.observability.tracing"):
        provider = build_tracer_provider(settings.otlp_endpoint)
    assert provider is not None
    provider.shutdown()  # type: ignore[attr-defined]
    assert "spans go to http://otel:***@127.0.0.1:9/v1/traces" in caplog.text
    assert CANARY not in caplog.text
