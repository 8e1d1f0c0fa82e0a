//! A core's connections to the cores of peer OSDs (replication), polled by the core like
//! its server: non-blocking connects, sessions that resend what a cut lost, each socket
//! in the core's park set so a reply wakes it.
//!
//! One connection per (peer OSD, peer core address). A connection is kept while its OSD
//! is up at that address in the current map; [`Peers::retain_map`] drops the others and
//! says which OSDs lost a connection, so the writes waiting for them stop waiting.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::time::Duration;

use nix::sys::epoll::{Epoll, EpollEvent, EpollFlags};
use sluice_auth::kdc::ServiceTicket;
use sluice_control::maps::{OsdId, OsdMap};
use sluice_net::frame::Limits;
use sluice_net::ops;
use sluice_net::session::{self, Event};
use sluice_net::tcp::ClientConn;
use sluice_vocab::MonoTime;

/// Wait this long after a failed connection before the next attempt.
pub const RECONNECT_BACKOFF: Duration = Duration::from_millis(200);

/// Park-set tokens of peer sockets start here (0 and 1 are the server and the device).
const TOKEN_BASE: u64 = 1 << 32;

#[derive(Debug)]
struct Peer {
    osd: OsdId,
    /// The epoch the OSD booted at when this connection was made: a restarted OSD may
    /// have lost what it had not made durable, so its old connection goes.
    up_from: u64,
    conn: ClientConn,
    /// Its park-set token, and whether the socket is registered (and for writing too).
    token: u64,
    registered: bool,
    armed_out: bool,
    next_connect: MonoTime,
    last_error: Option<String>,
}

/// A message a peer sent this core.
#[derive(Debug)]
pub struct Received {
    pub from: OsdId,
    pub msg_type: u16,
    pub payload: Vec<u8>,
}

#[derive(Debug, Default)]
pub struct Peers {
    peers: HashMap<SocketAddr, Peer>,
    /// The ticket every connection presents (`None`: authentication off, or not yet
    /// fetched: then connections wait for it when `auth_required`).
    ticket: Option<ServiceTicket>,
    auth_required: bool,
    next_token: u64,
}

/// Where to reach one core of an up OSD: its address and the epoch it booted at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerAddr {
    pub addr: SocketAddr,
    pub up_from: u64,
}

/// The address of core `core_of(ports)` of `osd` in `map`, if it is up there.
pub fn core_addr(
    map: &OsdMap,
    osd: OsdId,
    core_of: impl FnOnce(usize) -> usize,
) -> Option<PeerAddr> {
    let info = map.osd(osd).filter(|o| o.up)?;
    let addrs = info.addrs.as_ref()?;
    if addrs.core_ports.is_empty() {
        return None;
    }
    let port = addrs.core_ports[core_of(addrs.core_ports.len())];
    Some(PeerAddr { addr: SocketAddr::new(addrs.public.ip(), port), up_from: info.up_from })
}

impl Peers {
    pub fn new(auth_required: bool) -> Peers {
        Peers { auth_required, ..Peers::default() }
    }

    /// Queues a message for `osd` at `addr` (connecting at the next poll if need be).
    pub fn send(
        &mut self,
        osd: OsdId,
        to: PeerAddr,
        msg_type: u16,
        parts: &[&[u8]],
    ) -> Result<(), String> {
        let addr = to.addr;
        let ticket = &self.ticket;
        let next_token = &mut self.next_token;
        let p = self.peers.entry(addr).or_insert_with(|| {
            let cookie = rand::random::<u64>() | 1;
            let mut conn = ClientConn::new(addr, cookie, ops::FEATURES, Limits::DEFAULT);
            conn.set_ticket(ticket.clone());
            *next_token += 1;
            Peer {
                osd,
                up_from: to.up_from,
                conn,
                token: TOKEN_BASE + *next_token,
                registered: false,
                armed_out: false,
                next_connect: MonoTime::ZERO,
                last_error: None,
            }
        });
        debug_assert_eq!(p.osd, osd, "one address, one OSD");
        p.conn.send_parts(msg_type, parts).map(|_| ()).map_err(|e| e.to_string())
    }

    /// A new ticket (after a login or renewal): every connection moves to it (a
    /// reconnect; the sessions resend what was in flight).
    pub fn set_ticket(&mut self, ticket: ServiceTicket) {
        for p in self.peers.values_mut() {
            p.conn.set_ticket(Some(ticket.clone()));
            if p.conn.connected() {
                p.conn.cut();
                p.registered = false;
            }
        }
        self.ticket = Some(ticket);
    }

    /// Keeps the connections whose OSD is still up at that address in `map`; returns the
    /// OSDs whose connection was dropped (what was in flight there is lost).
    pub fn retain_map(&mut self, map: &OsdMap) -> Vec<OsdId> {
        let mut gone = Vec::new();
        self.peers.retain(|addr, p| {
            let keep = map.osd(p.osd).is_some_and(|o| {
                o.up && o.up_from == p.up_from
                    && o.addrs.as_ref().is_some_and(|a| {
                        a.public.ip() == addr.ip() && a.core_ports.contains(&addr.port())
                    })
            });
            if !keep {
                tracing::info!("dropping the connection to {} at {addr}", p.osd);
                gone.push(p.osd);
            }
            keep
        });
        gone.sort_unstable();
        gone.dedup();
        gone
    }

    /// Connects what has something to send, polls every connection, and keeps the park
    /// set in step. Messages received go to `out`. True if anything happened.
    pub fn poll(&mut self, now: MonoTime, park: &Epoll, out: &mut Vec<Received>) -> bool {
        let mut busy = false;
        for (addr, p) in &mut self.peers {
            if !p.conn.connected() {
                p.registered = false;
                let have_ticket = !self.auth_required || self.ticket.is_some();
                // Reconnected even with nothing to send: replies may wait in the
                // server's session (it keeps them across cuts).
                if now < p.next_connect || !have_ticket {
                    continue;
                }
                busy = true;
                if let Err(e) = p.conn.connect_nonblocking() {
                    p.next_connect = now.after(RECONNECT_BACKOFF);
                    note_error(p, format!("connecting to {} at {addr}: {e}", p.osd));
                    continue;
                }
            }
            let osd = p.osd;
            let r = p.conn.poll(|e| match e {
                Event::Message { msg_type, frame, .. } => {
                    out.push(Received {
                        from: osd,
                        msg_type,
                        payload: session::payload(&frame).to_vec(),
                    });
                }
                Event::Reset { resent } => {
                    tracing::info!(
                        "{osd} at {addr} forgot our session; {resent} message(s) resent"
                    );
                }
                Event::Ready { .. } | Event::KeepaliveAck { .. } => {}
            });
            if let Err(e) = r {
                // The session keeps what must be resent; reconnect after a pause.
                p.registered = false;
                p.next_connect = now.after(RECONNECT_BACKOFF);
                note_error(p, format!("connection to {} at {addr}: {e}", p.osd));
                busy = true;
                continue;
            }
            if p.last_error.is_some() && p.conn.session.unacked() == 0 {
                tracing::info!("connection to {} at {addr} works again", p.osd);
                p.last_error = None;
            }
            // The socket is in the park set, for writing too while output waits (a
            // connect in progress is one), so the reactor sleeps instead of spinning.
            let want_out = p.conn.wants_write();
            if let Some(fd) = p.conn.fd() {
                let mut flags = EpollFlags::EPOLLIN;
                if want_out {
                    flags |= EpollFlags::EPOLLOUT;
                }
                let ev = EpollEvent::new(flags, p.token);
                let r = if !p.registered {
                    park.add(fd.as_fd(), ev)
                } else if want_out != p.armed_out {
                    park.modify(fd.as_fd(), &mut EpollEvent::new(flags, p.token))
                } else {
                    Ok(())
                };
                match r {
                    Ok(()) => {
                        p.registered = true;
                        p.armed_out = want_out;
                    }
                    Err(e) => tracing::warn!("park set: peer socket of {}: {e}", p.osd),
                }
            }
        }
        busy
    }

    /// Sends acks held back for a reply to carry them: call before parking.
    pub fn flush_acks(&mut self) {
        for p in self.peers.values_mut() {
            p.conn.flush_acks();
        }
    }

    /// Something could be done now (a connection to start after its backoff is left to
    /// the timer the caller keeps).
    pub fn needs_poll(&self, now: MonoTime) -> bool {
        self.peers.values().any(|p| {
            !p.conn.connected()
                && now >= p.next_connect
                && (!self.auth_required || self.ticket.is_some())
        })
    }

    /// Connections waiting for their backoff to pass.
    pub fn reconnect_pending(&self) -> bool {
        self.peers.values().any(|p| !p.conn.connected())
    }

    pub fn len(&self) -> usize {
        self.peers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.peers.is_empty()
    }
}

/// Logs a connection error once per run of the same error.
fn note_error(p: &mut Peer, e: String) {
    if p.last_error.as_ref() != Some(&e) {
        tracing::warn!("{e}; retrying");
    } else {
        tracing::debug!("{e}; retrying");
    }
    p.last_error = Some(e);
}
