//! The authentication phase of a connection, before its session handshake (issue 6):
//! the client proves itself with a service ticket, the service proves itself back
//! (`sluice_auth::handshake`), and the service says whether the connection goes on in
//! secure mode. The frames are ordinary frames with tag [`TAG_AUTH`], one handshake
//! message each; a phase stops right after the frame that ends it, so its owner can
//! switch the connection to secure mode at exactly that byte. Then the session
//! handshake (banner, hello) runs as without auth, sealed when secure.

use sluice_auth::handshake::{
    self, AuthFrame, ClientHandshake, ClientStep, ServerHandshake, ServerStep, Verified,
};
use sluice_auth::kdc::ServiceTicket;
use sluice_auth::{AuthError, RotatingSecrets, Secret, Service};

use crate::frame::{self, Decoded, Limits};

/// Frame tag of authentication messages.
pub const TAG_AUTH: u8 = 20;

fn write(out: &mut Vec<u8>, f: &AuthFrame, limits: &Limits) {
    frame::encode(out, TAG_AUTH, 0, &[&handshake::encode(f)], limits)
        .expect("handshake frames are small");
}

/// Limits while nobody is authenticated: one handshake message per frame, so an
/// unauthenticated peer cannot make the server buffer a large frame.
const AUTH_LIMITS: Limits = Limits {
    max_segment_bytes: handshake::MAX_FRAME_BYTES as u32,
    max_frame_bytes: handshake::MAX_FRAME_BYTES as u32,
};

/// The next auth frame in `input`: `Ok(None)` if it has not all arrived.
fn next(input: &[u8]) -> Result<Option<(AuthFrame, usize)>, PhaseError> {
    match frame::decode(input, &AUTH_LIMITS).map_err(|e| PhaseError::Frame(e.to_string()))? {
        Decoded::NeedMore { .. } => Ok(None),
        Decoded::Frame { frame, len } => {
            if frame.tag != TAG_AUTH {
                return Err(PhaseError::Auth(AuthError::Unexpected {
                    what: "a session frame",
                    state: "authenticating (this server requires authentication)",
                }));
            }
            Ok(Some((handshake::decode(frame.segment(0))?, len)))
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PhaseError {
    #[error("authentication: {0}")]
    Auth(#[from] AuthError),
    #[error("authentication: frame: {0}")]
    Frame(String),
}

/// The client's side, for one connection.
#[derive(Debug)]
pub struct ClientAuthPhase {
    hs: ClientHandshake,
}

impl ClientAuthPhase {
    /// Starts with `ticket`: writes the first request to `out`.
    pub fn start(ticket: &ServiceTicket, out: &mut Vec<u8>, limits: &Limits) -> ClientAuthPhase {
        let (hs, first) = ClientHandshake::start(ticket);
        write(out, &first, limits);
        ClientAuthPhase { hs }
    }

    /// Handles the server's frames in `input`, writing answers to `out`. Returns the
    /// bytes used and, once the server proved itself, the connection secret and whether
    /// the connection continues in secure mode (nothing after that frame is read).
    pub fn receive(
        &mut self,
        input: &[u8],
        out: &mut Vec<u8>,
        limits: &Limits,
    ) -> Result<(usize, Option<(Secret, bool)>), PhaseError> {
        let mut at = 0;
        while let Some((f, len)) = next(&input[at..])? {
            at += len;
            match self.hs.on_frame(&f)? {
                ClientStep::Send(reply) => write(out, &reply, limits),
                ClientStep::Done { connection_secret, secure } => {
                    return Ok((at, Some((connection_secret, secure))));
                }
            }
        }
        Ok((at, None))
    }
}

/// The service's side, for one connection.
#[derive(Debug)]
pub struct ServerAuthPhase {
    hs: ServerHandshake,
}

impl ServerAuthPhase {
    pub fn new(service: Service, secure: bool) -> ServerAuthPhase {
        ServerAuthPhase { hs: ServerHandshake::with_mode(service, secure) }
    }

    /// Handles the client's frames in `input` against `secrets` at `now_ms`, writing
    /// replies to `out`. Returns the bytes used and, once the client is verified, who
    /// it is (its last reply is in `out`; nothing after its frame is read).
    pub fn receive(
        &mut self,
        input: &[u8],
        out: &mut Vec<u8>,
        secrets: &RotatingSecrets,
        now_ms: u64,
        limits: &Limits,
    ) -> Result<(usize, Option<Box<Verified>>), PhaseError> {
        let mut at = 0;
        while let Some((f, len)) = next(&input[at..])? {
            at += len;
            match self.hs.on_frame(&f, secrets, now_ms)? {
                ServerStep::Send(reply) => write(out, &reply, limits),
                ServerStep::Done { peer, reply } => {
                    write(out, &reply, limits);
                    return Ok((at, Some(peer)));
                }
            }
        }
        Ok((at, None))
    }
}

pub use sluice_auth::wall_ms;
