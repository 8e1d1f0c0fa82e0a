//! Feeds arbitrary bytes to the authentication handshake: the handshake frame decoder
//! and a service's side of the exchange (as frames on a connection, the way a server
//! meets them before any session exists). Nothing may panic.
//!
//! The first input byte can ask for the handshake frame's crc32c to be fixed up (bit 0),
//! so the fuzzer reaches the body decoders and the ticket checks behind the checksum.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice_auth::handshake;
use sluice_auth::{RotatingSecrets, Service};
use sluice_net::auth_phase::{ServerAuthPhase, TAG_AUTH};
use sluice_net::frame::{self, Limits};

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    let mut body = rest.to_vec();
    if mode & 1 != 0 && body.len() >= 10 {
        let n = body.len() - 4;
        let crc = crc32c::crc32c(&body[..n]);
        body[n..].copy_from_slice(&crc.to_le_bytes());
    }
    let _ = handshake::decode(&body);
    // The same bytes as one auth frame, then raw, at a service.
    let secrets = RotatingSecrets::new(Service::Osd, 0);
    let limits = Limits::default();
    let mut framed = Vec::new();
    if frame::encode(&mut framed, TAG_AUTH, 0, &[&body], &limits).is_ok() {
        let mut p = ServerAuthPhase::new(Service::Osd, mode & 2 != 0);
        let _ = p.receive(&framed, &mut Vec::new(), &secrets, 1, &limits);
    }
    let mut p = ServerAuthPhase::new(Service::Osd, false);
    let _ = p.receive(rest, &mut Vec::new(), &secrets, 1, &limits);
});
