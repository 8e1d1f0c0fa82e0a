//! The kernel TCP transport: non-blocking sockets polled by their owner (a reactor), with
//! batched reads and writes into buffers that are reused for the connection's life.
//!
//! [`Connection`] moves bytes; [`ClientConn`] and [`Server`] put sessions on top: a
//! client reconnects and its session replays what the server did not get; the server
//! keeps each client's session by cookie across connections, so a cut connection loses
//! and duplicates nothing.

use std::collections::HashMap;
use std::io::{self, IoSlice, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::time::{Duration, Instant};

use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};

use crate::auth_phase::{ClientAuthPhase, PhaseError, ServerAuthPhase};
use crate::frame::Limits;
use crate::secure::{Role, SecureChannel};
use crate::session::{Event, Features, Handshake, Session, SessionError};
use sluice_auth::handshake::Verified;
use sluice_auth::kdc::ServiceTicket;
use sluice_auth::{AuthTicket, RotatingSecrets, Service};

/// Largest read per poll of one connection (bounds the work one poll does).
const READ_CHUNK: usize = 256 << 10;

/// How long a separate ack is held back: every message carries the sender's position,
/// so the reply to a request usually acks it for free. A separate ack costs a send on
/// this side and a receive on the other (on loopback each runs the other side's TCP
/// receive path too).
pub const ACK_DELAY: Duration = Duration::from_micros(500);
/// ... but not past this many messages (the peer keeps them until acked).
pub const ACK_AFTER: u32 = 64;

/// A separate ack held back, per session: since when one is owed.
#[derive(Debug, Default)]
struct AckHold {
    since: Option<Instant>,
}

impl AckHold {
    /// Writes the ack into `out` if it is due (or now, with `force`); starts the wait
    /// when one becomes owed. The clock is read only while an ack is owed. Returns
    /// whether it is still held.
    fn ack_if_due(&mut self, session: &mut Session, out: &mut Vec<u8>, force: bool) -> bool {
        let owed = session.acks_owed();
        if owed == 0 {
            self.since = None;
            return false;
        }
        let now = Instant::now();
        let since = *self.since.get_or_insert(now);
        if force || owed >= ACK_AFTER || now.duration_since(since) >= ACK_DELAY {
            session.flush_ack(out);
            self.since = None;
            return false;
        }
        true
    }
}

#[derive(Debug)]
pub struct Connection {
    stream: TcpStream,
    /// Received bytes live in `inbuf[in_start..in_end]`.
    inbuf: Vec<u8>,
    in_start: usize,
    in_end: usize,
    /// The peer closed after bytes this read returned: the next read reports it.
    eof: bool,
    out: Vec<u8>,
    out_pos: usize,
    /// Secure mode, once started: the stream is sealed records from then on.
    secure: Option<Box<Secure>>,
}

/// A connection's secure-mode state ([`crate::secure`]).
#[derive(Debug)]
struct Secure {
    chan: SecureChannel,
    /// Opened plaintext: `plain[plain_start..]` is the connection's input (the
    /// connection's `inbuf` holds the ciphertext not opened yet, a partial record).
    plain: Vec<u8>,
    plain_start: usize,
    /// Bytes for the socket: sealed records (and first, whatever plaintext was queued
    /// before the switch).
    sealed: Vec<u8>,
    sealed_pos: usize,
}

/// How much sealed output a connection prepares ahead of the socket.
const SEAL_AHEAD: usize = 1 << 20;

impl Connection {
    pub fn new(stream: TcpStream) -> io::Result<Connection> {
        stream.set_nonblocking(true)?;
        stream.set_nodelay(true)?;
        Ok(Connection {
            stream,
            inbuf: vec![0; 64 << 10],
            in_start: 0,
            in_end: 0,
            eof: false,
            out: Vec::with_capacity(64 << 10),
            out_pos: 0,
            secure: None,
        })
    }

    /// Switches to secure mode: every byte after this point, both ways, is sealed with
    /// `chan`'s keys. Call it exactly where the peer switches (after the handshake frame
    /// that agreed on the secret): bytes already received past that point are treated
    /// as records, output queued before it goes out as it is.
    pub fn start_secure(&mut self, chan: SecureChannel) -> io::Result<()> {
        assert!(self.secure.is_none(), "secure mode started twice");
        let sealed = self.out[self.out_pos..].to_vec();
        self.out.clear();
        self.out_pos = 0;
        self.secure = Some(Box::new(Secure {
            chan,
            plain: Vec::new(),
            plain_start: 0,
            sealed,
            sealed_pos: 0,
        }));
        // What arrived past the switch is records.
        self.open_records()?;
        Ok(())
    }

    pub fn is_secure(&self) -> bool {
        self.secure.is_some()
    }

    pub fn peer(&self) -> io::Result<SocketAddr> {
        self.stream.peer_addr()
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.stream.as_fd()
    }

    /// Control bytes are queued that the socket did not take yet.
    pub fn wants_write(&self) -> bool {
        self.out_pos < self.out.len()
            || self.secure.as_ref().is_some_and(|s| s.sealed_pos < s.sealed.len())
    }

    /// Bytes are queued, control or `session`'s messages, that the socket did not take.
    pub fn wants_write_with(&self, session: &Session) -> bool {
        self.wants_write() || !session.unsent().is_empty()
    }

    /// Reads what the socket has (up to a bound). `Ok(0)`: nothing now. End of stream is
    /// an error (the connection is over). The buffer is zeroed once when it grows, never
    /// per read.
    pub fn read_some(&mut self) -> io::Result<usize> {
        if self.eof {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "peer closed"));
        }
        let n = self.fill()?;
        self.open_records()?;
        Ok(n)
    }

    /// In secure mode, opens the complete records received into the plaintext input.
    fn open_records(&mut self) -> io::Result<()> {
        let Some(sec) = self.secure.as_mut() else { return Ok(()) };
        if sec.plain_start > 0 && sec.plain_start * 2 >= sec.plain.len() {
            sec.plain.drain(..sec.plain_start);
            sec.plain_start = 0;
        }
        let used = sec.chan.open(&mut self.inbuf[self.in_start..self.in_end], &mut sec.plain)?;
        self.in_start += used;
        Ok(())
    }

    /// Reads what the socket has into `inbuf` (the input in crc mode, the records in
    /// secure mode).
    fn fill(&mut self) -> io::Result<usize> {
        if self.in_start == self.in_end {
            self.in_start = 0;
            self.in_end = 0;
        }
        let mut total = 0;
        while total < READ_CHUNK {
            if self.inbuf.len() - self.in_end < (16 << 10) {
                if self.in_start > 0 {
                    self.inbuf.copy_within(self.in_start..self.in_end, 0);
                    self.in_end -= self.in_start;
                    self.in_start = 0;
                }
                if self.inbuf.len() - self.in_end < (16 << 10) {
                    let grow = self.inbuf.len().max(64 << 10);
                    self.inbuf.resize(self.inbuf.len() + grow, 0);
                }
            }
            match self.stream.read(&mut self.inbuf[self.in_end..]) {
                Ok(0) if total == 0 => {
                    return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "peer closed"));
                }
                Ok(0) => {
                    // Hand out what came before the end first; report it next time.
                    self.eof = true;
                    break;
                }
                Ok(n) => {
                    self.in_end += n;
                    total += n;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(total)
    }

    /// Bytes received and not yet consumed.
    pub fn input(&self) -> &[u8] {
        match &self.secure {
            Some(s) => &s.plain[s.plain_start..],
            None => &self.inbuf[self.in_start..self.in_end],
        }
    }

    pub fn consume(&mut self, n: usize) {
        assert!(n <= self.input().len(), "consumed more than was read");
        match &mut self.secure {
            Some(s) => {
                s.plain_start += n;
                if s.plain_start == s.plain.len() {
                    s.plain.clear();
                    s.plain_start = 0;
                }
            }
            None => self.in_start += n,
        }
    }

    /// Where to append bytes to send.
    pub fn out(&mut self) -> &mut Vec<u8> {
        &mut self.out
    }

    /// Writes the control output, then `session`'s unsent messages straight from its
    /// replay buffer (one `writev` for both; no copy into `out`), as far as the socket
    /// takes them. A message frame the socket took part of is finished before any
    /// control byte. `Ok(true)`: everything queued is written.
    pub fn flush_with(&mut self, session: &mut Session) -> io::Result<bool> {
        self.write_queued(Some(session))
    }

    /// Writes the control output only (a connection with no session yet). `Ok(true)`:
    /// everything queued is written.
    pub fn flush(&mut self) -> io::Result<bool> {
        self.write_queued(None)
    }

    fn write_queued(&mut self, session: Option<&mut Session>) -> io::Result<bool> {
        if self.secure.is_some() {
            return self.write_secure(session);
        }
        self.write_plain(session)
    }

    /// Secure mode's write: seals the control output and the session's messages (a
    /// message frame cut by [`SEAL_AHEAD`] is finished before any control byte, as in
    /// [`Self::write_plain`]), then writes the records.
    fn write_secure(&mut self, mut session: Option<&mut Session>) -> io::Result<bool> {
        let sec = self.secure.as_mut().expect("secure mode");
        loop {
            if sec.sealed_pos == sec.sealed.len() {
                sec.sealed.clear();
                sec.sealed_pos = 0;
            }
            if sec.sealed.len() - sec.sealed_pos < SEAL_AHEAD {
                let rest = session.as_deref().map_or(0, |s| s.unsent_in_frame());
                if rest == 0 && self.out_pos < self.out.len() {
                    sec.chan.seal(&self.out[self.out_pos..], &mut sec.sealed)?;
                    self.out.clear();
                    self.out_pos = 0;
                }
                if let Some(s) = session.as_deref_mut() {
                    let unsent = s.unsent();
                    let n = if rest > 0 { rest } else { unsent.len().min(SEAL_AHEAD) };
                    if n > 0 {
                        sec.chan.seal(&unsent[..n], &mut sec.sealed)?;
                        s.mark_sent(n);
                    }
                }
            }
            if sec.sealed_pos == sec.sealed.len() {
                return Ok(true);
            }
            match self.stream.write(&sec.sealed[sec.sealed_pos..]) {
                Ok(0) => return Err(io::Error::new(io::ErrorKind::WriteZero, "socket closed")),
                Ok(n) => sec.sealed_pos += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    fn write_plain(&mut self, mut session: Option<&mut Session>) -> io::Result<bool> {
        loop {
            let (rest, unsent) = match session.as_deref() {
                Some(s) => (s.unsent_in_frame(), s.unsent()),
                None => (0, &[][..]),
            };
            let (a, b): (&[u8], &[u8]) =
                if rest > 0 { (&[], &unsent[..rest]) } else { (&self.out[self.out_pos..], unsent) };
            if a.is_empty() && b.is_empty() {
                break;
            }
            let a_len = a.len();
            let r = match (a.is_empty(), b.is_empty()) {
                (false, true) => self.stream.write(a),
                (true, false) => self.stream.write(b),
                _ => self.stream.write_vectored(&[IoSlice::new(a), IoSlice::new(b)]),
            };
            match r {
                Ok(0) => return Err(io::Error::new(io::ErrorKind::WriteZero, "socket closed")),
                Ok(n) => {
                    let from_a = n.min(a_len);
                    self.out_pos += from_a;
                    if let Some(s) = session.as_deref_mut() {
                        s.mark_sent(n - from_a);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        self.out.clear();
        self.out_pos = 0;
        Ok(true)
    }

    /// Breaks the connection (both directions), as a failure would.
    pub fn shutdown(&self) {
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
    }
}

/// Why a connection was closed: logged by the owner, which keeps serving the others.
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    #[error("i/o: {0}")]
    Io(#[from] io::Error),
    #[error("protocol: {0}")]
    Protocol(#[from] SessionError),
    #[error("{0}")]
    Auth(#[from] PhaseError),
}

/// A client's session over a connection it re-establishes after a cut.
#[derive(Debug)]
pub struct ClientConn {
    pub session: Session,
    addr: SocketAddr,
    conn: Option<Connection>,
    ack: AckHold,
    /// The ticket each new connection authenticates with (`None`: no authentication).
    ticket: Option<ServiceTicket>,
    /// The current connection's authentication, until the server proved itself.
    phase: Option<ClientAuthPhase>,
    /// The local address non-blocking connects bind to first (`None`: the kernel's
    /// choice).
    local_ip: Option<std::net::IpAddr>,
}

impl ClientConn {
    pub fn new(addr: SocketAddr, cookie: u64, features: Features, limits: Limits) -> ClientConn {
        ClientConn {
            session: Session::client(cookie, features, limits),
            addr,
            conn: None,
            ack: AckHold::default(),
            ticket: None,
            phase: None,
            local_ip: None,
        }
    }

    /// Connect from `ip` (one of this machine's addresses) instead of the address the
    /// kernel picks, with [`Self::connect_nonblocking`]: for a host with several
    /// addresses whose traffic must leave from one of them.
    pub fn set_local_ip(&mut self, ip: Option<std::net::IpAddr>) {
        self.local_ip = ip;
    }

    /// Authenticate every new connection with `ticket` (a renewed ticket replaces the
    /// old one; the current connection keeps going).
    pub fn set_ticket(&mut self, ticket: Option<ServiceTicket>) {
        self.ticket = ticket;
    }

    /// Whether the current connection is authenticated and in secure mode.
    pub fn is_secure(&self) -> bool {
        self.conn.as_ref().is_some_and(|c| c.is_secure())
    }

    pub fn connected(&self) -> bool {
        self.conn.is_some()
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The socket, to wait on (readable; writable too when [`Self::wants_write`]).
    pub fn fd(&self) -> Option<BorrowedFd<'_>> {
        self.conn.as_ref().map(|c| c.fd())
    }

    pub fn wants_write(&self) -> bool {
        self.conn.as_ref().is_some_and(|c| c.wants_write_with(&self.session))
    }

    /// Connects (blocking connect, bounded by `timeout`, then non-blocking) and starts
    /// the handshake.
    pub fn connect(&mut self) -> io::Result<()> {
        self.connect_timeout(Duration::from_secs(5))
    }

    pub fn connect_timeout(&mut self, timeout: Duration) -> io::Result<()> {
        self.start(TcpStream::connect_timeout(&self.addr, timeout)?)
    }

    /// Starts connecting without waiting (for a reactor, which must never block): the
    /// handshake is queued and goes out once the socket connects; a refused or failed
    /// connection shows as an error of a later [`Self::poll`].
    pub fn connect_nonblocking(&mut self) -> io::Result<()> {
        use nix::sys::socket::{self, AddressFamily, SockFlag, SockType, SockaddrStorage};
        let family = match self.addr {
            SocketAddr::V4(_) => AddressFamily::Inet,
            SocketAddr::V6(_) => AddressFamily::Inet6,
        };
        let flags = SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC;
        let fd = socket::socket(family, SockType::Stream, flags, None).map_err(io::Error::from)?;
        if let Some(ip) = self.local_ip {
            let local = SockaddrStorage::from(SocketAddr::new(ip, 0));
            socket::bind(fd.as_raw_fd(), &local).map_err(io::Error::from)?;
        }
        match socket::connect(fd.as_raw_fd(), &SockaddrStorage::from(self.addr)) {
            Ok(()) | Err(nix::errno::Errno::EINPROGRESS) => {}
            Err(e) => return Err(e.into()),
        }
        self.start(TcpStream::from(fd))
    }

    fn start(&mut self, stream: TcpStream) -> io::Result<()> {
        let mut c = Connection::new(stream)?;
        match &self.ticket {
            // The session handshake follows once the server proved itself.
            Some(t) => {
                self.phase = Some(ClientAuthPhase::start(t, c.out(), &self.session.limits()))
            }
            None => self.session.connect(c.out()),
        }
        self.conn = Some(c);
        Ok(())
    }

    /// Sends a message (queued while disconnected; resent after a reconnect). It goes
    /// out at the next [`Self::poll`].
    pub fn send(&mut self, msg_type: u16, payload: &[u8]) -> Result<u64, SessionError> {
        self.session.send(msg_type, &[payload])
    }

    /// [`Self::send`] with the payload given as pieces laid back to back.
    pub fn send_parts(&mut self, msg_type: u16, parts: &[&[u8]]) -> Result<u64, SessionError> {
        self.session.send(msg_type, parts)
    }

    /// Reads, handles and writes what is ready. On an error the connection is dropped
    /// (the session keeps what must be resent) and the error returned.
    pub fn poll(&mut self, mut on: impl FnMut(Event<'_>)) -> Result<(), ConnError> {
        let Some(c) = &mut self.conn else { return Ok(()) };
        let limits = self.session.limits();
        let r = (|| -> Result<(), ConnError> {
            c.read_some()?;
            if let Some(p) = &mut self.phase {
                let mut out = std::mem::take(c.out());
                let r = p.receive(c.input(), &mut out, &limits);
                *c.out() = out;
                let (used, done) = r?;
                c.consume(used);
                let Some((secret, secure)) = done else {
                    c.flush()?;
                    return Ok(());
                };
                self.phase = None;
                if secure {
                    c.start_secure(SecureChannel::new(secret.as_bytes(), Role::Client))?;
                }
                self.session.connect(c.out());
            }
            let mut out = std::mem::take(c.out());
            let used = self.session.receive(c.input(), &mut out, &mut on);
            *c.out() = out;
            c.consume(used?);
            self.ack.ack_if_due(&mut self.session, c.out(), false);
            c.flush_with(&mut self.session)?;
            Ok(())
        })();
        if r.is_err() {
            self.conn = None;
            self.phase = None;
            self.session.disconnected();
        }
        r
    }

    /// Sends an ack held back ([`ACK_DELAY`]) now: call it before sleeping longer.
    pub fn flush_acks(&mut self) {
        let Some(c) = &mut self.conn else { return };
        if self.session.acks_owed() > 0 {
            self.ack.ack_if_due(&mut self.session, c.out(), true);
            // An error shows at the next poll.
            let _ = c.flush_with(&mut self.session);
        }
    }

    /// Breaks the current connection (for tests and failure injection).
    pub fn cut(&mut self) {
        if let Some(c) = self.conn.take() {
            c.shutdown();
        }
        self.phase = None;
        self.session.disconnected();
    }
}

/// A client's session and its current connection, if any.
struct Client {
    session: Session,
    conn: Option<Connection>,
    /// The connection's epoll token.
    conn_id: u64,
    /// Serve the connection in the next poll whether or not the socket is ready (it was
    /// just attached: the hello reply and resends to write, bytes after the hello to read).
    pending: bool,
    /// Whether the connection is registered for writability too.
    armed_out: bool,
    /// When the connection went away (for expiry).
    idle_since: Option<Instant>,
    ack: AckHold,
    /// Who authenticated the session (with authentication on): every later connection
    /// of the session must be the same entity.
    peer: Option<Box<Verified>>,
}

/// A connection whose client has not said which session it is yet.
struct Pending {
    stage: Stage,
    conn: Connection,
    /// Its epoll token.
    id: u64,
}

enum Stage {
    /// Proving who the client is (a server with authentication on).
    Auth(ServerAuthPhase),
    /// Banner and hello; `peer` is who authenticated, if anyone.
    Session { hs: Handshake, peer: Option<Box<Verified>> },
}

/// Authentication a server requires of every connection.
#[derive(Debug, Clone)]
pub struct ServerAuth {
    /// The service its tickets must be for.
    pub service: Service,
    /// The service's rotating secrets (updated with [`Server::update_secrets`]).
    pub secrets: RotatingSecrets,
    /// Connections continue in secure mode.
    pub secure: bool,
}

/// A server: a listener and its connections; sessions by client cookie survive cuts.
///
/// Its sockets are registered in an epoll set of its own, whose fd ([`Server::fd`])
/// becomes readable when any of them has something: the owner's reactor sleeps on it.
/// Each poll asks that set what is ready (one `epoll_wait` with a zero timeout) and
/// touches only those sockets: no `accept` or `recv` per idle socket per pass (an
/// `accept` that finds nothing still allocates and frees a socket in the kernel).
pub struct Server {
    listener: TcpListener,
    epoll: Epoll,
    features: Features,
    limits: Limits,
    /// Connections whose client has not said who it is yet.
    handshaking: Vec<Pending>,
    auth: Option<ServerAuth>,
    clients: HashMap<u64, Client>,
    /// The next connection token (the listener's is [`LISTENER`]).
    next_id: u64,
    /// Scratch for `epoll_wait`, and the tokens it reported, sorted.
    events: Vec<EpollEvent>,
    ready: Vec<u64>,
    /// Clients owed an ack that is being held back, oldest first.
    owing: Vec<u64>,
}

/// The listener's epoll token.
const LISTENER: u64 = 0;

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("addr", &self.listener.local_addr().ok())
            .field("connections", &self.connections())
            .field("sessions", &self.clients.len())
            .finish()
    }
}

/// What the server's owner hears.
#[derive(Debug)]
pub enum ServerEvent<'a> {
    Message {
        cookie: u64,
        seq: u64,
        msg_type: u16,
        payload: &'a [u8],
        /// Who sent it (with authentication on): the verified ticket the session was
        /// opened with, caps included. The owner checks its expiry (`expires_ms`).
        peer: Option<&'a AuthTicket>,
    },
    /// A connection closed, and why (the server keeps serving the others).
    Closed { peer: Option<SocketAddr>, reason: String },
}

impl Server {
    pub fn bind(addr: SocketAddr, features: Features, limits: Limits) -> io::Result<Server> {
        Server::from_listener(TcpListener::bind(addr)?, features, limits)
    }

    /// Serves on a listener bound earlier (its port may already be published).
    pub fn from_listener(
        listener: TcpListener,
        features: Features,
        limits: Limits,
    ) -> io::Result<Server> {
        listener.set_nonblocking(true)?;
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?;
        epoll.add(&listener, EpollEvent::new(EpollFlags::EPOLLIN, LISTENER))?;
        Ok(Server {
            listener,
            epoll,
            features,
            limits,
            handshaking: Vec::new(),
            clients: HashMap::new(),
            next_id: LISTENER + 1,
            events: vec![EpollEvent::empty(); 256],
            ready: Vec::new(),
            owing: Vec::new(),
            auth: None,
        })
    }

    /// Requires authentication of every new connection (`None`: none). Connections
    /// already attached keep going.
    pub fn set_auth(&mut self, auth: Option<ServerAuth>) {
        self.auth = auth;
    }

    /// Whether new connections must authenticate.
    pub fn has_auth(&self) -> bool {
        self.auth.is_some()
    }

    /// New rotating secrets fetched from the monitors.
    pub fn update_secrets(&mut self, secrets: RotatingSecrets) {
        if let Some(a) = &mut self.auth {
            a.secrets = secrets;
        }
    }

    /// The verified ticket of a session's client (with authentication on): its identity
    /// and its caps at this service, to check every op against. `None` once the ticket
    /// expired at `now_ms` (the client must reconnect with a renewed one).
    pub fn peer(&self, cookie: u64, now_ms: u64) -> Option<&AuthTicket> {
        let t = &self.clients.get(&cookie)?.peer.as_ref()?.ticket;
        (now_ms < t.expires_ms).then_some(t)
    }

    /// Readable when a socket of this server has something to do (for parking).
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.epoll.0.as_fd()
    }

    /// Sessions (connected or waiting for their client to come back).
    pub fn sessions(&self) -> usize {
        self.clients.len()
    }

    /// Forgets sessions whose client has been gone longer than `max_idle`: a client
    /// that comes back later gets a fresh session (and resends, see
    /// [`Event::Reset`](crate::session::Event::Reset)). Returns how many were dropped.
    pub fn expire_idle(&mut self, now: Instant, max_idle: Duration) -> usize {
        let before = self.clients.len();
        self.clients.retain(|_, c| {
            c.conn.is_some() || c.idle_since.is_none_or(|t| now.duration_since(t) < max_idle)
        });
        before - self.clients.len()
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    pub fn connections(&self) -> usize {
        self.handshaking.len() + self.clients.values().filter(|c| c.conn.is_some()).count()
    }

    /// Sends to a client's session (delivered on its current or next connection; it goes
    /// out at the next [`Self::flush`] or [`Self::poll`]).
    pub fn send(&mut self, cookie: u64, msg_type: u16, payload: &[u8]) -> Option<u64> {
        self.send_parts(cookie, msg_type, &[payload])
    }

    /// [`Self::send`] with the payload given as pieces laid back to back.
    pub fn send_parts(&mut self, cookie: u64, msg_type: u16, parts: &[&[u8]]) -> Option<u64> {
        self.clients.get_mut(&cookie)?.session.send(msg_type, parts).ok()
    }

    /// Accepts, reads, handles and writes whatever is ready. Returns whether anything
    /// happened.
    pub fn poll(&mut self, mut on: impl FnMut(ServerEvent<'_>)) -> bool {
        let mut busy = false;
        self.ready.clear();
        // Level-triggered: what does not fit in `events` is reported again next time.
        if let Ok(n) = self.epoll.wait(&mut self.events, EpollTimeout::ZERO) {
            self.ready.extend(self.events[..n].iter().map(|e| e.data()));
            self.ready.sort_unstable();
        }
        let ready = |ready: &[u64], id: u64| ready.binary_search(&id).is_ok();
        let first_new = self.next_id;
        if ready(&self.ready, LISTENER) {
            busy |= self.accept(&mut on);
        }
        let mut i = 0;
        while i < self.handshaking.len() {
            let p = &mut self.handshaking[i];
            // New connections are handled at once: the banner goes out.
            if !ready(&self.ready, p.id) && p.id < first_new {
                i += 1;
                continue;
            }
            match handshake(p, self.auth.as_ref(), self.features, self.limits) {
                Ok((b, None)) => {
                    busy |= b;
                    i += 1;
                }
                Ok((_, Some(hello))) => {
                    busy = true;
                    let p = self.handshaking.swap_remove(i);
                    let Stage::Session { peer, .. } = p.stage else {
                        unreachable!("a hello comes in the session stage")
                    };
                    self.attach(hello, peer, p.conn, p.id, &mut on);
                }
                Err(e) => {
                    busy = true;
                    let p = self.handshaking.swap_remove(i);
                    close(p.conn, e, &mut on);
                }
            }
        }
        let now = Instant::now();
        for (&cookie, c) in self.clients.iter_mut() {
            let Some(conn) = &mut c.conn else { continue };
            if !c.pending && !ready(&self.ready, c.conn_id) {
                continue;
            }
            c.pending = false;
            let peer = c.peer.as_deref().map(|v| &v.ticket);
            match serve(cookie, &mut c.session, conn, peer, &mut on) {
                Ok(b) => {
                    busy |= b;
                    // Held back for a reply to carry it (`send_due_acks`).
                    if c.ack.since.is_none() && c.session.acks_owed() > 0 {
                        c.ack.since = Some(now);
                        self.owing.push(cookie);
                    }
                    arm(&self.epoll, c);
                }
                Err(e) => {
                    busy = true;
                    c.session.disconnected();
                    c.idle_since = Some(now);
                    close(c.conn.take().expect("just polled"), e, &mut on);
                }
            }
        }
        busy |= self.send_due_acks(false);
        busy
    }

    /// Sends the acks held back longer than [`ACK_DELAY`] (all of them with `force`, e.g.
    /// before the owner sleeps) unless a message carried them meanwhile. Returns whether
    /// it wrote any.
    fn send_due_acks(&mut self, force: bool) -> bool {
        let mut wrote = false;
        let clients = &mut self.clients;
        let epoll = &self.epoll;
        self.owing.retain(|cookie| {
            let Some(c) = clients.get_mut(cookie) else { return false };
            let Some(conn) = &mut c.conn else {
                c.ack = AckHold::default();
                return false;
            };
            let before = conn.out().len();
            let held = c.ack.ack_if_due(&mut c.session, conn.out(), force);
            if conn.out().len() > before {
                wrote = true;
                // An error shows again (and is reported) at the next read.
                let _ = conn.flush_with(&mut c.session);
                arm(epoll, c);
            }
            held
        });
        wrote
    }

    /// Sends every ack held back (before the owner sleeps).
    pub fn flush_acks(&mut self) -> bool {
        self.send_due_acks(true)
    }

    /// Accepts every waiting connection; each starts its handshake (our banner).
    fn accept(&mut self, on: &mut impl FnMut(ServerEvent<'_>)) -> bool {
        let mut busy = false;
        loop {
            match self.listener.accept() {
                Ok((s, _)) => match Connection::new(s) {
                    Ok(mut conn) => {
                        // With authentication the banner waits until the client proved
                        // itself (and goes out sealed in secure mode).
                        let stage = match &self.auth {
                            Some(a) => Stage::Auth(ServerAuthPhase::new(a.service, a.secure)),
                            None => Stage::Session {
                                hs: Handshake::new(self.features, self.limits, conn.out()),
                                peer: None,
                            },
                        };
                        let id = self.next_id;
                        self.next_id += 1;
                        let ev = EpollEvent::new(EpollFlags::EPOLLIN, id);
                        if let Err(e) = self.epoll.add(conn.fd(), ev) {
                            close(conn, ConnError::Io(e.into()), on);
                            continue;
                        }
                        self.handshaking.push(Pending { stage, conn, id });
                        busy = true;
                    }
                    Err(e) => on(ServerEvent::Closed { peer: None, reason: e.to_string() }),
                },
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return busy,
                Err(e) => {
                    on(ServerEvent::Closed { peer: None, reason: format!("accept: {e}") });
                    return busy;
                }
            }
        }
    }

    /// Drops a client's connection and its session (it sent something unacceptable;
    /// the caller logs why). Returns whether the session existed.
    pub fn kick(&mut self, cookie: u64) -> bool {
        let Some(c) = self.clients.remove(&cookie) else { return false };
        if let Some(conn) = c.conn {
            conn.shutdown();
        }
        true
    }

    /// Writes what sessions queued since the last poll (replies sent outside `poll`),
    /// without reading. Returns whether anything was written.
    pub fn flush(&mut self) -> bool {
        let mut wrote = false;
        for c in self.clients.values_mut() {
            if let Some(conn) = &mut c.conn
                && conn.wants_write_with(&c.session)
            {
                wrote = true;
                // An error shows again (and is reported) at the next read; what the
                // socket did not take waits for writability.
                let _ = conn.flush_with(&mut c.session);
                arm(&self.epoll, c);
            }
        }
        wrote
    }

    /// The client of `conn` said which session it is: attach the connection to it. A
    /// connection the session still had (the client reconnected before we noticed the
    /// old one died) is closed without touching the session.
    fn attach(
        &mut self,
        hello: crate::session::Hello,
        peer: Option<Box<Verified>>,
        mut conn: Connection,
        conn_id: u64,
        on: &mut impl FnMut(ServerEvent<'_>),
    ) {
        let (features, limits) = (self.features, self.limits);
        if let Some(c) = self.clients.get(&hello.cookie) {
            // A session is its entity's: another one (or an unauthenticated connection,
            // or an authenticated one for a session made without authentication) cannot
            // take it over by its cookie.
            let name = |p: &Option<Box<Verified>>| {
                p.as_ref().map_or("an unauthenticated client".to_string(), |v| {
                    v.ticket.entity.to_string()
                })
            };
            let same = match (&c.peer, &peer) {
                (None, None) => true,
                (Some(old), Some(new)) => old.ticket.entity == new.ticket.entity,
                _ => false,
            };
            if !same {
                let e = io::Error::new(
                    io::ErrorKind::PermissionDenied,
                    format!("{} tried to attach to a session of {}", name(&peer), name(&c.peer)),
                );
                close(conn, ConnError::Io(e), on);
                return;
            }
        }
        let c = self.clients.entry(hello.cookie).or_insert_with(|| Client {
            session: Session::server(hello.cookie, features, limits),
            conn: None,
            conn_id,
            pending: false,
            armed_out: false,
            idle_since: None,
            ack: AckHold::default(),
            peer: None,
        });
        // The latest verification (a renewed ticket may carry changed caps).
        c.peer = peer;
        if let Some(old) = c.conn.take() {
            let e = io::Error::other("replaced by a newer connection of the same session");
            close(old, ConnError::Io(e), on);
        }
        c.session.disconnected();
        c.conn_id = conn_id;
        c.pending = true;
        c.armed_out = false;
        c.idle_since = None;
        match c.session.attach(&hello, conn.out()) {
            Ok(_) => c.conn = Some(conn),
            Err(e) => {
                c.idle_since = Some(Instant::now());
                close(conn, e.into(), on)
            }
        }
    }
}

/// Registers a client's connection for writability exactly while output is queued.
fn arm(epoll: &Epoll, c: &mut Client) {
    let Some(conn) = &c.conn else { return };
    let want = conn.wants_write_with(&c.session);
    if want != c.armed_out {
        let mut flags = EpollFlags::EPOLLIN;
        if want {
            flags |= EpollFlags::EPOLLOUT;
        }
        let mut ev = EpollEvent::new(flags, c.conn_id);
        // Cannot fail for a registered, open socket; if it did, the connection would
        // be served on its next readable event instead.
        let _ = epoll.modify(conn.fd(), &mut ev);
        c.armed_out = want;
    }
}

fn close(conn: Connection, e: ConnError, on: &mut impl FnMut(ServerEvent<'_>)) {
    conn.shutdown();
    on(ServerEvent::Closed { peer: conn.peer().ok(), reason: e.to_string() });
}

/// Reads and handles a connection's handshake; returns whether bytes arrived and the
/// client's hello once it is in (bytes after it stay for the session).
fn handshake(
    p: &mut Pending,
    auth: Option<&ServerAuth>,
    features: Features,
    limits: Limits,
) -> Result<(bool, Option<crate::session::Hello>), ConnError> {
    let conn = &mut p.conn;
    let n = conn.read_some()?;
    if let Stage::Auth(phase) = &mut p.stage {
        let Some(a) = auth else {
            // Authentication was turned off while this connection was proving itself.
            let e = io::Error::other("authentication was turned off during the handshake");
            return Err(ConnError::Io(e));
        };
        let mut out = std::mem::take(conn.out());
        let r = phase.receive(
            conn.input(),
            &mut out,
            &a.secrets,
            crate::auth_phase::wall_ms(),
            &limits,
        );
        *conn.out() = out;
        let (used, done) = r?;
        conn.consume(used);
        let Some(peer) = done else {
            conn.flush()?;
            return Ok((n > 0, None));
        };
        // The reply that ends the phase goes out as it is; what follows is sealed.
        if a.secure {
            conn.start_secure(SecureChannel::new(peer.connection_secret.as_bytes(), Role::Server))?;
        }
        let hs = Handshake::new(features, limits, conn.out());
        p.stage = Stage::Session { hs, peer: Some(peer) };
    }
    let Stage::Session { hs, .. } = &mut p.stage else { unreachable!("set above") };
    let (used, hello) = hs.receive(conn.input())?;
    conn.consume(used);
    conn.flush()?;
    Ok((n > 0, hello))
}

/// Reads, handles and writes what is ready on an attached connection.
fn serve(
    cookie: u64,
    session: &mut Session,
    conn: &mut Connection,
    peer: Option<&AuthTicket>,
    on: &mut impl FnMut(ServerEvent<'_>),
) -> Result<bool, ConnError> {
    let n = conn.read_some()?;
    let mut out = std::mem::take(conn.out());
    let used = session.receive(conn.input(), &mut out, |e| {
        if let Event::Message { seq, msg_type, frame } = e {
            on(ServerEvent::Message {
                cookie,
                seq,
                msg_type,
                payload: crate::session::payload(&frame),
                peer,
            });
        }
    });
    *conn.out() = out;
    conn.consume(used?);
    // The ack waits a little for a reply to carry it (`Server::send_due_acks`).
    conn.flush_with(session)?;
    Ok(n > 0)
}
