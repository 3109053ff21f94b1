"""Keys, scopes and body limits on the real server process, with both header forms."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.e2e.conftest import RunningServer

pytestmark = pytest.mark.e2e

GENERATE = "/api/v1/text/generate"
BODY = {"prompt": "Say hi.", "max_tokens": 4}


def test_a_request_without_a_key_is_401(server: RunningServer) -> None:
    response = httpx.post(f"{server.url}{GENERATE}", json=BODY)
    assert response.status_code == 401
    detail = response.json()["detail"]
    assert "Authorization: Bearer" in detail
    assert "x-api-key" in detail
    wrong = httpx.post(f"{server.url}{GENERATE}", json=BODY, headers={"x-api-key": "fai_nope"})
    assert wrong.status_code == 401
    # Public without a key.
    for path in ["/", "/health", "/docs", "/redoc", "/openapi.json"]:
        assert httpx.get(f"{server.url}{path}").status_code == 200


def test_a_read_key_lists_models_but_may_not_generate(server: RunningServer) -> None:
    headers = {"Authorization": f"Bearer {server.read_key}"}
    assert httpx.get(f"{server.url}/api/v1/models", headers=headers).status_code == 200
    assert httpx.get(f"{server.url}/api/v1/text/models", headers=headers).status_code == 200
    refused = httpx.post(f"{server.url}{GENERATE}", json=BODY, headers=headers)
    assert refused.status_code == 403
    assert refused.json() == {"detail": "Insufficient permissions. Required scope: stories:write"}


def test_a_write_key_works_with_either_header(server: RunningServer) -> None:
    for headers in ({"Authorization": f"Bearer {server.key}"}, {"x-api-key": server.key}):
        response = httpx.post(f"{server.url}{GENERATE}", json=BODY, headers=headers, timeout=300)
        assert response.status_code == 200, response.text
        assert response.json()["tokens_used"] > 0


def test_the_openai_surface_takes_the_same_keys(server: RunningServer) -> None:
    anonymous = openai.OpenAI(api_key="not-a-key", base_url=f"{server.url}/v1", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        anonymous.models.list()
    reader = openai.OpenAI(api_key=server.read_key, base_url=f"{server.url}/v1", max_retries=0)
    assert reader.models.list().data
    with pytest.raises(openai.PermissionDeniedError):
        reader.chat.completions.create(
            model="SmolLM2-135M-Instruct", messages=[{"role": "user", "content": "x"}]
        )


def test_a_3_mb_body_is_413_before_it_is_parsed(server: RunningServer) -> None:
    body = b'{"prompt": "' + b"a" * (3 << 20) + b'"}'
    response = server.http.post(
        f"{server.url}{GENERATE}", content=body, headers={"content-type": "application/json"}
    )
    assert response.status_code == 413
    assert "1048576 bytes" in response.json()["detail"]
