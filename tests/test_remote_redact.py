"""Remote's redaction of the token in server text (contract 3), as sent and percent-encoded."""

from __future__ import annotations

import pytest

from jobsyncd.remote import InvalidJobObject, Remote, Transient

TOKEN = "a/b+c=d e"


@pytest.fixture
def remote():
    r = Remote("http://127.0.0.1:9/api/v1", token=TOKEN)
    yield r
    r.close()


@pytest.mark.parametrize("echo", [TOKEN, "a%2Fb%2Bc%3Dd%20e", "a%2Fb%2Bc%3Dd+e"])
def test_every_form_of_the_token_is_replaced_in_an_error_leaving_the_remote(remote, echo):
    with pytest.raises(Transient) as caught, remote._redacting():
        raise Transient(f"GET /jobs: the server redirects to https://x/?h=Bearer {echo}")
    assert str(caught.value) == "GET /jobs: the server redirects to https://x/?h=Bearer ***"


def test_an_invalid_jobs_reason_is_redacted_too(remote):
    with pytest.raises(InvalidJobObject) as caught, remote._redacting():
        raise InvalidJobObject("42", f"its status {TOKEN}")
    assert TOKEN not in str(caught.value) and caught.value.reason == "its status ***"


def test_without_a_token_nothing_is_replaced():
    r = Remote("http://127.0.0.1:9/api/v1", token=None)
    assert r._redact("a/b+c=d e ***") == "a/b+c=d e ***"
    r.close()
