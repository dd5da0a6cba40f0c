//! One WebSocket over a TCP stream, after the HTTP upgrade: frames in,
//! frames out, nothing else.
//!
//! Why not actix-ws: it keeps the socket inside actix-http's HTTP/1
//! dispatcher for the whole life of the connection, and that dispatcher holds
//! two 8 KiB buffers per connection (not configurable) plus the request and
//! response objects of the upgrade. Ten thousand idle customers paid 14 KiB
//! each for that before duet added anything. Here the upgrade hands the TCP
//! stream over (actix-http's `upgrade` service) and this type owns it with
//! buffers sized by what is in flight: an idle socket holds no buffer at all.
//!
//! Framing and masking are actix-http's `ws::Codec` (the same parser
//! actix-ws uses); fragmented messages are joined here, bounded by the
//! message limit.

use std::io;
use std::sync::Arc;

use actix_http::ws::{CloseCode, CloseReason, Codec, Frame, Item, Message, ProtocolError};
use bytes::{Bytes, BytesMut};
use bytestring::ByteString;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use actix_codec::{Decoder, Encoder};

/// How much a read asks the kernel for at a time.
const READ_CHUNK: usize = 4096;

/// A whole message or control frame from the client.
#[derive(Debug, PartialEq)]
pub enum Incoming {
    /// Checked UTF-8, once, here.
    Text(ByteString),
    Binary(Bytes),
    Ping(Bytes),
    Pong,
    /// The client closed; its code (if any) is echoed back.
    Close(Option<CloseReason>),
}

/// Why reading stopped: what to tell the client in the close frame.
#[derive(Debug, PartialEq)]
pub enum ReadError {
    /// The TCP stream ended or failed: nothing can be sent.
    Gone,
    /// A message over the limit (1009).
    TooLarge,
    /// Text that is not UTF-8 (1007).
    NotUtf8,
    /// Anything else RFC 6455 forbids (1002).
    Protocol(String),
}

impl ReadError {
    pub fn close_reason(&self) -> Option<CloseReason> {
        let (code, text) = match self {
            ReadError::Gone => return None,
            ReadError::TooLarge => (CloseCode::Size, "message too large"),
            ReadError::NotUtf8 => (CloseCode::Invalid, "text frames must be UTF-8"),
            ReadError::Protocol(_) => (CloseCode::Protocol, "websocket protocol error"),
        };
        Some(CloseReason { code, description: Some(text.to_owned()) })
    }
}

/// The parsing half: bytes in, messages out. Kept apart from the stream so
/// it can be tested (and fuzzed) without a socket.
pub struct FrameReader {
    codec: Codec,
    max: usize,
    /// Bytes read but not yet a whole frame. Empty (no allocation) when idle.
    buf: BytesMut,
    /// A fragmented message being joined: (is text, what came so far).
    partial: Option<(bool, BytesMut)>,
}

impl FrameReader {
    pub fn new(max: usize) -> FrameReader {
        FrameReader { codec: Codec::new().max_size(max), max, buf: BytesMut::new(), partial: None }
    }

    /// Bytes that arrived with the upgrade request.
    pub fn with_leftover(max: usize, leftover: BytesMut) -> FrameReader {
        let mut r = FrameReader::new(max);
        if !leftover.is_empty() {
            r.buf = leftover;
        }
        r
    }

    #[cfg(test)]
    pub fn feed(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// The next whole message, if the buffer holds one.
    pub fn next(&mut self) -> Result<Option<Incoming>, ReadError> {
        loop {
            // Refuse an oversized frame from its header, before buffering it
            // (the codec would wait for the whole payload first).
            if declared_len(&self.buf).is_some_and(|n| n > self.max as u64) {
                return Err(ReadError::TooLarge);
            }
            let frame = match self.codec.decode(&mut self.buf) {
                Ok(Some(f)) => f,
                Ok(None) => {
                    if self.buf.is_empty() {
                        // Give the allocation back: idle sockets hold none.
                        self.buf = BytesMut::new();
                    }
                    return Ok(None);
                }
                Err(ProtocolError::Overflow) => return Err(ReadError::TooLarge),
                Err(e) => return Err(ReadError::Protocol(e.to_string())),
            };
            let whole = match frame {
                Frame::Text(b) => Some(text(b)?),
                Frame::Binary(b) => Some(Incoming::Binary(b)),
                Frame::Ping(b) => Some(Incoming::Ping(b)),
                Frame::Pong(_) => Some(Incoming::Pong),
                Frame::Close(r) => Some(Incoming::Close(r)),
                Frame::Continuation(item) => self.join(item)?,
            };
            if let Some(m) = whole {
                return Ok(Some(m));
            }
        }
    }

    fn join(&mut self, item: Item) -> Result<Option<Incoming>, ReadError> {
        let (first, chunk, last) = match item {
            Item::FirstText(b) => (Some(true), b, false),
            Item::FirstBinary(b) => (Some(false), b, false),
            Item::Continue(b) => (None, b, false),
            Item::Last(b) => (None, b, true),
        };
        let (is_text, so_far) = match (first, self.partial.as_mut()) {
            (Some(is_text), _) => self.partial.insert((is_text, BytesMut::new())),
            (None, Some(p)) => p,
            // The codec refuses a continuation that was never started.
            (None, None) => return Err(ReadError::Protocol("continuation without a first fragment".to_owned())),
        };
        if so_far.len() + chunk.len() > self.max {
            return Err(ReadError::TooLarge);
        }
        so_far.extend_from_slice(&chunk);
        let is_text = *is_text;
        if !last {
            return Ok(None);
        }
        let whole = self.partial.take().map(|(_, b)| b.freeze()).unwrap_or_default();
        Ok(Some(if is_text { text(whole)? } else { Incoming::Binary(whole) }))
    }
}

fn text(b: Bytes) -> Result<Incoming, ReadError> {
    ByteString::try_from(b).map(Incoming::Text).map_err(|_| ReadError::NotUtf8)
}

/// The payload length a frame header announces, once the header is there.
fn declared_len(buf: &[u8]) -> Option<u64> {
    let b1 = *buf.get(1)?;
    match b1 & 0x7F {
        126 => Some(u64::from(u16::from_be_bytes([*buf.get(2)?, *buf.get(3)?]))),
        127 => {
            let bytes: [u8; 8] = buf.get(2..10)?.try_into().ok()?;
            Some(u64::from_be_bytes(bytes))
        }
        n => Some(u64::from(n)),
    }
}

/// The stream, owned; or shared with a [`super::direct::DirectSocket`]
/// (agent sockets), which writes into it from other threads.
enum Io {
    Owned(TcpStream),
    Shared(Arc<TcpStream>),
}

impl Io {
    fn stream(&self) -> &TcpStream {
        match self {
            Io::Owned(s) => s,
            Io::Shared(s) => s,
        }
    }
}

/// The socket: the TCP stream, the frame reader and a write buffer that is
/// filled with a burst of frames and written with one call.
pub struct WsSocket {
    io: Io,
    reader: FrameReader,
    codec: Codec,
    out: BytesMut,
    /// A flush was cancelled halfway: the stream may end inside a frame,
    /// so nothing more may be written to it.
    torn: bool,
}

impl WsSocket {
    pub fn new(io: TcpStream, reader: FrameReader) -> WsSocket {
        WsSocket { io: Io::Owned(io), reader, codec: Codec::new(), out: BytesMut::new(), torn: false }
    }

    /// The same socket, its stream shared with a direct writer.
    pub fn into_shared(self) -> (WsSocket, Arc<TcpStream>) {
        let WsSocket { io, reader, codec, out, torn } = self;
        let stream = match io {
            Io::Owned(s) => Arc::new(s),
            Io::Shared(s) => s,
        };
        (WsSocket { io: Io::Shared(stream.clone()), reader, codec, out, torn }, stream)
    }

    /// A message already buffered, without waiting.
    pub fn buffered(&mut self) -> Result<Option<Incoming>, ReadError> {
        self.reader.next()
    }

    /// Waits until the stream has bytes (or ended). Cancel-safe: nothing is
    /// consumed until [`WsSocket::read_available`].
    pub async fn readable(&self) -> io::Result<()> {
        self.io.stream().readable().await
    }

    /// Moves whatever the kernel holds into the reader. `Err(Gone)` when the
    /// stream ended.
    pub fn read_available(&mut self) -> Result<(), ReadError> {
        loop {
            self.reader.buf.reserve(READ_CHUNK);
            match self.io.stream().try_read_buf(&mut self.reader.buf) {
                Ok(0) => return Err(ReadError::Gone),
                Ok(n) if n < READ_CHUNK => return Ok(()),
                Ok(_) => {
                    // Maybe more; but never buffer past one frame over the limit.
                    if self.reader.buf.len() > self.reader.max + READ_CHUNK {
                        return Ok(());
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(_) => return Err(ReadError::Gone),
            }
        }
    }

    /// Queues one text frame (written by [`WsSocket::flush`]).
    pub fn queue_text(&mut self, text: String) {
        self.queue(Message::Text(text.into()));
    }

    pub fn queue_ping(&mut self) {
        self.queue(Message::Ping(Bytes::new()));
    }

    pub fn queue_pong(&mut self, payload: Bytes) {
        self.queue(Message::Pong(payload));
    }

    pub fn queue_close(&mut self, reason: Option<CloseReason>) {
        self.queue(Message::Close(reason));
    }

    /// Bytes already framed (the rest of a direct write), written before
    /// anything queued after them.
    pub fn queue_raw(&mut self, bytes: &[u8]) {
        self.out.extend_from_slice(bytes);
    }

    fn queue(&mut self, m: Message) {
        // The server side never masks and never fragments: encoding a whole
        // text/control frame into a buffer cannot fail.
        if let Err(e) = self.codec.encode(m, &mut self.out) {
            tracing::error!(error = %e, "websocket frame could not be encoded");
        }
    }

    pub fn has_queued(&self) -> bool {
        !self.out.is_empty()
    }

    /// Writes everything queued. Not cancel-safe (a cancelled flush may
    /// have written part of a frame): cancel it only to drop the socket.
    pub async fn flush(&mut self) -> io::Result<()> {
        if self.torn {
            return Err(io::ErrorKind::BrokenPipe.into());
        }
        if self.out.is_empty() {
            return Ok(());
        }
        self.torn = true;
        let r = write_all(self.io.stream(), &self.out).await;
        self.torn = false;
        // Sockets are idle far more than they write: hold no buffer between
        // bursts (a burst allocates one, which is cheaper than keeping it).
        self.out = BytesMut::new();
        r
    }

    /// Sends what is queued and the close frame (best effort), then ends
    /// the stream.
    pub async fn close(mut self, reason: Option<CloseReason>) {
        self.queue_close(reason);
        if self.flush().await.is_ok() {
            // A shared stream is ours alone again once its direct writer
            // closed; otherwise dropping it ends the connection all the same.
            let owned = match self.io {
                Io::Owned(s) => Some(s),
                Io::Shared(s) => Arc::try_unwrap(s).ok(),
            };
            if let Some(mut s) = owned {
                let _ = s.shutdown().await;
                // Boxed: its timer and buffer are part of no idle socket.
                Box::pin(linger(&mut s)).await;
            }
        }
    }
}

/// How long a closed socket keeps reading what the client still sends.
const LINGER: std::time::Duration = std::time::Duration::from_secs(2);
/// How much it reads at most before it lets go anyway.
const LINGER_BYTES: usize = 1024 * 1024;

/// Reads and drops what the client still sends after our close frame,
/// until it closes too (bounded in time and bytes). Closing a socket with
/// unread input makes the kernel answer with a reset, and a reset makes
/// the client's kernel drop what it had received and not yet read: a
/// client that sent a burst would lose our last answers and the close
/// frame itself (seen: 1006 instead of 1008 after a flood).
async fn linger(stream: &mut TcpStream) {
    use tokio::io::AsyncReadExt;
    let mut buf = vec![0u8; READ_CHUNK];
    let mut total = 0;
    let _ = tokio::time::timeout(LINGER, async {
        while total <= LINGER_BYTES {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => total += n,
            }
        }
    })
    .await;
}

/// `write_all` through `&TcpStream` (the stream may be shared): waits for
/// room, writes what fits, until all is written. A `poll_fn` over
/// `poll_write_ready` rather than `writable().await`: that future carries a
/// waiter node of its own, and this one is part of every idle socket's
/// task (112 bytes more per waiting customer, measured).
pub(super) async fn write_all(stream: &TcpStream, buf: &[u8]) -> io::Result<()> {
    let mut buf = buf;
    std::future::poll_fn(|cx| {
        while !buf.is_empty() {
            if let Err(e) = std::task::ready!(stream.poll_write_ready(cx)) {
                return std::task::Poll::Ready(Err(e));
            }
            match stream.try_write(buf) {
                Ok(0) => return std::task::Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Ok(n) => buf = &buf[n..],
                // Readiness was cleared: the next poll waits for room.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return std::task::Poll::Ready(Err(e)),
            }
        }
        std::task::Poll::Ready(Ok(()))
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A client frame: FIN flag, opcode, masked payload.
    fn client_frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![if fin { 0x80 } else { 0 } | opcode];
        let len = payload.len();
        if len < 126 {
            f.push(0x80 | len as u8);
        } else if len <= 0xFFFF {
            f.push(0x80 | 126);
            f.extend_from_slice(&(len as u16).to_be_bytes());
        } else {
            f.push(0x80 | 127);
            f.extend_from_slice(&(len as u64).to_be_bytes());
        }
        let mask = [7u8, 1, 2, 9];
        f.extend_from_slice(&mask);
        f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        f
    }

    #[test]
    fn whole_and_split_frames() {
        let mut r = FrameReader::new(1024);
        let f = client_frame(true, 1, br#"{"type":"ping"}"#);
        r.feed(&f[..3]);
        assert_eq!(r.next(), Ok(None));
        r.feed(&f[3..]);
        assert_eq!(r.next(), Ok(Some(Incoming::Text(ByteString::from_static(r#"{"type":"ping"}"#)))));
        assert_eq!(r.next(), Ok(None));
        assert_eq!(r.buf.capacity(), 0, "an idle reader holds no buffer");
    }

    #[test]
    fn fragments_are_joined_and_bounded() {
        let mut r = FrameReader::new(10);
        r.feed(&client_frame(false, 1, b"hel"));
        r.feed(&client_frame(true, 9, b"")); // a ping between fragments
        r.feed(&client_frame(true, 0, b"lo"));
        assert_eq!(r.next(), Ok(Some(Incoming::Ping(Bytes::new()))));
        assert_eq!(r.next(), Ok(Some(Incoming::Text(ByteString::from_static("hello")))));
        r.feed(&client_frame(false, 2, b"123456"));
        r.feed(&client_frame(true, 0, b"78901"));
        assert_eq!(r.next(), Err(ReadError::TooLarge));
    }

    #[test]
    fn oversized_frame_refused_from_its_header() {
        let mut r = FrameReader::new(100);
        let f = client_frame(true, 1, &[b'a'; 70_000]);
        r.feed(&f[..20]);
        assert_eq!(r.next(), Err(ReadError::TooLarge));
    }

    #[test]
    fn bad_frames() {
        let mut r = FrameReader::new(100);
        r.feed(&client_frame(true, 1, &[0xff, 0xfe]));
        assert_eq!(r.next(), Err(ReadError::NotUtf8));
        let mut r = FrameReader::new(100);
        r.feed(&[0x81, 0x02, b'h', b'i']); // unmasked
        assert!(matches!(r.next(), Err(ReadError::Protocol(_))));
        let mut r = FrameReader::new(100);
        r.feed(&client_frame(true, 0, b"x")); // continuation never started
        assert!(matches!(r.next(), Err(ReadError::Protocol(_))));
    }

    #[test]
    fn close_with_code() {
        let mut r = FrameReader::new(100);
        r.feed(&client_frame(true, 8, &1000u16.to_be_bytes()));
        assert_eq!(r.next(), Ok(Some(Incoming::Close(Some(CloseReason { code: CloseCode::Normal, description: None })))));
    }

    #[test]
    fn any_bytes_never_panic() {
        // A cheap fuzz beside the cargo-fuzz target: random bytes in random
        // chunks end in a message, an error or "need more", never a panic.
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for _ in 0..2000 {
            let mut r = FrameReader::new(256);
            let n = rng.random_range(0..600);
            let bytes: Vec<u8> = (0..n).map(|_| rng.random()).collect();
            for chunk in bytes.chunks(rng.random_range(1..64)) {
                r.feed(chunk);
                while let Ok(Some(_)) = r.next() {}
            }
        }
    }
}
