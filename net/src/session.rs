//! Sessions: what makes a message stream survive a broken connection. Sans-IO: the
//! owner moves bytes (a reactor polling a socket, or a test) and this module decides
//! what they mean and what to send, so every protocol path is tested without sockets.
//!
//! * **Handshake.** Each side sends a banner (magic, supported and required feature
//!   bits); a side missing a feature the other requires closes with a clear error. The
//!   client then sends `hello` (its session cookie and the last sequence number it
//!   received); the server finds or creates the session for that cookie and answers
//!   `hello_reply` (the last sequence number it received).
//! * **Exactly once.** Every message carries a sequence number (1, 2, ...) and the
//!   sender's cumulative ack. A sender keeps each message until the peer acks it; after a
//!   reconnect both sides learn what the other received and resend the rest. A receiver
//!   delivers only the next sequence number and drops duplicates, so each message is
//!   delivered once, in order, across any number of cuts.
//! * **Keepalives** carry the sender's clock and are echoed.
//!
//! Messages kept for resending live back to back in one buffer that is compacted as acks
//! arrive: no allocation per message once it has grown to the in-flight window. The
//! same buffer is the output: the owner writes a message from it straight to the socket
//! ([`Session::unsent`], [`Session::mark_sent`]), so a message is copied once, into the
//! buffer, on its way out. Control frames (acks, keepalives, the handshake) go to a
//! separate output the owner writes before the messages, never inside one
//! ([`Session::unsent_in_frame`]).

use std::collections::VecDeque;

use crate::frame::{self, Decoded, Frame, FrameError, Limits};
use crate::message::{self, MessageError};
use sluice_vocab::codec::Dec;

pub const BANNER_MAGIC: [u8; 8] = *b"SLUICE\0\x01";
const VERSION: u16 = 1;

/// Frame tags of the session layer.
pub mod tag {
    pub const BANNER: u8 = 1;
    pub const HELLO: u8 = 2;
    pub const HELLO_REPLY: u8 = 3;
    pub const MESSAGE: u8 = 10;
    pub const ACK: u8 = 11;
    pub const KEEPALIVE: u8 = 12;
    pub const KEEPALIVE_ACK: u8 = 13;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Features {
    pub supported: u64,
    pub required: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SessionError {
    #[error("frame: {0}")]
    Frame(#[from] FrameError),
    #[error("message: {0}")]
    Message(#[from] MessageError),
    #[error("not a Sluice peer (bad banner)")]
    BadBanner,
    #[error("the peer lacks required features {0:#x}")]
    PeerLacksFeatures(u64),
    #[error("we lack features {0:#x} the peer requires")]
    WeLackFeatures(u64),
    #[error("unexpected {what} frame (tag {tag}) in state {state}")]
    Unexpected { what: &'static str, tag: u8, state: &'static str },
    #[error("message {got} arrived after {have}: the peer skipped messages")]
    Gap { have: u64, got: u64 },
    #[error("the peer acked message {acked}, but only {sent} were sent")]
    AckAhead { acked: u64, sent: u64 },
    #[error("truncated {0}")]
    Truncated(&'static str),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event<'a> {
    /// The handshake is done; `features` is what both sides support.
    Ready { features: u64 },
    /// The next message, in order, exactly once.
    Message { seq: u64, msg_type: u16, frame: Frame<'a> },
    /// The peer echoed our keepalive sent at `sent_ns`.
    KeepaliveAck { sent_ns: u64 },
    /// Client: the server no longer knew this session (it restarted, or expired the
    /// session while we were away). Messages it had not acknowledged were renumbered
    /// and sent again, so the server may see some of them twice: the layer above must
    /// make them idempotent (the object protocol's request ids do).
    Reset { resent: usize },
}

/// The payload of a message frame (segment 0 is the session header).
pub fn payload<'a>(frame: &Frame<'a>) -> &'a [u8] {
    frame.segment(1)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// No connection.
    Disconnected,
    /// Client: banner and hello sent, waiting for the server's banner and reply.
    AwaitReply {
        banner: bool,
    },
    Open,
}

impl State {
    fn name(self) -> &'static str {
        match self {
            State::Disconnected => "disconnected",
            State::AwaitReply { .. } => "awaiting the hello reply",
            State::Open => "open",
        }
    }
}

/// Writes a session control frame whose message body is `fields`, back to back. Built on
/// the stack: acks and keepalives allocate nothing.
fn write_msg(out: &mut Vec<u8>, tag: u8, limits: &Limits, fields: &[&[u8]]) {
    let mut seg = [0u8; 64];
    let len: usize = fields.iter().map(|f| f.len()).sum();
    let end = message::HEADER_BYTES + len;
    assert!(end <= seg.len(), "session control messages are small");
    seg[..message::HEADER_BYTES].copy_from_slice(&message::header(VERSION, 1, len as u32));
    let mut at = message::HEADER_BYTES;
    for f in fields {
        seg[at..at + f.len()].copy_from_slice(f);
        at += f.len();
    }
    frame::encode(out, tag, 0, &[&seg[..end]], limits).expect("session frames are small");
}

fn write_banner(out: &mut Vec<u8>, f: Features, limits: &Limits) {
    let fields: [&[u8]; 3] = [&BANNER_MAGIC, &f.supported.to_le_bytes(), &f.required.to_le_bytes()];
    write_msg(out, tag::BANNER, limits, &fields);
}

fn body<'a>(f: &Frame<'a>) -> Result<Dec<'a>, SessionError> {
    Ok(Dec::new(message::open(f.segment(0), VERSION)?.body))
}

/// A MESSAGE frame's session header: (sequence number, sender's ack, message type).
fn message_header(f: &Frame<'_>) -> Result<(u64, u64, u16), SessionError> {
    let mut d = body(f)?;
    let t = |_| SessionError::Truncated("message header");
    Ok((d.u64().map_err(t)?, d.u64().map_err(t)?, d.u16().map_err(t)?))
}

fn negotiate(ours: Features, f: &Frame<'_>) -> Result<u64, SessionError> {
    let mut d = body(f)?;
    let t = |_| SessionError::Truncated("banner");
    if d.array::<8>().map_err(t)? != BANNER_MAGIC {
        return Err(SessionError::BadBanner);
    }
    let supported = d.u64().map_err(t)?;
    let required = d.u64().map_err(t)?;
    let missing = ours.required & !supported;
    if missing != 0 {
        return Err(SessionError::PeerLacksFeatures(missing));
    }
    let lacking = required & !ours.supported;
    if lacking != 0 {
        return Err(SessionError::WeLackFeatures(lacking));
    }
    Ok(ours.supported & supported)
}

/// What a client said in its hello.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hello {
    pub cookie: u64,
    /// The last message the client received from us (in a previous connection).
    pub peer_in_seq: u64,
    pub features: u64,
}

/// The server's side of a new connection until the client says which session it is.
#[derive(Debug)]
pub struct Handshake {
    features: Features,
    limits: Limits,
    negotiated: Option<u64>,
}

impl Handshake {
    /// Starts the server side: writes our banner.
    pub fn new(features: Features, limits: Limits, out: &mut Vec<u8>) -> Handshake {
        write_banner(out, features, &limits);
        Handshake { features, limits, negotiated: None }
    }

    /// Consumes handshake frames from `buf`. Returns the bytes consumed and, once the
    /// client's hello is in, who it is; the bytes after it belong to the session.
    pub fn receive(&mut self, buf: &[u8]) -> Result<(usize, Option<Hello>), SessionError> {
        let mut at = 0;
        loop {
            let (f, len) = match frame::decode(&buf[at..], &self.limits)? {
                Decoded::NeedMore { .. } => return Ok((at, None)),
                Decoded::Frame { frame, len } => (frame, len),
            };
            at += len;
            match (f.tag, self.negotiated) {
                (tag::BANNER, None) => self.negotiated = Some(negotiate(self.features, &f)?),
                (tag::HELLO, Some(features)) => {
                    let mut d = body(&f)?;
                    let t = |_| SessionError::Truncated("hello");
                    let cookie = d.u64().map_err(t)?;
                    let peer_in_seq = d.u64().map_err(t)?;
                    return Ok((at, Some(Hello { cookie, peer_in_seq, features })));
                }
                (t, _) => {
                    return Err(SessionError::Unexpected {
                        what: "handshake",
                        tag: t,
                        state: "server handshake",
                    });
                }
            }
        }
    }
}

/// One end of a session. It outlives connections: after a cut, `disconnected()`, then
/// `connect()` (client) or `attach()` (server) on the new connection.
#[derive(Debug)]
pub struct Session {
    client: bool,
    pub cookie: u64,
    features: Features,
    limits: Limits,
    negotiated: u64,
    state: State,
    /// Last sequence number we assigned.
    out_seq: u64,
    /// Last sequence number the peer acked.
    acked: u64,
    /// Encoded MESSAGE frames not yet acked, back to back from `replay_head`.
    replay: Vec<u8>,
    replay_head: usize,
    /// How much of `replay` the current connection was given (`replay_head..sent` went
    /// out; meaningful only while open).
    sent: usize,
    /// (seq, offset in `replay`, length) of each unacked message, oldest first.
    unacked: VecDeque<(u64, usize, usize)>,
    /// Last sequence number delivered to us.
    in_seq: u64,
    ack_pending: bool,
    /// Messages delivered since the peer last heard our position.
    acks_owed: u32,
    /// Server: never attached yet (a hello for it is a new client or a reset one).
    /// Client: has been open before (so a fresh server session means a reset).
    history: bool,
}

impl Session {
    fn new(client: bool, cookie: u64, features: Features, limits: Limits) -> Session {
        Session {
            client,
            cookie,
            features,
            limits,
            negotiated: 0,
            state: State::Disconnected,
            out_seq: 0,
            acked: 0,
            replay: Vec::new(),
            replay_head: 0,
            sent: 0,
            unacked: VecDeque::new(),
            in_seq: 0,
            ack_pending: false,
            acks_owed: 0,
            history: false,
        }
    }

    pub fn client(cookie: u64, features: Features, limits: Limits) -> Session {
        Session::new(true, cookie, features, limits)
    }

    pub fn server(cookie: u64, features: Features, limits: Limits) -> Session {
        Session::new(false, cookie, features, limits)
    }

    pub fn is_open(&self) -> bool {
        self.state == State::Open
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Messages sent and not yet acknowledged.
    pub fn unacked(&self) -> usize {
        self.unacked.len()
    }

    pub fn last_received(&self) -> u64 {
        self.in_seq
    }

    /// The connection is gone: keep everything unacked for the next one.
    pub fn disconnected(&mut self) {
        self.state = State::Disconnected;
    }

    /// Client: a new connection; writes banner and hello.
    pub fn connect(&mut self, out: &mut Vec<u8>) {
        assert!(self.client, "connect() is the client's");
        write_banner(out, self.features, &self.limits);
        let fields: [&[u8]; 2] = [&self.cookie.to_le_bytes(), &self.in_seq.to_le_bytes()];
        write_msg(out, tag::HELLO, &self.limits, &fields);
        self.state = State::AwaitReply { banner: false };
    }

    /// Server: the client of a new connection said `hello` for this session; writes
    /// the reply and resends what the client has not received.
    pub fn attach(
        &mut self,
        hello: &Hello,
        out: &mut Vec<u8>,
    ) -> Result<Event<'static>, SessionError> {
        assert!(!self.client, "attach() is the server's");
        assert_eq!(hello.cookie, self.cookie, "attached to another session");
        self.negotiated = hello.features;
        let fresh = !self.history;
        let fields: [&[u8]; 2] = [&self.in_seq.to_le_bytes(), &u64::from(fresh).to_le_bytes()];
        write_msg(out, tag::HELLO_REPLY, &self.limits, &fields);
        if !fresh {
            // A fresh session sent nothing, so the client's position (from a session
            // this server forgot) says nothing about it.
            self.peer_acked(hello.peer_in_seq)?;
        }
        self.history = true;
        self.resend();
        self.state = State::Open;
        Ok(Event::Ready { features: self.negotiated })
    }

    fn peer_acked(&mut self, acked: u64) -> Result<(), SessionError> {
        if acked > self.out_seq {
            return Err(SessionError::AckAhead { acked, sent: self.out_seq });
        }
        self.acked = self.acked.max(acked);
        while let Some(&(seq, off, len)) = self.unacked.front() {
            if seq > self.acked {
                break;
            }
            debug_assert_eq!(off, self.replay_head);
            self.replay_head = off + len;
            self.unacked.pop_front();
        }
        // Acked on an open connection means sent; otherwise (a hello after a cut) the
        // resend starts at the head anyway.
        self.sent = self.sent.max(self.replay_head);
        if self.unacked.is_empty() {
            debug_assert_eq!(self.sent, self.replay.len(), "acked more than was sent");
            self.replay.clear();
            self.replay_head = 0;
            self.sent = 0;
        } else if self.replay_head > (64 << 10) && self.replay_head * 2 > self.replay.len() {
            let shift = self.replay_head;
            self.replay.drain(..shift);
            for u in &mut self.unacked {
                u.1 -= shift;
            }
            self.replay_head = 0;
            self.sent -= shift;
        }
        Ok(())
    }

    /// Client: the server forgot this session. Start a new one: nothing received,
    /// and every unacknowledged message renumbered from 1 (the server expects 1).
    fn renumber(&mut self) -> Result<(), SessionError> {
        let old = std::mem::take(&mut self.replay);
        let unacked = std::mem::take(&mut self.unacked);
        self.replay_head = 0;
        self.sent = 0;
        self.out_seq = 0;
        self.acked = 0;
        self.in_seq = 0;
        self.ack_pending = false;
        for (_, off, len) in unacked {
            let Decoded::Frame { frame: f, .. } =
                frame::decode(&old[off..off + len], &self.limits)?
            else {
                unreachable!("the replay buffer holds whole frames we encoded");
            };
            let (_, _, msg_type) = message_header(&f)?;
            self.enqueue(msg_type, &[payload(&f)])?;
        }
        Ok(())
    }

    /// A new connection gets everything unacknowledged.
    fn resend(&mut self) {
        self.sent = self.replay_head;
    }

    /// Queues a message whose payload is `parts` back to back (one copy, into the replay
    /// buffer; the caller's buffers are not kept). It goes out with [`Self::unsent`] on
    /// this connection or the next. Returns its sequence number.
    pub fn send(&mut self, msg_type: u16, parts: &[&[u8]]) -> Result<u64, SessionError> {
        let (seq, _, _) = self.enqueue(msg_type, parts)?;
        if self.state == State::Open {
            self.ack_pending = false; // the header carries our ack
            self.acks_owed = 0;
        }
        Ok(seq)
    }

    /// Message bytes this connection has not been given yet (empty unless open). Write
    /// them after the control output, then report with [`Self::mark_sent`].
    pub fn unsent(&self) -> &[u8] {
        if self.state == State::Open { &self.replay[self.sent..] } else { &[] }
    }

    /// If the connection took part of a message frame, the bytes left of that frame:
    /// they must go out before any control frame.
    pub fn unsent_in_frame(&self) -> usize {
        if self.state != State::Open || self.sent == self.replay.len() {
            return 0;
        }
        // The first unacked frame ending after `sent`.
        let i = self.unacked.partition_point(|&(_, off, len)| off + len <= self.sent);
        let (_, off, len) = self.unacked[i];
        if off == self.sent { 0 } else { off + len - self.sent }
    }

    /// The connection took `n` more bytes of [`Self::unsent`].
    pub fn mark_sent(&mut self, n: usize) {
        assert!(n <= self.unsent().len(), "marked {n} bytes sent of {}", self.unsent().len());
        self.sent += n;
    }

    /// Appends every unsent message byte to `out` (for owners that keep one output
    /// stream, such as tests; the TCP transport writes from the buffer instead).
    pub fn drain_into(&mut self, out: &mut Vec<u8>) {
        out.extend_from_slice(self.unsent());
        self.sent += self.unsent().len();
    }

    /// Encodes the next message into the replay buffer (where it stays until acked).
    /// Returns its sequence number and where it is in the buffer.
    fn enqueue(
        &mut self,
        msg_type: u16,
        parts: &[&[u8]],
    ) -> Result<(u64, usize, usize), SessionError> {
        let seq = self.out_seq + 1;
        // Session header: seq u64, our cumulative ack u64, message type u16.
        let mut hdr = [0u8; message::HEADER_BYTES + 18];
        hdr[..8].copy_from_slice(&message::header(VERSION, 1, 18));
        hdr[8..16].copy_from_slice(&seq.to_le_bytes());
        hdr[16..24].copy_from_slice(&self.in_seq.to_le_bytes());
        hdr[24..26].copy_from_slice(&msg_type.to_le_bytes());
        let off = self.replay.len();
        let len = frame::encode_parts(
            &mut self.replay,
            tag::MESSAGE,
            0,
            &[&[&hdr], parts],
            &self.limits,
        )?;
        self.out_seq = seq;
        self.unacked.push_back((seq, off, len));
        Ok((seq, off, len))
    }

    /// Writes an ack if messages were delivered since we last told the peer.
    pub fn flush_ack(&mut self, out: &mut Vec<u8>) {
        if self.ack_pending && self.state == State::Open {
            write_msg(out, tag::ACK, &self.limits, &[&self.in_seq.to_le_bytes()]);
            self.ack_pending = false;
            self.acks_owed = 0;
        }
    }

    /// Messages delivered that the peer has not heard we have (0: nothing to ack). Every
    /// message we send carries our position, so an owner may hold a separate ack back a
    /// little in the hope that a reply carries it (see `tcp::ACK_DELAY`).
    pub fn acks_owed(&self) -> u32 {
        if self.ack_pending && self.state == State::Open { self.acks_owed } else { 0 }
    }

    pub fn keepalive(&mut self, now_ns: u64, out: &mut Vec<u8>) {
        if self.state == State::Open {
            write_msg(out, tag::KEEPALIVE, &self.limits, &[&now_ns.to_le_bytes()]);
        }
    }

    /// Consumes the frames in `buf` (bytes of this connection after the handshake),
    /// calling `on` for each event; writes replies to `out`. Returns the bytes consumed
    /// (a partial frame at the end stays for the next call). An error means the
    /// connection must be closed; the session itself stays usable for the next one.
    pub fn receive<'a>(
        &mut self,
        buf: &'a [u8],
        out: &mut Vec<u8>,
        mut on: impl FnMut(Event<'a>),
    ) -> Result<usize, SessionError> {
        let mut at = 0;
        loop {
            let (f, len) = match frame::decode(&buf[at..], &self.limits)? {
                Decoded::NeedMore { .. } => return Ok(at),
                Decoded::Frame { frame, len } => (frame, len),
            };
            at += len;
            match (f.tag, self.state) {
                (tag::BANNER, State::AwaitReply { banner: false }) => {
                    self.negotiated = negotiate(self.features, &f)?;
                    self.state = State::AwaitReply { banner: true };
                }
                (tag::HELLO_REPLY, State::AwaitReply { banner: true }) => {
                    let mut d = body(&f)?;
                    let peer_in = d.u64().map_err(|_| SessionError::Truncated("reply"))?;
                    // Absent in a reply from before resets existed: not fresh.
                    let fresh = d.u64().unwrap_or(0) != 0;
                    let reset = fresh && self.history;
                    if reset {
                        self.renumber()?;
                    } else {
                        self.peer_acked(peer_in)?;
                    }
                    self.resend();
                    self.state = State::Open;
                    self.history = true;
                    on(Event::Ready { features: self.negotiated });
                    if reset {
                        on(Event::Reset { resent: self.unacked.len() });
                    }
                }
                (tag::MESSAGE, State::Open) => {
                    let (seq, ack, msg_type) = message_header(&f)?;
                    self.peer_acked(ack)?;
                    if seq <= self.in_seq {
                        continue; // a resend of what we already have
                    }
                    if seq != self.in_seq + 1 {
                        return Err(SessionError::Gap { have: self.in_seq, got: seq });
                    }
                    self.in_seq = seq;
                    self.ack_pending = true;
                    self.acks_owed += 1;
                    on(Event::Message { seq, msg_type, frame: f });
                }
                (tag::ACK, State::Open) => {
                    let a = body(&f)?.u64().map_err(|_| SessionError::Truncated("ack"))?;
                    self.peer_acked(a)?;
                }
                (tag::KEEPALIVE, State::Open) => {
                    let ts = body(&f)?.u64().map_err(|_| SessionError::Truncated("keepalive"))?;
                    write_msg(out, tag::KEEPALIVE_ACK, &self.limits, &[&ts.to_le_bytes()]);
                }
                (tag::KEEPALIVE_ACK, State::Open) => {
                    let ts = body(&f)?.u64().map_err(|_| SessionError::Truncated("keepalive"))?;
                    on(Event::KeepaliveAck { sent_ns: ts });
                }
                (t, st) => {
                    return Err(SessionError::Unexpected {
                        what: "session",
                        tag: t,
                        state: st.name(),
                    });
                }
            }
        }
    }
}
