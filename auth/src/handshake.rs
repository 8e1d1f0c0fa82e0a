//! A client proving itself to a service with a ticket, and the service proving itself
//! back (cephx phase III). Three round trips' worth of frames, no monitor involved:
//!
//! ```text
//! client                                            service (an OSD)
//!   Request { ticket, {nonce1}^sk }            ->     opens the ticket with its rotating
//!                                                     secret: identity, caps, expiry, sk
//!                                              <-   Challenge { {challenge}^sk }
//!   Request { ticket, {nonce2, challenge+1}^sk } ->   the answer proves the request is
//!                                                     live, not a recording
//!                                              <-   Done { {nonce2+1, connection secret}^sk }
//!   only a holder of the service's secret could
//!   read nonce2: the service is genuine
//! ```
//!
//! [`encode`] and [`decode`] are the wire form of the frames:
//! `| version u8 = 1 | kind u8 | len u32 | postcard body | crc32c of all before, le32 |`,
//! at most [`MAX_FRAME_BYTES`]. The decoder never panics (property test and fuzz
//! target).

use serde::{Deserialize, Serialize};
use sluice_vocab::codec::{Dec, Enc};

use crate::caps::Service;
use crate::crypto;
use crate::kdc::ServiceTicket;
use crate::secret::{Secret, random_u64};
use crate::ticket::{AuthTicket, RotatingSecrets, TicketBlob, open_ticket};
use crate::{AuthError, malformed};

const WIRE_VERSION: u8 = 1;
/// Largest handshake frame (a ticket with long caps stays far below).
pub const MAX_FRAME_BYTES: usize = 16 << 10;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuthRequest {
    pub global_id: u64,
    pub ticket: TicketBlob,
    /// An [`Authorizer`] sealed under the ticket's session key.
    pub sealed: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthFrame {
    Request(AuthRequest),
    /// The service's challenge, sealed under the session key.
    Challenge(Vec<u8>),
    /// The service's proof and the connection secret, sealed under the session key.
    Done(Vec<u8>),
}

#[derive(Serialize, Deserialize)]
struct Authorizer {
    global_id: u64,
    nonce: u64,
    /// The service's challenge + 1, in the second request.
    challenge_reply: Option<u64>,
}

#[derive(Serialize, Deserialize)]
struct DoneBody {
    nonce_reply: u64,
    connection_secret: Secret,
    /// The connection continues in secure mode (the service decides).
    secure: bool,
}

const AAD_AUTHORIZER: &[u8] = b"sluice-authorizer-1";
const AAD_CHALLENGE: &[u8] = b"sluice-challenge-1";
const AAD_DONE: &[u8] = b"sluice-done-1";

fn aad(label: &[u8], service: Service) -> Vec<u8> {
    [label, &[service as u8]].concat()
}

pub fn encode(f: &AuthFrame) -> Vec<u8> {
    let (kind, body) = match f {
        AuthFrame::Request(r) => (1u8, postcard::to_allocvec(r).expect("requests serialize")),
        AuthFrame::Challenge(b) => (2, postcard::to_allocvec(b).expect("bytes serialize")),
        AuthFrame::Done(b) => (3, postcard::to_allocvec(b).expect("bytes serialize")),
    };
    let mut e = Enc::with_capacity(body.len() + 10);
    e.u8(WIRE_VERSION).u8(kind).u32(body.len() as u32).bytes(&body);
    let crc = crc32c::crc32c(&e.buf);
    e.u32(crc);
    assert!(e.buf.len() <= MAX_FRAME_BYTES, "a handshake frame of {} bytes", e.buf.len());
    e.buf
}

pub fn decode(buf: &[u8]) -> Result<AuthFrame, AuthError> {
    const WHAT: &str = "auth frame";
    let t = |_| malformed(WHAT, "truncated");
    if buf.len() > MAX_FRAME_BYTES {
        return Err(malformed(WHAT, format!("{} bytes, more than {MAX_FRAME_BYTES}", buf.len())));
    }
    let mut d = Dec::new(buf);
    let version = d.u8().map_err(t)?;
    let kind = d.u8().map_err(t)?;
    let len = d.u32().map_err(t)? as usize;
    let body = d.take(len).map_err(t)?;
    let at = d.position();
    let crc = d.u32().map_err(t)?;
    if d.remaining() != 0 {
        return Err(malformed(WHAT, format!("{} bytes after the frame", d.remaining())));
    }
    if crc32c::crc32c(&buf[..at]) != crc {
        return Err(malformed(WHAT, "checksum mismatch"));
    }
    if version != WIRE_VERSION {
        return Err(malformed(WHAT, format!("version {version} is unknown")));
    }
    let bad = |e: postcard::Error| malformed(WHAT, e);
    match kind {
        1 => Ok(AuthFrame::Request(postcard::from_bytes(body).map_err(bad)?)),
        2 => Ok(AuthFrame::Challenge(postcard::from_bytes(body).map_err(bad)?)),
        3 => Ok(AuthFrame::Done(postcard::from_bytes(body).map_err(bad)?)),
        k => Err(malformed(WHAT, format!("unknown kind {k}"))),
    }
}

#[derive(Debug)]
enum ClientState {
    AwaitChallenge,
    AwaitDone { nonce: u64 },
    Done,
}

/// The client's side of one connection's handshake.
#[derive(Debug)]
pub struct ClientHandshake {
    ticket: ServiceTicket,
    state: ClientState,
}

/// What the client does next.
#[derive(Debug)]
pub enum ClientStep {
    Send(AuthFrame),
    /// The service proved itself; with `secure`, every byte after its reply is sealed
    /// with keys from the secret.
    Done {
        connection_secret: Secret,
        secure: bool,
    },
}

impl ClientHandshake {
    /// Starts with `ticket`; send the returned frame.
    pub fn start(ticket: &ServiceTicket) -> (ClientHandshake, AuthFrame) {
        let hs = ClientHandshake { ticket: ticket.clone(), state: ClientState::AwaitChallenge };
        let f = hs.request(None);
        (hs, f)
    }

    fn request(&self, challenge_reply: Option<u64>) -> AuthFrame {
        self.request_with(random_u64(), challenge_reply)
    }

    fn request_with(&self, nonce: u64, challenge_reply: Option<u64>) -> AuthFrame {
        let t = &self.ticket;
        let a = Authorizer { global_id: t.global_id, nonce, challenge_reply };
        let plain = postcard::to_allocvec(&a).expect("authorizers serialize");
        let sealed = crypto::seal(&t.session_key, &aad(AAD_AUTHORIZER, t.service), &plain);
        AuthFrame::Request(AuthRequest { global_id: t.global_id, ticket: t.blob.clone(), sealed })
    }

    pub fn on_frame(&mut self, f: &AuthFrame) -> Result<ClientStep, AuthError> {
        let t = &self.ticket;
        match (&self.state, f) {
            (ClientState::AwaitChallenge, AuthFrame::Challenge(sealed)) => {
                let plain = crypto::open(
                    &t.session_key,
                    &aad(AAD_CHALLENGE, t.service),
                    sealed,
                    "challenge",
                )
                .map_err(|_| AuthError::ServerNotAuthentic)?;
                let challenge: u64 =
                    postcard::from_bytes(&plain).map_err(|e| malformed("challenge", e))?;
                let nonce = random_u64();
                let reply = self.request_with(nonce, Some(challenge.wrapping_add(1)));
                self.state = ClientState::AwaitDone { nonce };
                Ok(ClientStep::Send(reply))
            }
            (ClientState::AwaitDone { nonce }, AuthFrame::Done(sealed)) => {
                let plain = zeroize::Zeroizing::new(
                    crypto::open(&t.session_key, &aad(AAD_DONE, t.service), sealed, "auth reply")
                        .map_err(|_| AuthError::ServerNotAuthentic)?,
                );
                let body: DoneBody =
                    postcard::from_bytes(&plain).map_err(|e| malformed("auth reply", e))?;
                if body.nonce_reply != nonce.wrapping_add(1) {
                    return Err(AuthError::ServerNotAuthentic);
                }
                self.state = ClientState::Done;
                Ok(ClientStep::Done {
                    connection_secret: body.connection_secret,
                    secure: body.secure,
                })
            }
            (s, f) => {
                Err(AuthError::Unexpected { what: frame_name(f), state: client_state_name(s) })
            }
        }
    }
}

fn frame_name(f: &AuthFrame) -> &'static str {
    match f {
        AuthFrame::Request(_) => "auth request",
        AuthFrame::Challenge(_) => "auth challenge",
        AuthFrame::Done(_) => "auth done",
    }
}

fn client_state_name(s: &ClientState) -> &'static str {
    match s {
        ClientState::AwaitChallenge => "awaiting the challenge",
        ClientState::AwaitDone { .. } => "awaiting the server's proof",
        ClientState::Done => "authenticated",
    }
}

#[derive(Debug)]
enum ServerState {
    AwaitRequest,
    AwaitAnswer { challenge: u64, blob: TicketBlob },
    Done,
}

/// The service's side of one connection's handshake.
#[derive(Debug)]
pub struct ServerHandshake {
    service: Service,
    secure: bool,
    state: ServerState,
}

/// Who the peer is, as its verified ticket says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    pub ticket: AuthTicket,
    pub session_key: Secret,
    pub connection_secret: Secret,
}

#[derive(Debug)]
pub enum ServerStep {
    Send(AuthFrame),
    /// Send `reply`; the peer is `peer` from now on.
    Done {
        peer: Box<Verified>,
        reply: AuthFrame,
    },
}

impl ServerHandshake {
    pub fn new(service: Service) -> ServerHandshake {
        ServerHandshake::with_mode(service, false)
    }

    /// A handshake whose connection continues in secure mode when `secure`.
    pub fn with_mode(service: Service, secure: bool) -> ServerHandshake {
        ServerHandshake { service, secure, state: ServerState::AwaitRequest }
    }

    /// Handles a frame from the client, checking its ticket against `secrets` (this
    /// service's rotating secrets) at `now_ms`. Any error ends the handshake.
    pub fn on_frame(
        &mut self,
        f: &AuthFrame,
        secrets: &RotatingSecrets,
        now_ms: u64,
    ) -> Result<ServerStep, AuthError> {
        let AuthFrame::Request(req) = f else {
            return Err(AuthError::Unexpected { what: frame_name(f), state: self.state_name() });
        };
        let (ticket, sk) = open_ticket(&req.ticket, self.service, secrets, now_ms)?;
        let plain =
            crypto::open(&sk, &aad(AAD_AUTHORIZER, self.service), &req.sealed, "authorizer")?;
        let a: Authorizer = postcard::from_bytes(&plain).map_err(|e| malformed("authorizer", e))?;
        if a.global_id != ticket.global_id || req.global_id != ticket.global_id {
            return Err(malformed("authorizer", "global id differs from the ticket's"));
        }
        match (&self.state, a.challenge_reply) {
            (ServerState::AwaitRequest, None) => {
                let challenge = random_u64();
                let plain = postcard::to_allocvec(&challenge).expect("u64 serializes");
                let sealed = crypto::seal(&sk, &aad(AAD_CHALLENGE, self.service), &plain);
                self.state = ServerState::AwaitAnswer { challenge, blob: req.ticket.clone() };
                Ok(ServerStep::Send(AuthFrame::Challenge(sealed)))
            }
            (ServerState::AwaitAnswer { challenge, blob }, Some(answer)) => {
                if answer != challenge.wrapping_add(1) || *blob != req.ticket {
                    return Err(AuthError::Replay);
                }
                let connection_secret = Secret::generate();
                let body = DoneBody {
                    nonce_reply: a.nonce.wrapping_add(1),
                    connection_secret: connection_secret.clone(),
                    secure: self.secure,
                };
                let plain =
                    zeroize::Zeroizing::new(postcard::to_allocvec(&body).expect("serializes"));
                let sealed = crypto::seal(&sk, &aad(AAD_DONE, self.service), &plain);
                self.state = ServerState::Done;
                let peer = Box::new(Verified { ticket, session_key: sk, connection_secret });
                Ok(ServerStep::Done { peer, reply: AuthFrame::Done(sealed) })
            }
            // An answer to a challenge this connection never sent: a recording.
            (ServerState::AwaitRequest, Some(_)) => Err(AuthError::Replay),
            _ => Err(AuthError::Unexpected { what: "auth request", state: self.state_name() }),
        }
    }

    fn state_name(&self) -> &'static str {
        match self.state {
            ServerState::AwaitRequest => "awaiting a request",
            ServerState::AwaitAnswer { .. } => "awaiting the challenge answer",
            ServerState::Done => "authenticated",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kdc::tests::Kdc;
    use proptest::prelude::*;

    /// Runs a handshake through the wire encoding.
    fn run(
        client: &ServiceTicket,
        server: &mut ServerHandshake,
        secrets: &RotatingSecrets,
        now: u64,
    ) -> Result<(Verified, Secret), AuthError> {
        let wire = |f: &AuthFrame| decode(&encode(f)).unwrap();
        let (mut c, first) = ClientHandshake::start(client);
        let ServerStep::Send(ch) = server.on_frame(&wire(&first), secrets, now)? else {
            panic!("done early")
        };
        let ClientStep::Send(second) = c.on_frame(&wire(&ch))? else { panic!("client done early") };
        let ServerStep::Done { peer, reply } = server.on_frame(&wire(&second), secrets, now)?
        else {
            panic!("not done")
        };
        let ClientStep::Done { connection_secret, .. } = c.on_frame(&wire(&reply))? else {
            panic!("client not done")
        };
        Ok((*peer, connection_secret))
    }

    #[test]
    fn both_sides_authenticate_and_share_a_connection_secret() {
        let mut kdc = Kdc::new();
        let (alice, key) = kdc.add("client.alice", "allow r pool=a");
        let creds = kdc.login(&alice, &key, 0);
        let osd = kdc.rotating[&Service::Osd].clone();
        let mut s = ServerHandshake::new(Service::Osd);
        let (peer, secret) = run(creds.ticket(Service::Osd).unwrap(), &mut s, &osd, 10).unwrap();
        assert_eq!(peer.ticket.entity, alice);
        assert_eq!(peer.connection_secret, secret);
        assert!(peer.ticket.caps.check(crate::Perms::W, Some("a")).is_err());
    }

    #[test]
    fn the_service_decides_the_mode() {
        let mut kdc = Kdc::new();
        let (alice, key) = kdc.add("client.alice", "allow r");
        let creds = kdc.login(&alice, &key, 0);
        let osd = kdc.rotating[&Service::Osd].clone();
        for secure in [false, true] {
            let (mut c, first) = ClientHandshake::start(creds.ticket(Service::Osd).unwrap());
            let mut s = ServerHandshake::with_mode(Service::Osd, secure);
            let ServerStep::Send(ch) = s.on_frame(&first, &osd, 1).unwrap() else { panic!() };
            let ClientStep::Send(a) = c.on_frame(&ch).unwrap() else { panic!() };
            let ServerStep::Done { reply, .. } = s.on_frame(&a, &osd, 1).unwrap() else { panic!() };
            let ClientStep::Done { secure: got, .. } = c.on_frame(&reply).unwrap() else {
                panic!()
            };
            assert_eq!(got, secure);
        }
    }

    #[test]
    fn expired_wrong_service_and_stale_secret_tickets_are_refused() {
        let mut kdc = Kdc::new();
        let (alice, key) = kdc.add("client.alice", "allow r");
        let creds = kdc.login(&alice, &key, 0);
        let t = creds.ticket(Service::Osd).unwrap();
        let mut osd = kdc.rotating[&Service::Osd].clone();
        let late = t.expires_ms + 1;
        assert!(matches!(
            run(t, &mut ServerHandshake::new(Service::Osd), &osd, late),
            Err(AuthError::Expired { .. })
        ));
        let mon = kdc.rotating[&Service::Mon].clone();
        assert!(matches!(
            run(t, &mut ServerHandshake::new(Service::Mon), &mon, 10),
            Err(AuthError::WrongService { want: Service::Mon, got: Service::Osd })
        ));
        osd.rotate(1);
        assert!(
            run(t, &mut ServerHandshake::new(Service::Osd), &osd, 10).is_ok(),
            "previous secret"
        );
        osd.rotate(2);
        assert!(matches!(
            run(t, &mut ServerHandshake::new(Service::Osd), &osd, 10),
            Err(AuthError::StaleSecret { .. })
        ));
    }

    #[test]
    fn replayed_authorizers_are_refused() {
        let mut kdc = Kdc::new();
        let (alice, key) = kdc.add("client.alice", "allow r");
        let creds = kdc.login(&alice, &key, 0);
        let t = creds.ticket(Service::Osd).unwrap();
        let osd = kdc.rotating[&Service::Osd].clone();
        // Record a whole successful handshake.
        let (mut c, first) = ClientHandshake::start(t);
        let mut s = ServerHandshake::new(Service::Osd);
        let ServerStep::Send(ch) = s.on_frame(&first, &osd, 1).unwrap() else { panic!() };
        let ClientStep::Send(second) = c.on_frame(&ch).unwrap() else { panic!() };
        assert!(matches!(s.on_frame(&second, &osd, 1), Ok(ServerStep::Done { .. })));
        // Replaying the answer on a new connection, with or without the first request.
        let mut s2 = ServerHandshake::new(Service::Osd);
        assert_eq!(s2.on_frame(&second, &osd, 2).unwrap_err(), AuthError::Replay);
        let mut s3 = ServerHandshake::new(Service::Osd);
        assert!(matches!(s3.on_frame(&first, &osd, 2), Ok(ServerStep::Send(_))));
        assert_eq!(s3.on_frame(&second, &osd, 2).unwrap_err(), AuthError::Replay);
    }

    #[test]
    fn a_client_rejects_a_server_that_cannot_prove_itself() {
        let mut kdc = Kdc::new();
        let (alice, key) = kdc.add("client.alice", "allow r");
        let creds = kdc.login(&alice, &key, 0);
        let t = creds.ticket(Service::Osd).unwrap();
        // An impostor without the service secret cannot open the ticket, so it can only
        // make up a challenge under some other key.
        let (mut c, _first) = ClientHandshake::start(t);
        let fake = crypto::seal(
            &Secret::generate(),
            &aad(AAD_CHALLENGE, Service::Osd),
            &postcard::to_allocvec(&7u64).unwrap(),
        );
        assert_eq!(
            c.on_frame(&AuthFrame::Challenge(fake)).unwrap_err(),
            AuthError::ServerNotAuthentic
        );
        // A genuine challenge, then a Done that does not answer our nonce (a replayed
        // Done of an earlier handshake).
        let osd = kdc.rotating[&Service::Osd].clone();
        let (mut c1, f1) = ClientHandshake::start(t);
        let mut s1 = ServerHandshake::new(Service::Osd);
        let ServerStep::Send(ch1) = s1.on_frame(&f1, &osd, 1).unwrap() else { panic!() };
        let ClientStep::Send(a1) = c1.on_frame(&ch1).unwrap() else { panic!() };
        let ServerStep::Done { reply: done1, .. } = s1.on_frame(&a1, &osd, 1).unwrap() else {
            panic!()
        };
        let (mut c2, f2) = ClientHandshake::start(t);
        let mut s2 = ServerHandshake::new(Service::Osd);
        let ServerStep::Send(ch2) = s2.on_frame(&f2, &osd, 1).unwrap() else { panic!() };
        let ClientStep::Send(_) = c2.on_frame(&ch2).unwrap() else { panic!() };
        assert_eq!(c2.on_frame(&done1).unwrap_err(), AuthError::ServerNotAuthentic);
        // Out-of-order frames are errors, not panics.
        assert!(matches!(c2.on_frame(&ch2), Err(AuthError::Unexpected { .. })));
        assert!(matches!(s2.on_frame(&done1, &osd, 1), Err(AuthError::Unexpected { .. })));
    }

    #[test]
    fn frames_with_damage_are_refused() {
        let f = AuthFrame::Challenge(vec![1, 2, 3]);
        let wire = encode(&f);
        assert_eq!(decode(&wire).unwrap(), f);
        for i in 0..wire.len() {
            let mut w = wire.clone();
            w[i] ^= 0x10;
            assert!(decode(&w).is_err(), "flip at {i} accepted");
        }
        for n in 0..wire.len() {
            assert!(decode(&wire[..n]).is_err());
        }
        assert!(decode(&vec![0u8; MAX_FRAME_BYTES + 1]).is_err());
    }

    proptest! {
        #[test]
        fn decoding_garbage_never_panics(b in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = decode(&b);
        }

        /// Garbage with a valid envelope reaches the body decoders and the server.
        #[test]
        fn well_framed_garbage_never_panics(kind in 0u8..5, body in proptest::collection::vec(any::<u8>(), 0..200)) {
            let mut e = Enc::with_capacity(body.len() + 10);
            e.u8(WIRE_VERSION).u8(kind).u32(body.len() as u32).bytes(&body);
            let crc = crc32c::crc32c(&e.buf);
            e.u32(crc);
            if let Ok(f) = decode(&e.buf) {
                let secrets = RotatingSecrets::new(Service::Osd, 0);
                let _ = ServerHandshake::new(Service::Osd).on_frame(&f, &secrets, 0);
            }
        }
    }
}
