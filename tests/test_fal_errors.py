"""What fal's HTTP errors mean (fal-queue-api.md, part 2): final, transient, or not recorded."""

from __future__ import annotations

import pytest

from services.fal_queue import (
    FalAccountLocked,
    FalAuthError,
    FalCancelled,
    FalContentPolicy,
    FalJobFailed,
    FalRejected,
    error_for,
)

FROM_FAL = {"x-fal-request-id": "r1"}


def detail(kind: str, msg: str = "m") -> dict:
    return {"detail": [{"loc": ["body", "prompt"], "msg": msg, "type": kind}]}


@pytest.mark.parametrize(
    "status,body,headers,kind",
    [
        (422, detail("content_policy_violation", "flagged for violence"), FROM_FAL, FalContentPolicy),
        (422, detail("image_load_error"), FROM_FAL, FalRejected),
        (400, {"detail": "Unsupported image dimensions"}, FROM_FAL, FalRejected),
        (500, detail("downstream_service_unavailable"), FROM_FAL, FalJobFailed),
        (504, detail("generation_timeout"), FROM_FAL, FalJobFailed),
        (503, {"detail": "runner gone", "error_type": "runner_disconnected"}, FROM_FAL, FalJobFailed),
        (499, {"detail": "cancelled"}, FROM_FAL, FalCancelled),
        (401, {"detail": "Invalid authorization credentials"}, FROM_FAL, FalAuthError),
        (403, {"detail": "Forbidden"}, FROM_FAL, FalAuthError),
        (
            403,
            {"detail": "User is locked. Reason: Exhausted balance. Top up your balance."},
            FROM_FAL,
            FalAccountLocked,
        ),
    ],
)
def test_answers_from_fals_app_layer_are_final(status, body, headers, kind):
    error = error_for(status, body, headers)
    assert type(error) is kind


@pytest.mark.parametrize("status", [502, 503, 504])
def test_ingress_errors_without_a_request_id_are_transient(status):
    error = error_for(status, "<html><center>nginx</center></html>", {})
    assert type(error).__name__ == "_Transient"


@pytest.mark.parametrize("status", [408, 409, 429])
def test_answers_fal_client_resends_on_are_transient(status):
    error = error_for(status, {"detail": "Request Timeout"}, FROM_FAL)
    assert type(error).__name__ == "_Transient"


@pytest.mark.parametrize(
    "status,body,headers,surely",
    [
        (429, {"detail": "Too many requests"}, FROM_FAL, True),
        (408, {"detail": "Request Timeout"}, FROM_FAL, True),
        (409, {"detail": "Conflict"}, FROM_FAL, False),
        (504, "<html><center>nginx</center></html>", {}, True),
        (504, "upstream request timeout", {}, False),  # another proxy, which passed it on
    ],
)
def test_a_submit_is_surely_not_recorded_only_after_what_fal_client_resends_it_on(status, body, headers, surely):
    error = error_for(status, body, headers)
    assert getattr(error, "surely_not_recorded", None) is surely


def test_fals_own_words_are_kept():
    error = error_for(422, detail("content_policy_violation", "The prompt was flagged."), FROM_FAL)
    assert error.messages == ["The prompt was flagged."]
    assert error_for(400, {"detail": "Bad size"}, FROM_FAL).messages == ["Bad size"]
