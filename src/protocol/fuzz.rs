//! Fuzzing the frame decoder, in the normal test run.
//!
//! Two generators, both seeded so a failure replays: mutations of every
//! valid message PROTOCOL.md shows (byte flips, cuts, splices, inserted JSON
//! tokens), and random JSON documents built from the protocol's own field
//! names with values of every type. The decoder must answer each input with
//! a frame or an error that names a problem — never a panic — and a `ref`
//! it reports must be one the input carried.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Map, Value};

use super::decode::{agent_frame, customer_frame, ref_only};

/// Valid frames of both roles (PROTOCOL.md's examples and edge values).
const CORPUS: &[&str] = &[
    r#"{"type":"join","name":"Ann","topic":"support","ref":1}"#,
    r#"{"type":"join","name":"Ann","topic":"interview","mode":"ai","audio":{"sample_rate":16000},"ref":"j-1"}"#,
    r#"{"type":"resume","session_id":"s_0123456789abcdef","resume_token":"tok","last_seq":12,"ref":2}"#,
    r#"{"type":"say","text":"hello","ref":3}"#,
    r#"{"type":"typing","on":true}"#,
    r#"{"type":"rtc","kind":"offer","data":{"sdp":"v=0"},"ref":4}"#,
    r#"{"type":"stats","rtt_ms":20,"loss_pct":0.5,"jitter_ms":1.5,"audio_only":false,"ref":5}"#,
    r#"{"type":"leave","ref":6}"#,
    r#"{"type":"ping","ref":7}"#,
    r#"{"type":"available","ref":8}"#,
    r#"{"type":"away"}"#,
    r#"{"type":"take","topic":"support","ref":10}"#,
    r#"{"type":"take","session_id":"s_0123456789abcdef","ref":11}"#,
    r#"{"type":"say","session_id":"s_0123456789abcdef","text":"hi","ref":12}"#,
    r#"{"type":"rtc","session_id":"s_0123456789abcdef","kind":"ice","data":{"candidate":"a"},"ref":15}"#,
    r#"{"type":"typing","session_id":"s_0123456789abcdef","on":false}"#,
    r#"{"type":"end","session_id":"s_0123456789abcdef","ref":13}"#,
    r#"{"type":"resume","session_id":"s_0123456789abcdef","last_seq":0,"ref":14}"#,
];

const FIELDS: &[&str] = &[
    "type", "ref", "name", "topic", "mode", "audio", "sample_rate", "session_id", "resume_token", "last_seq", "text", "on",
    "kind", "data", "rtt_ms", "loss_pct", "jitter_ms", "audio_only",
];
const TYPES: &[&str] = &[
    "join", "resume", "say", "typing", "rtc", "stats", "leave", "end", "ping", "available", "away", "take", "hello", "",
    "offer", "answer", "ice", "restart", "human", "ai",
];
const TOKENS: &[&str] = &[
    "{", "}", "[", "]", ",", ":", "\"", "\\", "\\u0000", "\\ud800", "null", "true", "-0", "1e999", "18446744073709551616",
    "-9223372036854775809", "\u{0}", "\u{feff}", "é", "\u{10ffff}",
];

fn check(text: &str) {
    for result in [customer_frame(text).err(), agent_frame(text).err()].into_iter().flatten() {
        assert!(!result.message.is_empty(), "an error names its problem: {text:?}");
        if let Some(r) = &result.client_ref {
            assert!(text.contains(&*r.0), "reported ref {r:?} comes from {text:?}");
        }
    }
    let _ = ref_only(text);
}

fn mutate(rng: &mut StdRng, seed: &str) -> String {
    let mut bytes = seed.as_bytes().to_vec();
    for _ in 0..rng.random_range(1..6) {
        let len = bytes.len();
        match rng.random_range(0..6) {
            0 if len > 0 => {
                let i = rng.random_range(0..len);
                bytes[i] = rng.random();
            }
            1 => bytes.truncate(rng.random_range(0..=len)),
            2 if len > 0 => {
                let i = rng.random_range(0..len);
                let j = rng.random_range(i..=len);
                let piece = bytes[i..j].to_vec();
                let at = rng.random_range(0..=bytes.len());
                bytes.splice(at..at, piece);
            }
            3 => {
                let t = TOKENS[rng.random_range(0..TOKENS.len())].as_bytes();
                let at = rng.random_range(0..=len);
                bytes.splice(at..at, t.iter().copied());
            }
            4 if len > 0 => {
                let i = rng.random_range(0..len);
                bytes.remove(i);
            }
            _ => {
                let other = CORPUS[rng.random_range(0..CORPUS.len())].as_bytes();
                let at = rng.random_range(0..=len);
                bytes.truncate(at);
                bytes.extend_from_slice(&other[rng.random_range(0..other.len())..]);
            }
        }
    }
    // Text frames are UTF-8 by the time they reach the decoder.
    String::from_utf8_lossy(&bytes).into_owned()
}

fn random_value(rng: &mut StdRng, depth: u32) -> Value {
    match rng.random_range(0..if depth > 3 { 6 } else { 8 }) {
        0 => Value::Null,
        1 => Value::Bool(rng.random()),
        2 => json!(rng.random::<i64>()),
        3 => json!(rng.random::<f64>() * 1e6),
        4 => json!(TYPES[rng.random_range(0..TYPES.len())]),
        5 => {
            let n = rng.random_range(0..200);
            Value::String((0..n).map(|_| char::from_u32(rng.random_range(0..0x11_0000)).unwrap_or('x')).collect())
        }
        6 => Value::Array((0..rng.random_range(0..4)).map(|_| random_value(rng, depth + 1)).collect()),
        _ => random_object(rng, depth + 1),
    }
}

fn random_object(rng: &mut StdRng, depth: u32) -> Value {
    let mut m = Map::new();
    if rng.random_bool(0.9) {
        m.insert("type".into(), json!(TYPES[rng.random_range(0..TYPES.len())]));
    }
    for _ in 0..rng.random_range(0..6) {
        let k = FIELDS[rng.random_range(0..FIELDS.len())];
        m.insert(k.into(), random_value(rng, depth));
    }
    Value::Object(m)
}

#[test]
fn valid_corpus_decodes() {
    for text in CORPUS {
        let ok = customer_frame(text).is_ok() || agent_frame(text).is_ok();
        assert!(ok, "{text} is a valid frame for one of the roles");
    }
}

#[test]
fn mutated_frames_never_panic() {
    let mut rng = StdRng::seed_from_u64(0x5eed_d0e7);
    for i in 0..60_000 {
        let seed = CORPUS[i % CORPUS.len()];
        check(&mutate(&mut rng, seed));
    }
}

#[test]
fn random_documents_never_panic() {
    let mut rng = StdRng::seed_from_u64(0xfeed_face);
    for _ in 0..30_000 {
        check(&random_object(&mut rng, 0).to_string());
    }
    // Nesting far deeper than any frame: refused, not a stack overflow.
    let deep = format!(r#"{{"type":"say","text":"x","data":{}{}}}"#, "[".repeat(100_000), "]".repeat(100_000));
    check(&deep);
}
