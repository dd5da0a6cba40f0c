//! Client frames → domain requests, with every check PROTOCOL.md asks for.
//!
//! A frame is parsed once into [`Incoming`] (every field optional, strings
//! borrowed where they need no unescaping), then checked for its `type`.
//! Every problem becomes a [`DecodeError`] naming the field, and carries the
//! frame's `ref` when one could be read, so the client gets its one answer.

use std::borrow::Cow;
use std::sync::Arc;

use duet_actors::agent::{AgentRequest, TakeTarget};
use duet_actors::domain::{CallStats, ClientRef, Mode, OpaqueJson, RtcKind, SessionId, Seq};
use duet_actors::session::{AgentCmd, CustomerCmd, JoinRequest};
use serde::Deserialize;
use serde_json::value::RawValue;

pub const NAME_MAX: usize = 80;
pub const TEXT_MAX: usize = 4000;
pub const TOPIC_MAX: usize = 64;

#[derive(Debug, PartialEq)]
pub struct DecodeError {
    pub client_ref: Option<ClientRef>,
    pub message: String,
}

#[derive(Deserialize)]
struct Incoming<'a> {
    #[serde(rename = "type", borrow)]
    kind: Option<&'a RawValue>,
    #[serde(rename = "ref", borrow)]
    client_ref: Option<&'a RawValue>,
    #[serde(borrow)]
    name: Option<&'a RawValue>,
    #[serde(borrow)]
    topic: Option<&'a RawValue>,
    #[serde(borrow)]
    mode: Option<&'a RawValue>,
    #[serde(borrow)]
    audio: Option<&'a RawValue>,
    #[serde(borrow)]
    session_id: Option<&'a RawValue>,
    #[serde(borrow)]
    resume_token: Option<&'a RawValue>,
    #[serde(borrow)]
    last_seq: Option<&'a RawValue>,
    #[serde(borrow)]
    text: Option<&'a RawValue>,
    #[serde(borrow)]
    on: Option<&'a RawValue>,
    #[serde(borrow)]
    data: Option<&'a RawValue>,
    #[serde(borrow)]
    rtt_ms: Option<&'a RawValue>,
    #[serde(borrow)]
    loss_pct: Option<&'a RawValue>,
    #[serde(borrow)]
    jitter_ms: Option<&'a RawValue>,
    #[serde(borrow)]
    audio_only: Option<&'a RawValue>,
}

/// What a customer's frame asks for.
#[derive(Debug)]
pub enum CustomerFrame {
    /// `sample_rate` is checked now and used by the voice pipeline.
    Join {
        join: JoinRequest,
        #[allow(dead_code)]
        sample_rate: Option<u32>,
        client_ref: Option<ClientRef>,
    },
    Resume { session_id: SessionId, resume_token: Arc<str>, last_seq: Seq, client_ref: Option<ClientRef> },
    InSession(CustomerCmd),
    Ping { client_ref: Option<ClientRef> },
}

/// What an agent's frame asks for.
#[derive(Debug)]
pub enum AgentFrame {
    Request(AgentRequest),
    Ping { client_ref: Option<ClientRef> },
}

struct Frame<'a> {
    inc: Incoming<'a>,
    client_ref: Option<ClientRef>,
}

impl<'a> Frame<'a> {
    fn fail(&self, message: impl Into<String>) -> DecodeError {
        DecodeError { client_ref: self.client_ref.clone(), message: message.into() }
    }

    fn string(&self, field: &'static str, raw: Option<&'a RawValue>) -> Result<Cow<'a, str>, DecodeError> {
        let raw = raw.ok_or_else(|| self.fail(format!("missing field `{field}`")))?;
        serde_json::from_str::<Cow<'a, str>>(raw.get()).map_err(|_| self.fail(format!("`{field}` must be a string")))
    }

    fn opt_string(&self, field: &'static str, raw: Option<&'a RawValue>) -> Result<Option<Cow<'a, str>>, DecodeError> {
        match raw {
            None => Ok(None),
            Some(r) if r.get() == "null" => Ok(None),
            Some(_) => self.string(field, raw).map(Some),
        }
    }

    /// A string of `min..=max` Unicode code points (the contract counts those).
    fn text(&self, field: &'static str, raw: Option<&'a RawValue>, min: usize, max: usize) -> Result<Arc<str>, DecodeError> {
        let s = self.string(field, raw)?;
        let n = s.chars().count();
        if n < min || n > max {
            return Err(self.fail(format!("`{field}` must be {min} to {max} characters (got {n})")));
        }
        Ok(Arc::from(s.as_ref()))
    }

    fn bool(&self, field: &'static str, raw: Option<&'a RawValue>) -> Result<bool, DecodeError> {
        match raw.map(RawValue::get) {
            Some("true") => Ok(true),
            Some("false") => Ok(false),
            Some(_) => Err(self.fail(format!("`{field}` must be a boolean"))),
            None => Err(self.fail(format!("missing field `{field}`"))),
        }
    }

    fn seq(&self, field: &'static str, raw: Option<&'a RawValue>) -> Result<Seq, DecodeError> {
        let raw = raw.ok_or_else(|| self.fail(format!("missing field `{field}`")))?;
        match serde_json::from_str::<i64>(raw.get()) {
            Ok(v) if v >= 0 => Ok(v),
            _ => Err(self.fail(format!("`{field}` must be a non-negative integer"))),
        }
    }

    fn number(&self, field: &'static str, raw: Option<&'a RawValue>) -> Result<f64, DecodeError> {
        let raw = raw.ok_or_else(|| self.fail(format!("missing field `{field}`")))?;
        match serde_json::from_str::<f64>(raw.get()) {
            Ok(v) if v.is_finite() && v >= 0.0 => Ok(v),
            _ => Err(self.fail(format!("`{field}` must be a non-negative number"))),
        }
    }

    fn session_id(&self) -> Result<SessionId, DecodeError> {
        let s = self.string("session_id", self.inc.session_id)?;
        if s.is_empty() || s.len() > 64 {
            return Err(self.fail("`session_id` must be a session id"));
        }
        Ok(Arc::from(s.as_ref()))
    }

    fn topic(&self) -> Result<Arc<str>, DecodeError> {
        let t = self.string("topic", self.inc.topic)?;
        // Any name a team gives its queues (`billing:vip`, `ventes-é`),
        // counted in code points like `name`; no white space or control
        // characters, which dashboards and metric labels would show badly,
        // and no `/`, so a topic stays one segment of a URL path.
        let ok = !t.is_empty()
            && t.chars().count() <= TOPIC_MAX
            && !t.chars().any(|c| c.is_whitespace() || c.is_control() || c == '/');
        if !ok {
            return Err(self.fail(format!(
                "`topic` must be 1 to {TOPIC_MAX} characters, without spaces, control characters or `/`"
            )));
        }
        Ok(Arc::from(t.as_ref()))
    }

    fn stats(&self) -> Result<CallStats, DecodeError> {
        let audio_only = match self.inc.audio_only {
            None => None,
            Some(r) if r.get() == "null" => None,
            Some(_) => Some(self.bool("audio_only", self.inc.audio_only)?),
        };
        let loss_pct = self.number("loss_pct", self.inc.loss_pct)?;
        if loss_pct > 100.0 {
            return Err(self.fail("`loss_pct` must be between 0 and 100"));
        }
        Ok(CallStats {
            rtt_ms: self.number("rtt_ms", self.inc.rtt_ms)?,
            loss_pct,
            jitter_ms: self.number("jitter_ms", self.inc.jitter_ms)?,
            audio_only,
        })
    }
}

/// The canonical JSON of a `ref`: an integer as digits, a string re-encoded.
fn canonical_ref(raw: &RawValue) -> Result<Option<ClientRef>, String> {
    let text = raw.get();
    if text == "null" {
        return Ok(None);
    }
    if text.starts_with('"') {
        let s: String = serde_json::from_str(text).map_err(|_| "`ref` must be a string or an integer".to_owned())?;
        if s.chars().count() > 128 {
            return Err("`ref` must be at most 128 characters".to_owned());
        }
        let canon = serde_json::to_string(&s).map_err(|_| "`ref` must be a string or an integer".to_owned())?;
        return Ok(Some(ClientRef(Arc::from(canon))));
    }
    match serde_json::from_str::<i64>(text) {
        Ok(n) => Ok(Some(ClientRef(Arc::from(n.to_string())))),
        Err(_) => Err("`ref` must be a string or an integer".to_owned()),
    }
}

/// The `kind` field of an rtc frame, which shares its name with nothing in
/// `Incoming` but must be read without a second full parse.
#[derive(Deserialize)]
struct KindOnly<'a> {
    #[serde(borrow)]
    kind: Option<&'a RawValue>,
}

/// Not white space and not one of the invisible format characters.
fn visible(c: char) -> bool {
    !c.is_whitespace() && !matches!(c, '\u{200B}'..='\u{200D}' | '\u{2060}' | '\u{FEFF}')
}

/// Control characters, line and paragraph separators, and the bidi
/// overrides and isolates that reorder whatever is shown after them.
fn breaks_display(c: char) -> bool {
    c.is_control() || matches!(c, '\u{2028}' | '\u{2029}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}')
}

/// serde's derived structs also read JSON arrays (fields by position), so
/// `[1]` would pass for an object whose first field is 1: only text that
/// starts as an object is read at all.
fn is_object(text: &str) -> bool {
    text.trim_start().starts_with('{')
}

fn parse(text: &str) -> Result<(Frame<'_>, Option<&RawValue>), DecodeError> {
    if !is_object(text) {
        return Err(DecodeError { client_ref: None, message: "a message must be a JSON object".to_owned() });
    }
    let inc: Incoming<'_> = serde_json::from_str(text)
        .map_err(|e| DecodeError { client_ref: ref_only(text), message: format!("malformed message: {e}") })?;
    let client_ref = match inc.client_ref {
        None => None,
        Some(raw) => canonical_ref(raw).map_err(|message| DecodeError { client_ref: None, message })?,
    };
    let kind = if inc.kind.map(RawValue::get) == Some("\"rtc\"") {
        serde_json::from_str::<KindOnly<'_>>(text).ok().and_then(|k| k.kind)
    } else {
        None
    };
    Ok((Frame { inc, client_ref }, kind))
}

fn frame_type<'a>(f: &Frame<'a>) -> Result<Cow<'a, str>, DecodeError> {
    f.string("type", f.inc.kind)
}

fn rtc_of(f: &Frame<'_>, kind: Option<&RawValue>) -> Result<(RtcKind, OpaqueJson), DecodeError> {
    let k = f.string("kind", kind)?;
    let k = RtcKind::parse(&k).ok_or_else(|| f.fail("`kind` must be one of offer, answer, ice, restart"))?;
    let data = f.inc.data.ok_or_else(|| f.fail("missing field `data`"))?;
    if !data.get().trim_start().starts_with('{') {
        return Err(f.fail("`data` must be an object"));
    }
    Ok((k, OpaqueJson(Arc::from(data.get()))))
}

/// Decodes a frame on `/ws`.
pub fn customer_frame(text: &str) -> Result<CustomerFrame, DecodeError> {
    let (f, rtc_kind) = parse(text)?;
    let r = f.client_ref.clone();
    Ok(match frame_type(&f)?.as_ref() {
        "join" => {
            let name = f.text("name", f.inc.name, 1, NAME_MAX)?;
            // A name is shown to agents on one line: something visible, no
            // control characters (a newline or NUL would break the display
            // and the logs).
            if !name.chars().any(visible) || name.chars().any(breaks_display) {
                return Err(f.fail("`name` must have a visible character and no control characters".to_owned()));
            }
            let topic = f.topic()?;
            let mode = match f.opt_string("mode", f.inc.mode)? {
                None => Mode::Human,
                Some(m) => Mode::parse(&m).ok_or_else(|| f.fail("`mode` must be `human` or `ai`"))?,
            };
            let sample_rate = match f.inc.audio {
                None => None,
                Some(raw) => Some(sample_rate(&f, raw)?),
            };
            CustomerFrame::Join { join: JoinRequest { name, topic, mode }, sample_rate, client_ref: r }
        }
        "resume" => CustomerFrame::Resume {
            session_id: f.session_id()?,
            resume_token: Arc::from(f.string("resume_token", f.inc.resume_token)?.as_ref()),
            last_seq: f.seq("last_seq", f.inc.last_seq)?,
            client_ref: r,
        },
        "say" => CustomerFrame::InSession(CustomerCmd::Say { text: f.text("text", f.inc.text, 1, TEXT_MAX)?, client_ref: r }),
        "typing" => CustomerFrame::InSession(CustomerCmd::Typing { on: f.bool("on", f.inc.on)?, client_ref: r }),
        "rtc" => {
            let (kind, data) = rtc_of(&f, rtc_kind)?;
            CustomerFrame::InSession(CustomerCmd::Rtc { kind, data, client_ref: r })
        }
        "stats" => CustomerFrame::InSession(CustomerCmd::Stats { stats: f.stats()?, client_ref: r }),
        "leave" => CustomerFrame::InSession(CustomerCmd::Leave { client_ref: r }),
        "ping" => CustomerFrame::Ping { client_ref: r },
        other => return Err(f.fail(format!("unknown message type `{}`", truncate(other)))),
    })
}

/// Decodes a frame on `/admin/ws`.
pub fn agent_frame(text: &str) -> Result<AgentFrame, DecodeError> {
    let (f, rtc_kind) = parse(text)?;
    let r = f.client_ref.clone();
    let in_session = |cmd: AgentCmd| -> Result<AgentFrame, DecodeError> {
        Ok(AgentFrame::Request(AgentRequest::InSession { session_id: f.session_id()?, cmd }))
    };
    match frame_type(&f)?.as_ref() {
        "available" => Ok(AgentFrame::Request(AgentRequest::Available { client_ref: r })),
        "away" => Ok(AgentFrame::Request(AgentRequest::Away { client_ref: r })),
        "take" => {
            let target = match (f.inc.topic, f.inc.session_id) {
                (_, Some(_)) => TakeTarget::Session(f.session_id()?),
                (Some(_), None) => TakeTarget::NextIn(f.topic()?),
                (None, None) => return Err(f.fail("`take` needs `topic` or `session_id`")),
            };
            Ok(AgentFrame::Request(AgentRequest::Take { target, client_ref: r }))
        }
        "say" => in_session(AgentCmd::Say { text: f.text("text", f.inc.text, 1, TEXT_MAX)?, client_ref: r }),
        "typing" => in_session(AgentCmd::Typing { on: f.bool("on", f.inc.on)?, client_ref: r }),
        "rtc" => {
            let (kind, data) = rtc_of(&f, rtc_kind)?;
            in_session(AgentCmd::Rtc { kind, data, client_ref: r })
        }
        "end" => in_session(AgentCmd::End { client_ref: r }),
        "resume" => Ok(AgentFrame::Request(AgentRequest::Resume {
            session_id: f.session_id()?,
            last_seq: f.seq("last_seq", f.inc.last_seq)?,
            client_ref: r,
        })),
        "ping" => Ok(AgentFrame::Ping { client_ref: r }),
        other => Err(f.fail(format!("unknown message type `{}`", truncate(other)))),
    }
}

fn sample_rate(f: &Frame<'_>, raw: &RawValue) -> Result<u32, DecodeError> {
    #[derive(Deserialize)]
    struct Audio {
        sample_rate: Option<u32>,
    }
    let a: Audio = serde_json::from_str(raw.get()).map_err(|_| f.fail("`audio` must be an object with `sample_rate`"))?;
    let rate = a.sample_rate.unwrap_or(16000);
    if !(8000..=48000).contains(&rate) {
        return Err(f.fail("`audio.sample_rate` must be between 8000 and 48000"));
    }
    Ok(rate)
}

/// Only the `ref` of a frame (to answer a frame refused before decoding).
pub fn ref_only(text: &str) -> Option<ClientRef> {
    #[derive(Deserialize)]
    struct RefOnly<'a> {
        #[serde(rename = "ref", borrow)]
        client_ref: Option<&'a RawValue>,
    }
    if !is_object(text) {
        return None;
    }
    let r: RefOnly<'_> = serde_json::from_str(text).ok()?;
    canonical_ref(r.client_ref?).ok().flatten()
}

fn truncate(s: &str) -> String {
    s.chars().take(32).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> DecodeError {
        match customer_frame(text) {
            Err(e) => e,
            Ok(f) => panic!("expected an error for {text}, got {f:?}"),
        }
    }

    #[test]
    fn join_defaults_and_limits() {
        let Ok(CustomerFrame::Join { join, client_ref, .. }) =
            customer_frame(r#"{"type":"join","name":"Ann","topic":"support","ref":1}"#)
        else {
            panic!("join decodes");
        };
        assert_eq!(join.mode, Mode::Human);
        assert_eq!(client_ref, Some(ClientRef(Arc::from("1"))));
        let long: String = "é".repeat(81);
        let e = err(&format!(r#"{{"type":"join","name":"{long}","topic":"t","ref":"x"}}"#));
        assert!(e.message.contains("name"), "{}", e.message);
        assert_eq!(e.client_ref, Some(ClientRef(Arc::from("\"x\""))));
        // 80 code points of a 2-byte character is fine.
        let ok: String = "é".repeat(80);
        assert!(customer_frame(&format!(r#"{{"type":"join","name":"{ok}","topic":"t"}}"#)).is_ok());
    }

    #[test]
    fn bad_frames_name_the_problem() {
        assert!(err("not json").message.contains("JSON object"));
        assert!(err("[1,2]").message.contains("JSON object"));
        assert!(err(r#"{"ref":1}"#).message.contains("type"));
        assert!(err(r#"{"type":"fly"}"#).message.contains("unknown message type"));
        assert!(err(r#"{"type":"say","ref":1}"#).message.contains("text"));
        assert!(err(r#"{"type":"say","text":"","ref":1}"#).message.contains("text"));
        assert!(err(r#"{"type":"say","text":5,"ref":1}"#).message.contains("string"));
        assert!(err(r#"{"type":"typing","on":"yes"}"#).message.contains("boolean"));
        assert!(err(r#"{"type":"join","name":"a","topic":"no spaces"}"#).message.contains("topic"));
        for name in ["   ", "a\\nb", "nul\\u0000", "\\t", "\\u200b", "x\\u202eevil", "a\\u2028b"] {
            assert!(err(&format!(r#"{{"type":"join","name":"{name}","topic":"t"}}"#)).message.contains("name"), "{name}");
        }
        for name in [" Ann Lee ", "👨\\u200d👩\\u200d👧", "Zoë", "e\\u0301"] {
            assert!(customer_frame(&format!(r#"{{"type":"join","name":"{name}","topic":"t"}}"#)).is_ok(), "{name}");
        }
        assert!(err(r#"{"type":"join","name":"a","topic":""}"#).message.contains("topic"));
        assert!(err(&format!(r#"{{"type":"join","name":"a","topic":"{}"}}"#, "é".repeat(TOPIC_MAX + 1))).message.contains("topic"));
        for topic in ["billing:vip", "ventes-é", "Support_DE.2", &"é".repeat(TOPIC_MAX)] {
            assert!(customer_frame(&format!(r#"{{"type":"join","name":"a","topic":"{topic}"}}"#)).is_ok(), "{topic}");
        }
        assert!(err(r#"{"type":"join","name":"a","topic":"t","mode":"robot"}"#).message.contains("mode"));
        assert!(err(r#"{"type":"resume","session_id":"s","resume_token":"t","last_seq":-1}"#).message.contains("last_seq"));
        assert!(err(r#"{"type":"rtc","kind":"offer","data":[1],"ref":1}"#).message.contains("object"));
        assert!(err(r#"{"type":"rtc","kind":"bogus","data":{},"ref":1}"#).message.contains("kind"));
        assert!(err(r#"{"type":"stats","rtt_ms":1,"loss_pct":101,"jitter_ms":1}"#).message.contains("loss_pct"));
        assert!(err(r#"{"type":"ping","ref":1.5}"#).message.contains("ref"));
        assert!(err(r#"{"type":"ping","ref":{}}"#).message.contains("ref"));
    }

    /// serde reads a struct from an array by position: `[1]` once came back
    /// as an error answering ref 1, a ref the client never sent.
    #[test]
    fn an_array_is_no_object_and_has_no_ref() {
        for text in [r#"[1]"#, r#"["abc"]"#, r#" [7, "ping"]"#, r#"["ping", 1]"#, "\"ping\"", "42", "null"] {
            let e = err(text);
            assert!(e.message.contains("JSON object"), "{text}: {}", e.message);
            assert_eq!(e.client_ref, None, "{text}");
            assert_eq!(ref_only(text), None, "{text}");
            assert!(agent_frame(text).is_err_and(|e| e.client_ref.is_none()), "{text}");
        }
    }

    #[test]
    fn the_ref_survives_a_bad_field() {
        let e = err(r#"{"type":"say","text":"","ref":42}"#);
        assert_eq!(e.client_ref, Some(ClientRef(Arc::from("42"))));
    }

    #[test]
    fn rtc_keeps_data_verbatim() {
        let Ok(CustomerFrame::InSession(CustomerCmd::Rtc { kind, data, .. })) =
            customer_frame(r#"{"type":"rtc","kind":"ice","data":{"candidate":"a b","m":0},"ref":3}"#)
        else {
            panic!("rtc decodes");
        };
        assert_eq!(kind, RtcKind::Ice);
        assert_eq!(&*data.0, r#"{"candidate":"a b","m":0}"#);
    }

    #[test]
    fn agent_take_and_session_commands() {
        assert!(matches!(
            agent_frame(r#"{"type":"take","topic":"support","ref":1}"#),
            Ok(AgentFrame::Request(AgentRequest::Take { target: TakeTarget::NextIn(_), .. }))
        ));
        assert!(matches!(
            agent_frame(r#"{"type":"take","session_id":"abc","ref":1}"#),
            Ok(AgentFrame::Request(AgentRequest::Take { target: TakeTarget::Session(_), .. }))
        ));
        assert!(agent_frame(r#"{"type":"take","ref":1}"#).is_err());
        assert!(agent_frame(r#"{"type":"say","text":"hi","ref":1}"#).is_err(), "say needs session_id");
        assert!(agent_frame(r#"{"type":"end","session_id":"s","ref":1}"#).is_ok());
    }

    #[test]
    fn escaped_strings_decode() {
        let Ok(CustomerFrame::InSession(CustomerCmd::Say { text, .. })) =
            customer_frame(r#"{"type":"say","text":"a\"b\u00e9","ref":1}"#)
        else {
            panic!("say decodes");
        };
        assert_eq!(&*text, "a\"bé");
    }
}
