"""The shared signing vectors (tests/vectors/signing.json), which the Rust implementation
checks too (activities/tests/signing_vectors.rs): both sign byte for byte alike."""

from __future__ import annotations

import json
from typing import Any

import pytest

from murmur import messages as m
from murmur.signing import Credential, canonical_body, signing_bytes, verify_signature

from conftest import VECTORS

FILE: dict[str, Any] = json.loads(VECTORS.read_text())
CASES = FILE["vectors"]


def test_the_vector_file_has_its_cases() -> None:
    assert len(CASES) >= 5
    for case in CASES:
        assert {"canonical_body", "signing_bytes", "signature"} <= case.keys(), case["name"]


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_each_vector_renders_signs_and_verifies_as_recorded(case: dict[str, Any]) -> None:
    body = canonical_body(case["message"])
    assert body == case["canonical_body"]
    data = signing_bytes(case["op"], case["target"], case["request_id"], case["ts"], body)
    assert data.decode("utf-8") == case["signing_bytes"]
    cred = Credential.parse(FILE["credential"])
    auth = cred.sign(case["op"], case["target"], case["message"], request_id=case["request_id"], ts=case["ts"])
    assert auth["sig"] == case["signature"]
    assert verify_signature(auth, case["op"], case["target"], case["message"])


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_a_signature_covers_target_time_and_every_field(case: dict[str, Any]) -> None:
    cred = Credential.parse(FILE["credential"])
    auth = cred.sign(case["op"], case["target"], case["message"], request_id=case["request_id"], ts=case["ts"])
    assert not verify_signature(auth, case["op"], case["target"] + "x", case["message"])
    assert not verify_signature(auth, "pool.other", case["target"], case["message"])
    assert not verify_signature({**auth, "ts": case["ts"] + 1}, case["op"], case["target"], case["message"])
    assert not verify_signature({**auth, "request_id": "other"}, case["op"], case["target"], case["message"])
    assert not verify_signature(auth, case["op"], case["target"], {**case["message"], "extra": None})


def by_name(name: str) -> dict[str, Any]:
    return next(c for c in CASES if c["name"] == name)["message"]


def test_the_clients_messages_have_the_vectors_shapes() -> None:
    # Every field the worker renders must be in what the client signs, or its signature
    # would not cover the body the worker checks.
    assert m.flush_request(False, "ana", "default") == by_name("flush")
    assert m.flush_request(True, "ana", None) == by_name("flush-nuke-without-workspace")
    assert m.agent_input("acme", "default", "ana", "fix-1", ["true"], m.OnIdle.TERMINATE) == by_name(
        "spawn-default-on-idle"
    )
    assert m.config_patch("workspace", "default", {"min_idle": "3", "environment.Z_VAR": "a=b"}, "ana") == by_name(
        "config-patch"
    )
    assert m.config_set(
        "workspace", "web", {"min_idle": 2, "image_ref": "default", "environment": {"b": "2", "A": "1", "a": "3"}}, "ana"
    ) == by_name("config-set-nested-keys-sorted")
    assert m.kill_request() == by_name("kill")
    assert m.power_request() == by_name("sleep") == by_name("wake")
    assert m.on_idle_request(m.OnIdle.KEEP_ALIVE) == by_name("on-idle-keep-alive")
    assert m.nuke_input("acme", "ana") == by_name("nuke-workflow")
