//! `conversation`: a one-pair smoke test of the whole customer ↔ agent path.
//!
//! One customer joins a fresh queue, one agent (bearer token) becomes available and takes
//! it, they say one message each way, the agent ends the session, and the customer sees
//! `ended`. It proves a server speaks the parts of the protocol the load scenarios rely
//! on before a long run is started, and names the first step that fails.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Result};
use serde_json::json;
use tokio::sync::mpsc;
use tokio::time::{timeout_at, Instant};

use crate::client::{Conn, ConnectOpts, Endpoint, Frame, Observer, SAY_REF_BASE};
use crate::report::log;

/// An event, owned, as the smoke test sees it.
#[derive(Debug)]
struct Event {
    ty: String,
    from: Option<String>,
    text: Option<String>,
    session_id: Option<String>,
    seq: Option<u64>,
}

/// Forwards every event into a channel.
struct Inbox(mpsc::UnboundedSender<Event>);

impl Observer for Inbox {
    fn on_event(&self, f: &Frame<'_>, _at: tokio::time::Instant) {
        let _ = self.0.send(Event {
            ty: f.ty.as_str().to_string(),
            from: f.from().map(str::to_string),
            text: f.text().map(str::to_string),
            session_id: f.session_id().map(str::to_string),
            seq: f.seq,
        });
    }
}

async fn expect(
    rx: &mut mpsc::UnboundedReceiver<Event>,
    within: Duration,
    what: &str,
    pred: impl Fn(&Event) -> bool,
) -> Result<Event> {
    let deadline = Instant::now() + within;
    loop {
        match timeout_at(deadline, rx.recv()).await {
            Err(_) => bail!("no {what} within {} s", within.as_secs_f64()),
            Ok(None) => bail!("connection closed while waiting for {what}"),
            Ok(Some(ev)) if pred(&ev) => return Ok(ev),
            Ok(Some(_)) => {}
        }
    }
}

/// Runs the smoke test; `Ok` carries a one-line summary.
pub async fn run(ep: Endpoint, token: String, topic: String, within: Duration) -> Result<String> {
    let opts = ConnectOpts {
        timeout: within,
        local_addr: None,
    };
    let step = |name: &'static str| move |e: crate::client::Failure| anyhow!("{name}: {e}");

    let (ctx, mut crx) = mpsc::unbounded_channel();
    let mut customer = Conn::customer(&ep, &opts, Arc::new(Inbox(ctx)))
        .await
        .map_err(step("customer connect (hello)"))?;
    let joined = customer
        .join("smoke-customer", &topic, within)
        .await
        .map_err(step("join"))?;
    let sid = joined
        .session_id
        .clone()
        .ok_or_else(|| anyhow!("join: no session_id"))?;
    log(format!(
        "conversation: joined {topic}: session {sid}, position {:?}",
        joined.position
    ));

    let (atx, mut arx) = mpsc::unbounded_channel();
    let mut agent = Conn::agent(&ep, &token, &opts, Arc::new(Inbox(atx)))
        .await
        .map_err(step("agent connect"))?;
    agent
        .request(json!({"type": "available"}), 1, within)
        .await
        .map_err(step("available"))?;
    let taken = agent.take(&topic, 2, within).await.map_err(step("take"))?;
    if taken != sid {
        bail!("take: got session {taken}, the customer's is {sid} (someone else waits on topic {topic}?)");
    }
    let assigned = customer
        .wait_assigned(within)
        .await
        .map_err(step("assigned"))?;
    if assigned != sid {
        bail!("assigned: session {assigned}, expected {sid}");
    }
    log("conversation: taken and assigned");

    let c_text = "hello from the smoke customer";
    let ack = customer
        .request(json!({"type": "say", "text": c_text}), SAY_REF_BASE, within)
        .await
        .map_err(step("customer say"))?;
    let ev = expect(&mut arx, within, "customer message at the agent", |e| {
        e.ty == "message"
            && e.from.as_deref() == Some("customer")
            && e.text.as_deref() == Some(c_text)
    })
    .await?;
    if ev.session_id.as_deref() != Some(sid.as_str()) || ev.seq.is_none() {
        bail!(
            "agent got the message with session_id {:?} seq {:?}, expected {sid} and a seq",
            ev.session_id,
            ev.seq
        );
    }
    log(format!(
        "conversation: customer → agent ok (ack seq {:?}, event seq {:?})",
        ack.seq, ev.seq
    ));

    let a_text = "hello from the smoke agent";
    agent
        .request(
            json!({"type": "say", "session_id": sid, "text": a_text}),
            3,
            within,
        )
        .await
        .map_err(step("agent say"))?;
    expect(&mut crx, within, "agent message at the customer", |e| {
        e.ty == "message" && e.from.as_deref() == Some("agent") && e.text.as_deref() == Some(a_text)
    })
    .await?;
    log("conversation: agent → customer ok");

    agent
        .request(json!({"type": "end", "session_id": sid}), 4, within)
        .await
        .map_err(step("end"))?;
    expect(&mut crx, within, "ended at the customer", |e| {
        e.ty == "ended"
    })
    .await?;
    customer.close().await;
    agent.close().await;
    Ok(format!(
        "ok: session {sid} on topic {topic}: join, take, say both ways, end"
    ))
}
