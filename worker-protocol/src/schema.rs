//! The cold frames as data, so the Python worker is checked against the Rust
//! definitions instead of restating them: [`frame_schemas`] is the JSON Schema of
//! every JSON frame (python-worker's `io/protocol.py` is generated from it by
//! `scripts/gen_protocol.py`), and [`examples`] holds one frame of each such kind
//! with every field set, which the drift test round-trips through the Python
//! types and back through [`decode_strict`].

use schemars::generate::SchemaSettings;
use serde_json::{json, Value};

use crate::frame::*;

/// `{"frames": {KIND: {"$ref": ...}}, "$defs": {...}}` for every JSON frame kind.
pub fn frame_schemas() -> Value {
    let mut generator = SchemaSettings::draft2020_12().into_generator();
    let mut frames = serde_json::Map::new();
    let mut add = |kind: Kind, schema: schemars::Schema| {
        frames.insert(kind.name().to_string(), schema.to_value());
    };
    add(Kind::Hello, generator.subschema_for::<Hello>());
    add(Kind::Load, generator.subschema_for::<Load>());
    add(Kind::Ready, generator.subschema_for::<Ready>());
    add(Kind::Generate, generator.subschema_for::<Generate>());
    add(Kind::Done, generator.subschema_for::<Done>());
    add(Kind::Error, generator.subschema_for::<ErrorFrame>());
    add(Kind::Stats, generator.subschema_for::<Stats>());
    add(Kind::ToolCall, generator.subschema_for::<ToolCallFrame>());
    add(Kind::Logprobs, generator.subschema_for::<LogprobsFrame>());
    add(Kind::Admitted, generator.subschema_for::<AdmittedFrame>());
    add(
        Kind::MemoryLimit,
        generator.subschema_for::<MemoryLimitFrame>(),
    );
    add(Kind::Embed, generator.subschema_for::<Embed>());
    add(
        Kind::Embeddings,
        generator.subschema_for::<EmbeddingsFrame>(),
    );
    let defs: serde_json::Map<String, Value> =
        generator.take_definitions(true).into_iter().collect();
    json!({
        "protocol_version": PROTOCOL_VERSION,
        "batch_size_bounds": BATCH_SIZE_BOUNDS,
        "frames": frames,
        "$defs": defs
    })
}

/// Decodes a JSON frame as the daemon does (unknown fields refused) and
/// encodes it again: the payload as Rust understood it.
pub fn decode_strict(kind: u16, payload: &[u8]) -> Result<Vec<u8>, FrameError> {
    let frame = Frame::decode(kind, 0, payload)?;
    let mut out = Vec::new();
    frame.encode_payload(&mut out);
    Ok(out)
}

/// One frame of every JSON kind with every field set (no field at its default,
/// every optional one present), for the drift test. A field added to a frame
/// must be set here too: the test fails on any schema property an example lacks.
pub fn examples() -> Vec<Frame> {
    let spec_status = SpecStatus {
        draft: "draft-model".into(),
        mode: "auto".into(),
        active: true,
        reason: "acceptance 0.8".into(),
        num_draft_tokens: 3,
        acceptance: 0.75,
        drafted_total: 40,
        accepted_total: 30,
        spec_tps: 120.5,
        plain_tps: 80.25,
        lowered_total: 1,
        raised_total: 2,
        off_total: 3,
        on_total: 4,
        to_batch_total: 5,
        to_speculative_total: 6,
    };
    let tool = Tool {
        name: "get_weather".into(),
        description: Some("The weather in a city".into()),
        parameters: json!({"type": "object", "properties": {"city": {"type": "string"}}}),
        lark: Some("start: /[A-Z]+/".into()),
    };
    let entry = |token: u32, text: &str| TokenLogprob {
        token,
        text: text.into(),
        logprob: -0.5,
        top: vec![TopLogprob {
            token: token + 1,
            text: format!("{text}!"),
            logprob: -1.5,
        }],
    };
    vec![
        Frame::Hello(Hello {
            protocol_version: PROTOCOL_VERSION,
            pid: 4242,
            engine: "mlx".into(),
            device: "cpu".into(),
            blas: Some("libopenblas".into()),
            native_protocol: true,
            http_port: Some(8123),
            device_memory: Some(80 << 30),
        }),
        Frame::Load(Load {
            model_path: "/models/m".into(),
            model_name: "m".into(),
            options: Box::new(LoadOptions {
                max_batch: Some(8),
                prefill_step: 512,
                flush: FlushOptions::Tokens { tokens: 4 },
                kv_bits: Some(8),
                kv_group_size: Some(32),
                quantized_kv_start: Some(256),
                max_kv_size: Some(4096),
                prompt_cache_bytes: 1 << 30,
                prompt_cache_dir: Some("/cache".into()),
                prompt_cache_disk_bytes: Some(4 << 30),
                memory_limit: Some(8 << 30),
                kv_shape: Some(KvShape {
                    bytes_per_token: 46_080,
                    windows: vec![KvWindow {
                        tokens: 128,
                        bytes_per_token: 1024,
                    }],
                    bytes_per_sequence: 4096,
                }),
                speculative: Some(SpeculativeOptions {
                    draft: "d".into(),
                    draft_path: Some("/models/d".into()),
                    num_draft_tokens: 4,
                    mode: "on".into(),
                    require_supported: true,
                }),
                replay_text: Some("once upon a time".into()),
                faults: Some(FaultOptions {
                    hang_in_load: true,
                    step_delay_ms: 5,
                    raise_in_step: 7,
                    garbage_after_step: 9,
                    out_of_memory_in_step: 11,
                    device_batch: Some(7),
                }),
                context_length: Some(8192),
                reasoning_inline: true,
                rerank_instruction: Some("Find passages that answer the question".into()),
            }),
        }),
        Frame::Ready(Ready {
            load_seconds: 1.5,
            context_length: Some(8192),
            speculative: Some(Box::new(spec_status.clone())),
            model: Some(Box::new(ModelFacts {
                family: "qwen3_next".into(),
                cache_kinds: vec!["ArraysCache".into(), "KVCache".into()],
                limits: vec![FeatureLimit {
                    feature: "prefix_cache".into(),
                    reason: "only whole entries are reused".into(),
                }],
                reasoning: Some("<think>…</think>".into()),
            })),
            max_batch: Some(64),
        }),
        Frame::Generate(Generate {
            id: 7,
            messages: Some(vec![ChatMessage {
                role: "assistant".into(),
                content: "calling".into(),
                tool_calls: vec![MessageToolCall {
                    id: "call_1".into(),
                    name: "get_weather".into(),
                    arguments: json!({"city": "Paris"}),
                }],
                tool_call_id: Some("call_0".into()),
                name: Some("get_weather".into()),
                reasoning: Some("the user wants the weather".into()),
                parts: vec![
                    ContentPart::Text {
                        text: "what is this?".into(),
                    },
                    ContentPart::Image { image: 0 },
                ],
            }]),
            prompt: Some("raw prompt".into()),
            images: vec![bytes::Bytes::from_static(b"\x89PNG\r\n\x1a\n")],
            max_tokens: 64,
            temperature: Some(0.5),
            top_p: Some(0.9),
            stop: vec!["\n\n".into()],
            seed: Some(11),
            speculative: Some(true),
            tools: vec![tool],
            tool_choice: ToolChoice::Function("get_weather".into()),
            format: Some(Box::new(OutputFormat::JsonSchema {
                schema: json!({"type": "object"}),
                strict: true,
            })),
            logprobs: Some(3),
            reasoning: Some(Box::new(ReasoningOptions {
                enabled: Some(true),
                effort: Some("high".into()),
                max_tokens: Some(256),
            })),
            count_only: true,
        }),
        Frame::Done(Done {
            id: 7,
            finish_reason: "stop".into(),
            prompt_tokens: 12,
            completion_tokens: 5,
            prompt_tps: 300.5,
            generation_tps: 40.25,
            speculative: Some(DraftCounts {
                drafted: 9,
                accepted: 6,
                rejected: 3,
            }),
            stop_sequence: Some("\n\n".into()),
            cached_tokens: 8,
            reasoning_tokens: 3,
        }),
        Frame::Error(ErrorFrame {
            id: Some(7),
            message: "prompt too long".into(),
            code: "invalid_request".into(),
        }),
        Frame::Stats(Stats {
            active_memory: 1,
            peak_memory: 2,
            cache_memory: 3,
            rss: 4,
            active_sequences: 5,
            queued_sequences: 6,
            completed_total: 7,
            cancelled_total: 8,
            batch_steps_total: 9,
            batch_tokens_total: 10,
            token_frames_total: 11,
            heartbeat: 12,
            engine_failed: true,
            speculative: Some(Box::new(spec_status)),
            prompt_cache: Some(Box::new(PromptCacheStats {
                lookups: PromptCacheLookups {
                    hit_continued: 1,
                    hit_diverged: 16,
                    miss_cold: 2,
                    miss_diverged: 17,
                    miss_evicted: 18,
                    miss_too_short: 19,
                },
                cached_tokens_total: 3,
                entries: 4,
                bytes: 5,
                max_bytes: 6,
                disk: Some(Box::new(DiskCacheStats {
                    hits_total: 7,
                    entries: 8,
                    bytes: 9,
                    stale_total: 10,
                    writes_total: 11,
                    dropped_total: 12,
                })),
            })),
            kv: Some(Box::new(KvStats {
                weights_bytes: 13,
                baseline_bytes: 20,
                in_use_bytes: 14,
                reserved_bytes: 15,
                capacity_bytes: 16,
                waiting: 17,
                refused_total: 18,
                evicted_for_room_total: 19,
            })),
            steps: Some(Box::new(StepStats {
                prefill_seconds_total: 1.5,
                decode_seconds_total: 2.5,
                host_seconds_total: 0.25,
                batch_size_steps: vec![1, 2, 3, 4, 5, 6, 7, 8, 9, 10],
            })),
        }),
        Frame::ToolCall(ToolCallFrame {
            id: 7,
            index: 1,
            call_id: "call_1".into(),
            name: "get_weather".into(),
            arguments: "{\"city\": \"Paris\"}".into(),
        }),
        Frame::Logprobs(LogprobsFrame {
            id: 7,
            entries: vec![entry(3, "a"), entry(4, "b")],
        }),
        Frame::Admitted(AdmittedFrame {
            id: 7,
            prompt_tokens: 12_000,
            cached_tokens: 11_904,
        }),
        Frame::MemoryLimit(MemoryLimitFrame {
            memory_limit: 6 << 30,
        }),
        // A real Embed carries texts or tokens, not both: the example sets every field.
        Frame::Embed(Embed {
            id: 8,
            texts: vec!["The sky is blue".into()],
            tokens: vec![vec![101, 1996, 3712, 102]],
            truncate: true,
            dimensions: Some(256),
            query: Some("What colour is the sky?".into()),
        }),
        Frame::Embeddings(EmbeddingsFrame {
            id: 8,
            vectors: vec!["AACAPwAAAEA=".into()],
            prompt_tokens: 6,
            more: true,
            scores: vec![0.875],
        }),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every property the schema names is set in the example of its frame (and
    /// in nested objects): a new field cannot skip the drift test.
    #[test]
    fn examples_set_every_field_of_every_json_frame() {
        let schemas = frame_schemas();
        let defs = &schemas["$defs"];
        let examples = examples();
        let frames = schemas["frames"].as_object().unwrap();
        assert_eq!(examples.len(), frames.len());
        for frame in &examples {
            let name = frame.kind().name();
            let mut payload = Vec::new();
            frame.encode_payload(&mut payload);
            // A Generate's images follow its JSON, after a NUL.
            let json = payload.split(|&b| b == 0).next().unwrap();
            let value: Value = serde_json::from_slice(json).unwrap();
            covers(&frames[name], &value, defs, name);
            assert_eq!(
                decode_strict(frame.kind() as u16, &payload).unwrap(),
                payload
            );
        }
    }

    fn resolve<'a>(schema: &'a Value, defs: &'a Value) -> &'a Value {
        match schema["$ref"].as_str() {
            Some(r) => &defs[r.trim_start_matches("#/$defs/")],
            None => schema,
        }
    }

    fn covers(schema: &Value, value: &Value, defs: &Value, at: &str) {
        let schema = resolve(schema, defs);
        if let Some(props) = schema["properties"].as_object() {
            for (key, sub) in props {
                let v = value
                    .get(key)
                    .unwrap_or_else(|| panic!("the example of {at} lacks '{key}'"));
                covers(sub, v, defs, &format!("{at}.{key}"));
            }
        }
        for alt in ["anyOf", "oneOf"] {
            if let Some(alts) = schema[alt].as_array() {
                // The alternative this value takes (objects: the one whose
                // properties it has; the rest are other variants or null).
                for a in alts {
                    let a = resolve(a, defs);
                    let fits = a["properties"]
                        .as_object()
                        .is_some_and(|p| p.keys().all(|k| value.get(k).is_some()));
                    if fits {
                        covers(a, value, defs, at);
                    }
                }
            }
        }
        if let (Some(items), Some(arr)) = (schema.get("items"), value.as_array()) {
            for v in arr {
                covers(items, v, defs, at);
            }
        }
    }

    #[test]
    fn an_unknown_field_from_the_worker_is_an_error() {
        let err = Frame::decode(Kind::Stats as u16, 0, br#"{"engine_faild": true}"#).unwrap_err();
        assert!(err.to_string().contains("engine_faild"), "{err}");
        let err = Frame::decode(
            Kind::Done as u16,
            0,
            br#"{"id":1,"finish_reason":"stop","prompt_tokens":1,"completion_tokens":1,"cahced_tokens":3}"#,
        )
        .unwrap_err();
        assert!(err.to_string().contains("cahced_tokens"), "{err}");
    }
}
#[cfg(test)]
mod dump {
    #[test]
    #[ignore]
    fn dump_schema() {
        println!(
            "{}",
            serde_json::to_string_pretty(&super::frame_schemas()).unwrap()
        );
    }
}
