//! The request-parsing fuzz target (`mlxd::api::fuzz_request`, every dialect), run a
//! bounded number of times on every `scripts/test`; cargo-fuzz runs it unbounded
//! (fuzz/). Inputs: arbitrary bytes, and JSON bodies built from the fields the
//! endpoints know, with values of every type.

use proptest::prelude::*;
use serde_json::{json, Value};

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 1500,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

fn scalar() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>()
            .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        prop_oneof![Just(0.0), Just(1.0), Just(2.5), Just(-1.0)].prop_map(|f: f64| json!(f)),
        ".{0,8}".prop_map(Value::from),
        prop_oneof![
            Just("5m"),
            Just("-1"),
            Just("0"),
            Just("user"),
            Just("text")
        ]
        .prop_map(Value::from),
    ]
}

fn value() -> impl Strategy<Value = Value> {
    scalar().prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
            prop::collection::btree_map(
                prop_oneof![
                    Just("role".to_string()),
                    Just("content".to_string()),
                    Just("name".to_string()),
                    Just("function".to_string()),
                    Just("tool_calls".to_string()),
                    Just("input_schema".to_string()),
                    Just("schema".to_string()),
                    Just("call_id".to_string()),
                    Just("type".to_string()),
                    Just("text".to_string()),
                    ".{0,4}"
                ],
                inner,
                0..4
            )
            .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

const FIELDS: &[&str] = &[
    "model",
    "messages",
    "prompt",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "stop",
    "seed",
    "n",
    "stream",
    "stream_options",
    "keep_alive",
    "tools",
    "tool_choice",
    "response_format",
    "logprobs",
    "top_logprobs",
    "system",
    "stop_sequences",
    "input",
    "instructions",
    "text",
    "format",
    "options",
    "raw",
    "max_output_tokens",
];

fn body() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec((prop::sample::select(FIELDS), value()), 0..8).prop_map(|fields| {
        let mut obj = serde_json::Map::new();
        obj.insert("model".into(), json!("smollm2-135m"));
        obj.insert(
            "messages".into(),
            json!([{"role": "user", "content": "hi"}]),
        );
        for (k, v) in fields {
            obj.insert(k.to_string(), v);
        }
        serde_json::to_vec(&Value::Object(obj)).unwrap()
    })
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn any_bytes_are_a_clean_400_or_a_request(data in prop::collection::vec(any::<u8>(), 0..256)) {
        mlxd::api::fuzz_request(&data);
    }

    #[test]
    fn any_json_body_is_a_clean_400_or_a_request(data in body()) {
        mlxd::api::fuzz_request(&data);
    }
}
