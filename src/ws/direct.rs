//! Writing a live event into an agent's socket from the thread that
//! produced it ([`DirectWrite`]), when that socket's loop is asleep and has
//! nothing queued.
//!
//! Why: a customer's message is committed and handed to the agent's socket
//! by the session's thread (the customer's worker); the agent's socket
//! lives on the other worker half the time, and waking that thread only to
//! copy one frame into the kernel is a context switch per message, on a
//! path where the measured server CPU is two-thirds kernel (BENCHMARKS.md).
//! A non-blocking write from the session's thread puts the relay on the
//! wire before the ack, as the peer does, and the agent's worker sleeps on.
//!
//! Safety of the stream: the queue's lock (held by the caller) and the
//! loop's busy flag keep this and the loop from ever writing at the same
//! time; a partial write keeps the rest here and queues a marker that
//! wakes the loop, which writes the rest before anything else. The stream
//! is released when the loop ends, so no write can reach a closed socket.

use std::sync::Arc;

use actix_codec::Encoder;
use actix_http::ws::{Codec, Message};
use bytes::BytesMut;
use duet_actors::outbound::{Direct, DirectWrite, Outbound};
use parking_lot::Mutex;
use prometheus_client::metrics::counter::Counter;
use tokio::net::TcpStream;

use crate::protocol::encode;

#[derive(Debug)]
pub struct DirectSocket {
    state: Mutex<State>,
    /// `duet_frames_direct`.
    written: Counter,
}

#[derive(Debug)]
struct State {
    /// `None` once the loop ended.
    stream: Option<Arc<TcpStream>>,
    codec: Codec,
    /// What a partial write left for the loop.
    rest: BytesMut,
}

impl DirectSocket {
    pub fn new(stream: Arc<TcpStream>, written: Counter) -> DirectSocket {
        let state = State { stream: Some(stream), codec: Codec::new(), rest: BytesMut::new() };
        DirectSocket { state: Mutex::new(state), written }
    }

    /// The bytes a partial write left, for the loop to send first.
    pub fn take_rest(&self) -> Option<BytesMut> {
        let mut st = self.state.lock();
        (!st.rest.is_empty()).then(|| std::mem::take(&mut st.rest))
    }

    /// The loop is ending: no more writes from here.
    pub fn close(&self) {
        self.state.lock().stream = None;
    }
}

impl DirectWrite for DirectSocket {
    fn try_write(&self, frame: &Outbound) -> Direct {
        let mut st = self.state.lock();
        let State { stream, codec, rest } = &mut *st;
        let Some(stream) = stream.as_ref() else { return Direct::Refused };
        if !rest.is_empty() {
            return Direct::Refused;
        }
        let Some(text) = encode::encode(frame) else { return Direct::Refused };
        let mut buf = BytesMut::with_capacity(text.len() + 10);
        if codec.encode(Message::Text(text.into()), &mut buf).is_err() {
            return Direct::Refused;
        }
        match stream.try_write(&buf) {
            Ok(n) if n == buf.len() => {
                self.written.inc();
                Direct::Written
            }
            Ok(n) if n > 0 => {
                self.written.inc();
                *rest = buf.split_off(n);
                Direct::Partial
            }
            // No room (or an error the loop will meet itself): queue it.
            _ => Direct::Refused,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use actix_codec::Decoder;
    use actix_http::ws::Frame;
    use duet_actors::domain::{Event, EventBody, Party};
    use tokio::io::AsyncReadExt;

    fn big_event(seq: i64) -> Outbound {
        Outbound::Event(Arc::new(Event {
            session_id: Arc::from("s"),
            seq,
            at_ms: 0,
            body: EventBody::Message { from: Party::Customer, text: Arc::from("x".repeat(60_000)), msg_id: Arc::from("m") },
        }))
    }

    /// Against a client that does not read: whole frames until the kernel
    /// is full, then one partial write whose rest is kept, then nothing
    /// until the rest is taken; the client gets every frame whole.
    #[tokio::test]
    async fn a_partial_write_keeps_the_rest_and_frames_arrive_whole() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let mut client = TcpStream::connect(addr).await.expect("connect");
        let (server, _) = listener.accept().await.expect("accept");
        let server = Arc::new(server);
        let socket = Arc::new(DirectSocket::new(server.clone(), Counter::default()));
        let mut written = 0;
        let outcome = loop {
            match socket.try_write(&big_event(written + 1)) {
                Direct::Written => written += 1,
                other => break other,
            }
            assert!(written < 10_000, "the kernel never filled up");
        };
        // 60 KB frames do not end exactly where the kernel's buffer does.
        assert_eq!(outcome, Direct::Partial);
        assert_eq!(socket.try_write(&big_event(0)), Direct::Refused, "nothing overtakes a rest");
        let whole = written + 1;
        // The loop's part: the rest, through the shared stream.
        let rest = socket.take_rest();
        assert!(rest.is_some());
        let reader = tokio::spawn(async move {
            let mut codec = Codec::new().client_mode().max_size(1 << 20);
            let mut buf = BytesMut::new();
            let mut seqs = Vec::new();
            while seqs.len() < whole as usize {
                if client.read_buf(&mut buf).await.expect("read") == 0 {
                    break;
                }
                while let Some(frame) = codec.decode(&mut buf).expect("whole frames") {
                    let Frame::Text(t) = frame else { panic!("unexpected {frame:?}") };
                    let v: serde_json::Value = serde_json::from_slice(&t).expect("json");
                    seqs.push(v["seq"].as_i64().expect("seq"));
                }
            }
            seqs
        });
        if let Some(rest) = rest {
            super::super::socket::write_all(&server, &rest).await.expect("rest written");
        }
        let seqs = reader.await.expect("reader");
        assert_eq!(seqs, (1..=whole).collect::<Vec<_>>());
        socket.close();
        assert_eq!(socket.try_write(&big_event(99)), Direct::Refused, "closed: nothing is written");
    }
}
