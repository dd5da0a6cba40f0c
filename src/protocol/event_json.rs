//! JSON of session events: the wire frame sent to clients and the body kept
//! in the `events.body` column. One place knows both, so a replayed event is
//! byte-for-byte the frame that was sent live (except the resume token,
//! which is never stored).

use std::sync::Arc;

use duet_actors::domain::{
    AgentInfo, AgentKind, EndReason, Event, EventBody, Mode, OpaqueJson, Party, RtcKind,
};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

/// RFC 3339 in UTC with milliseconds, as in `message.at`.
pub fn rfc3339_ms(at_ms: i64) -> String {
    let nanos = i128::from(at_ms) * 1_000_000;
    time::OffsetDateTime::from_unix_timestamp_nanos(nanos)
        .ok()
        .and_then(|t| {
            t.format(&time::macros::format_description!(
                "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
            ))
            .ok()
        })
        .unwrap_or_else(|| "1970-01-01T00:00:00.000Z".to_owned())
}

#[derive(Serialize, Deserialize)]
struct AgentJson<'a> {
    id: &'a str,
    name: &'a str,
    kind: &'a str,
}

/// The fields of each event kind, as they appear both on the wire and in the
/// stored body. Borrowed, so encoding allocates only the output string.
#[derive(Serialize)]
#[serde(untagged)]
enum BodyFields<'a> {
    Session {
        #[serde(skip_serializing_if = "Option::is_none")]
        resume_token: Option<&'a str>,
        topic: &'a str,
        mode: &'a str,
    },
    Assigned {
        agent: AgentJson<'a>,
    },
    Message {
        from: &'a str,
        text: &'a str,
        msg_id: &'a str,
    },
    Rtc {
        kind: &'a str,
        data: &'a RawValue,
        from: &'a str,
    },
    Ended {
        reason: &'a str,
    },
}

fn fields<'a>(body: &'a EventBody, raw: &'a mut Option<Box<RawValue>>) -> BodyFields<'a> {
    match body {
        EventBody::Session { resume_token, topic, mode } => BodyFields::Session {
            resume_token: resume_token.as_deref(),
            topic,
            mode: mode.as_str(),
        },
        EventBody::Assigned { agent } => BodyFields::Assigned {
            agent: AgentJson { id: &agent.id, name: &agent.name, kind: agent.kind.as_str() },
        },
        EventBody::Message { from, text, msg_id } => BodyFields::Message {
            from: from.as_str(),
            text,
            msg_id,
        },
        EventBody::Rtc { kind, data, from } => {
            // `data` was validated as a JSON object when it arrived; an
            // invalid one here would be a bug upstream, sent as `{}`.
            let value = RawValue::from_string(data.0.to_string())
                .or_else(|_| RawValue::from_string("{}".to_owned()));
            *raw = value.ok();
            BodyFields::Rtc {
                kind: kind.as_str(),
                data: raw.as_deref().unwrap_or_else(|| empty_object()),
                from: from.as_str(),
            }
        }
        EventBody::Ended { reason } => BodyFields::Ended { reason: reason.as_str() },
    }
}

fn empty_object() -> &'static RawValue {
    static EMPTY: std::sync::OnceLock<Box<RawValue>> = std::sync::OnceLock::new();
    EMPTY.get_or_init(|| {
        RawValue::from_string("{}".to_owned()).expect("`{}` is valid JSON")
    })
}

#[derive(Serialize)]
struct WireEvent<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    session_id: &'a str,
    seq: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    at: Option<String>,
    #[serde(flatten)]
    fields: BodyFields<'a>,
}

/// The frame a client receives for a stored event.
pub fn encode_event(event: &Event) -> String {
    let mut raw = None;
    let at = matches!(event.body, EventBody::Message { .. }).then(|| rfc3339_ms(event.at_ms));
    let wire = WireEvent {
        kind: event.body.type_name(),
        session_id: &event.session_id,
        seq: event.seq,
        at,
        fields: fields(&event.body, &mut raw),
    };
    serde_json::to_string(&wire).unwrap_or_else(|_| "{}".to_owned())
}

/// The stored `body` column of an event: its fields, without the resume token.
pub fn encode_body(body: &EventBody) -> String {
    let stripped;
    let body = match body {
        EventBody::Session { resume_token: Some(_), topic, mode } => {
            stripped = EventBody::Session { resume_token: None, topic: topic.clone(), mode: *mode };
            &stripped
        }
        other => other,
    };
    let mut raw = None;
    serde_json::to_string(&fields(body, &mut raw)).unwrap_or_else(|_| "{}".to_owned())
}

#[derive(Deserialize)]
struct StoredFields<'a> {
    #[serde(borrow)]
    topic: Option<&'a str>,
    mode: Option<&'a str>,
    agent: Option<AgentJson<'a>>,
    from: Option<&'a str>,
    text: Option<String>,
    msg_id: Option<&'a str>,
    kind: Option<&'a str>,
    data: Option<&'a RawValue>,
    reason: Option<&'a str>,
}

/// Rebuilds an event body from its `kind` and stored `body` columns.
/// `None` when the row is not one duet wrote (it is then skipped and logged
/// by the caller).
pub fn decode_body(kind: &str, body: &str) -> Option<EventBody> {
    let f: StoredFields<'_> = serde_json::from_str(body).ok()?;
    Some(match kind {
        "session" => EventBody::Session {
            resume_token: None,
            topic: Arc::from(f.topic?),
            mode: Mode::parse(f.mode?)?,
        },
        "assigned" => {
            let a = f.agent?;
            EventBody::Assigned {
                agent: AgentInfo {
                    id: Arc::from(a.id),
                    name: Arc::from(a.name),
                    kind: if a.kind == "ai" { AgentKind::Ai } else { AgentKind::Human },
                },
            }
        }
        "message" => EventBody::Message {
            from: Party::parse(f.from?)?,
            text: Arc::from(f.text?),
            msg_id: Arc::from(f.msg_id?),
        },
        "rtc" => EventBody::Rtc {
            kind: RtcKind::parse(f.kind?)?,
            data: OpaqueJson(Arc::from(f.data?.get())),
            from: Party::parse(f.from?)?,
        },
        "ended" => EventBody::Ended { reason: EndReason::parse(f.reason?)? },
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(body: EventBody) -> Event {
        Event { session_id: Arc::from("s1"), seq: 3, at_ms: 1_700_000_000_123, body }
    }

    #[test]
    fn message_frame_has_every_contract_field() {
        let e = ev(EventBody::Message {
            from: Party::Customer,
            text: Arc::from("hé \"quoted\""),
            msg_id: Arc::from("m1"),
        });
        let v: serde_json::Value = serde_json::from_str(&encode_event(&e)).expect("valid json");
        assert_eq!(v["type"], "message");
        assert_eq!(v["session_id"], "s1");
        assert_eq!(v["seq"], 3);
        assert_eq!(v["from"], "customer");
        assert_eq!(v["text"], "hé \"quoted\"");
        assert_eq!(v["msg_id"], "m1");
        assert_eq!(v["at"], "2023-11-14T22:13:20.123Z");
    }

    #[test]
    fn bodies_round_trip_through_storage() {
        let bodies = [
            EventBody::Session { resume_token: None, topic: Arc::from("support"), mode: Mode::Ai },
            EventBody::Assigned {
                agent: AgentInfo { id: Arc::from("a"), name: Arc::from("Ann"), kind: AgentKind::Human },
            },
            EventBody::Message { from: Party::Agent, text: Arc::from("hi"), msg_id: Arc::from("x") },
            EventBody::Rtc {
                kind: RtcKind::Ice,
                data: OpaqueJson(Arc::from(r#"{"candidate":"c","n":[1,2]}"#)),
                from: Party::Customer,
            },
            EventBody::Ended { reason: EndReason::AgentLost },
        ];
        for b in bodies {
            let stored = encode_body(&b);
            assert_eq!(decode_body(b.type_name(), &stored), Some(b));
        }
    }

    #[test]
    fn resume_token_is_sent_but_never_stored() {
        let b = EventBody::Session {
            resume_token: Some(Arc::from("secret")),
            topic: Arc::from("t"),
            mode: Mode::Human,
        };
        assert!(encode_event(&ev(b.clone())).contains("secret"));
        assert!(!encode_body(&b).contains("secret"));
    }

    #[test]
    fn foreign_rows_are_refused() {
        assert_eq!(decode_body("nope", "{}"), None);
        assert_eq!(decode_body("message", "not json"), None);
        assert_eq!(decode_body("message", r#"{"from":"martian","text":"a","msg_id":"b"}"#), None);
    }
}
