//! Fuzzing the decoders behind every CLI-reachable handler: any JSON reads as a `Lenient`
//! input (valid or a short error, never a failure), any bytes give `decode_lenient` a short
//! error or a message, and no error text grows with the payload (it travels back in update
//! rejections, which the server caps in size).

use murmur_workflows::agent::KillRequest;
use murmur_workflows::machine::ClaimRequest;
use murmur_workflows::messages::{
    ConfigRequest, FlushRequest, Lenient, NukeStep, ReleaseRequest, UpRequest, decode_lenient,
    encode_json,
};
use proptest::prelude::*;
use serde_json::Value;

fn json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        ".{0,40}".prop_map(Value::String),
        "[a-z_]{1,12}".prop_map(Value::String),
        (1usize..200_000).prop_map(|n| Value::String("é".repeat(n))),
    ];
    leaf.prop_recursive(4, 64, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
            prop::collection::btree_map(
                prop_oneof![
                    Just("request".to_string()),
                    Just("auth".to_string()),
                    Just("kind".to_string()),
                    Just("change".to_string()),
                    Just("nuke".to_string()),
                    "[a-z_]{1,10}"
                ],
                inner,
                0..6
            )
            .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn check<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<(), TestCaseError> {
    let decoded: Lenient<T> =
        serde_json::from_slice(bytes).map_err(|e| TestCaseError::fail(e.to_string()))?;
    if let Err(e) = decoded.into_result() {
        prop_assert!(
            e.to_string().len() < 400,
            "error text of {} bytes",
            e.to_string().len()
        );
    }
    Ok(())
}

proptest! {

    #[test]
    fn any_json_is_a_lenient_input_with_a_short_error(v in json()) {
        let bytes = serde_json::to_vec(&v).unwrap();
        check::<ClaimRequest>(&bytes)?;
        check::<KillRequest>(&bytes)?;
        check::<ConfigRequest>(&bytes)?;
        check::<NukeStep>(&bytes)?;
        check::<ReleaseRequest>(&bytes)?;
        check::<UpRequest>(&bytes)?;
        check::<()>(&bytes)?;
    }

    #[test]
    fn any_signal_payload_decodes_or_gives_a_short_error(v in json()) {
        let raw = encode_json(&v).unwrap();
        if let Err(e) = decode_lenient::<FlushRequest>(&raw) {
            prop_assert!(e.to_string().len() < 400);
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let mut raw = encode_json(&Value::Null).unwrap();
        raw.payloads[0].data = bytes;
        if let Err(e) = decode_lenient::<FlushRequest>(&raw) {
            prop_assert!(e.to_string().len() < 400);
        }
    }
}

#[test]
fn a_valid_request_survives_the_round_trip() {
    let req = ClaimRequest {
        request: "agent/t/w/d/s@run".into(),
        ..ClaimRequest::default()
    };
    let bytes = serde_json::to_vec(&Lenient::from(req.clone())).unwrap();
    let back: Lenient<ClaimRequest> = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(back, Lenient::Valid(req));
}
