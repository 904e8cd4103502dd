//! The shared request-signing test vectors (`tests/vectors/signing.json`) against the Rust
//! implementation: each message decoded into the type the worker decodes it into renders the
//! vector's canonical body, the signing bytes and the Ed25519 signature are the vector's, and
//! the signature verifies with the public key the token names. The Python client checks the
//! same file (`python/tests/test_signing_vectors.py`), so both sign byte for byte alike.
//!
//! `MURMUR_WRITE_VECTORS=1` rewrites the expected fields from this implementation (after a
//! deliberate change of the format; both implementations must then follow).

use std::path::PathBuf;

use base64::Engine as _;
use murmur_activities::auth::{DeveloperKey, peek_claims, split_credential};
use murmur_workflows::agent::{AgentInput, KillRequest, OnIdleRequest, PowerRequest};
use murmur_workflows::auth::{signing_bytes, unsigned_body};
use murmur_workflows::messages::{ConfigRequest, FlushRequest};
use murmur_workflows::nuke_workflow::NukeInput;
use ring::signature::{ED25519, UnparsedPublicKey};
use serde_json::Value;

fn vectors_file() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/vectors/signing.json")
}

/// The body the worker's verifier renders for `message`, decoded as `type_name`.
fn canonical_body(type_name: &str, message: &Value) -> String {
    fn render<T: serde::de::DeserializeOwned + serde::Serialize>(message: &Value) -> String {
        let typed: T = serde_json::from_value(message.clone())
            .unwrap_or_else(|e| panic!("vector message does not decode: {e}: {message}"));
        unsigned_body(&typed)
    }
    match type_name {
        "FlushRequest" => render::<FlushRequest>(message),
        "AgentInput" => render::<AgentInput>(message),
        "ConfigRequest" => render::<ConfigRequest>(message),
        "KillRequest" => render::<KillRequest>(message),
        "PowerRequest" => render::<PowerRequest>(message),
        "OnIdleRequest" => render::<OnIdleRequest>(message),
        "NukeInput" => render::<NukeInput>(message),
        other => panic!("unknown vector type {other}"),
    }
}

#[test]
fn every_vector_renders_signs_and_verifies_as_recorded() {
    let path = vectors_file();
    let text = std::fs::read_to_string(&path).expect("read tests/vectors/signing.json");
    let mut file: Value = serde_json::from_str(&text).expect("vectors are JSON");
    let credential = file["credential"].as_str().expect("credential").to_string();
    let (token, key) = split_credential(&credential).expect("a credential");
    let developer = DeveloperKey::new(token, key).expect("a usable key");
    let public_key = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(peek_claims(token).expect("token claims").cnf.pk)
        .expect("public key is base64url");
    let write = std::env::var("MURMUR_WRITE_VECTORS").is_ok_and(|v| v == "1");

    let vectors = file["vectors"].as_array_mut().expect("vectors");
    assert!(vectors.len() >= 5, "the vector file lost its cases");
    for v in vectors.iter_mut() {
        let name = v["name"].as_str().expect("name").to_string();
        let field = |k: &str| v[k].as_str().unwrap_or_else(|| panic!("{name}: {k}"));
        let (op, target, request_id) = (field("op"), field("target"), field("request_id"));
        let ts = v["ts"].as_u64().expect("ts");
        let body = canonical_body(field("type"), &v["message"]);
        let bytes = signing_bytes(op, target, request_id, ts, &body);
        let signed = developer.sign_exactly(op, target, &body, request_id, ts);
        UnparsedPublicKey::new(&ED25519, &public_key)
            .verify(
                &bytes,
                &base64::engine::general_purpose::URL_SAFE_NO_PAD
                    .decode(&signed.sig)
                    .expect("signature is base64url"),
            )
            .unwrap_or_else(|_| panic!("{name}: the signature does not verify"));
        let bytes = String::from_utf8(bytes).expect("signing bytes are UTF-8");
        if write {
            v["canonical_body"] = Value::String(body);
            v["signing_bytes"] = Value::String(bytes);
            v["signature"] = Value::String(signed.sig);
            continue;
        }
        assert_eq!(v["canonical_body"].as_str(), Some(body.as_str()), "{name}");
        assert_eq!(v["signing_bytes"].as_str(), Some(bytes.as_str()), "{name}");
        assert_eq!(v["signature"].as_str(), Some(signed.sig.as_str()), "{name}");
    }
    if write {
        let text = serde_json::to_string_pretty(&file).expect("render vectors");
        std::fs::write(&path, text + "\n").expect("write vectors");
    }
}
