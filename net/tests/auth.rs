//! Authentication on real loopback connections (issue 6): a server that requires it
//! serves clients with a valid ticket (in crc or secure mode) and knows who they are;
//! expired tickets, tickets for another service, tickets sealed with a secret two
//! rotations old, clients without a ticket, garbage and session takeovers are refused
//! with the reason while an authenticated client keeps being served.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use sluice_auth::caps::Caps;
use sluice_auth::kdc::{self, EntityRecord, IssuePolicy, ServiceTicket};
use sluice_auth::{EntityName, RotatingSecrets, Secret, Service};
use sluice_net::frame::Limits;
use sluice_net::session::{Event, Features};
use sluice_net::tcp::{ClientConn, Server, ServerAuth, ServerEvent};

const F: Features = Features { supported: 1, required: 1 };

/// A monitor's key center, in the test.
struct Kdc {
    mon_key: Secret,
    rotating: BTreeMap<Service, RotatingSecrets>,
    db: BTreeMap<EntityName, EntityRecord>,
}

fn now_ms() -> u64 {
    sluice_net::auth_phase::wall_ms()
}

impl Kdc {
    fn new() -> Kdc {
        let rotating =
            Service::ALL.into_iter().map(|s| (s, RotatingSecrets::new(s, now_ms()))).collect();
        Kdc { mon_key: Secret::generate(), rotating, db: BTreeMap::new() }
    }

    /// A ticket for `service` for entity `name` with `osd_caps`, valid for `ttl_ms`.
    fn ticket(
        &mut self,
        name: &str,
        osd_caps: &str,
        service: Service,
        ttl_ms: u64,
    ) -> ServiceTicket {
        let e: EntityName = name.parse().unwrap();
        let key = Secret::generate();
        let caps = BTreeMap::from([(Service::Osd, Caps::parse(Service::Osd, osd_caps).unwrap())]);
        self.db.insert(e.clone(), EntityRecord { key: key.clone(), caps });
        let c = kdc::make_challenge(&self.mon_key, now_ms());
        let req = kdc::request_session_key(&e, &key, c, None, &[service]);
        let reply = kdc::issue(
            &req,
            &self.mon_key,
            |n| self.db.get(n).cloned(),
            &self.rotating,
            || 77,
            IssuePolicy { ticket_ttl_ms: ttl_ms },
            now_ms(),
        )
        .unwrap();
        kdc::open_reply(&key, &req, &reply).unwrap().ticket(service).unwrap().clone()
    }
}

fn server(kdc: &Kdc, secure: bool) -> Server {
    let mut s = Server::bind("127.0.0.1:0".parse().unwrap(), F, Limits::default()).unwrap();
    s.set_auth(Some(ServerAuth {
        service: Service::Osd,
        secrets: kdc.rotating[&Service::Osd].clone(),
        secure,
    }));
    s
}

fn client(s: &Server, cookie: u64, ticket: Option<ServiceTicket>) -> ClientConn {
    let mut c = ClientConn::new(s.local_addr().unwrap(), cookie, F, Limits::default());
    c.set_ticket(ticket);
    c
}

/// Polls both until `done`; returns what the server delivered and why it closed
/// connections.
fn pump(
    s: &mut Server,
    clients: &mut [&mut ClientConn],
    got: &mut Vec<(u64, Vec<u8>)>,
    closed: &mut Vec<String>,
    done: impl Fn(&[(u64, Vec<u8>)], &[String]) -> bool,
) {
    let end = Instant::now() + Duration::from_secs(60);
    while !done(got, closed) {
        assert!(Instant::now() < end, "stuck: got {got:?}, closed {closed:?}");
        s.poll(|e| match e {
            ServerEvent::Message { cookie, payload, peer, .. } => {
                assert!(peer.is_some(), "a message of an authenticated session carries its ticket");
                got.push((cookie, payload.to_vec()))
            }
            ServerEvent::Closed { reason, .. } => closed.push(reason),
        });
        for c in clients.iter_mut() {
            if !c.connected() {
                let _ = c.connect();
            }
            let _ = c.poll(|_: Event<'_>| {});
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn authenticated_clients_are_served_in_both_modes_across_cuts() {
    for secure in [false, true] {
        let mut kdc = Kdc::new();
        let mut s = server(&kdc, secure);
        let t = kdc.ticket("client.alice", "allow r pool=a", Service::Osd, 3_600_000);
        let mut c = client(&s, 11, Some(t));
        c.connect().unwrap();
        let (mut got, mut closed) = (Vec::new(), Vec::new());
        for i in 0..3u8 {
            c.send(1, &[i; 5000]).unwrap();
        }
        pump(&mut s, &mut [&mut c], &mut got, &mut closed, |g, _| g.len() == 3);
        assert!(closed.is_empty(), "{closed:?}");
        assert_eq!(c.is_secure(), secure);
        let peer = s.peer(11, now_ms()).expect("verified peer");
        assert!(s.peer(11, peer.expires_ms).is_none(), "an expired ticket is no peer");
        assert_eq!(peer.entity.to_string(), "client.alice");
        assert_eq!(peer.caps.to_string(), "allow r pool=a");
        // A cut: the next connection authenticates again and the session replays.
        c.send(1, &[9; 100]).unwrap();
        c.cut();
        pump(&mut s, &mut [&mut c], &mut got, &mut closed, |g, _| g.len() == 4);
        assert_eq!(got[3].1, vec![9; 100]);
        assert!(got.iter().all(|(k, _)| *k == 11));
    }
}

/// What the server delivered and why it closed connections, and how many messages the
/// good client sent.
#[derive(Default)]
struct Seen {
    got: Vec<(u64, Vec<u8>)>,
    closed: Vec<String>,
    sent: usize,
}

/// `bad` connects and is refused with `why`, while `good` sends one more message and is
/// served.
fn refused(s: &mut Server, mut bad: ClientConn, why: &str, good: &mut ClientConn, seen: &mut Seen) {
    seen.sent += 1;
    good.send(1, &[seen.sent as u8]).unwrap();
    let before = seen.closed.len();
    bad.connect().unwrap();
    let n = seen.sent;
    pump(s, &mut [&mut bad, good], &mut seen.got, &mut seen.closed, |g, c| {
        g.len() == n && c.len() > before
    });
    assert!(seen.closed[before..].iter().any(|r| r.contains(why)), "{why}: {:?}", seen.closed);
    bad.cut();
}

#[test]
fn refused_tickets_close_only_their_connection() {
    let mut kdc = Kdc::new();
    let mut s = server(&kdc, true);
    let good = kdc.ticket("client.good", "allow rw", Service::Osd, 3_600_000);
    let mut a = client(&s, 1, Some(good));
    a.connect().unwrap();
    let mut seen = Seen::default();
    let expired = kdc.ticket("client.late", "allow r", Service::Osd, 1);
    std::thread::sleep(Duration::from_millis(5));
    let bad = client(&s, 2, Some(expired));
    refused(&mut s, bad, "expired", &mut a, &mut seen);
    let mon = kdc.ticket("client.lost", "allow r", Service::Mon, 3_600_000);
    let bad = client(&s, 3, Some(mon));
    refused(&mut s, bad, "ticket is for the mon service", &mut a, &mut seen);
    let bad = client(&s, 4, None);
    refused(&mut s, bad, "requires authentication", &mut a, &mut seen);
    // Rotations: the previous secret is still accepted, two generations old is not.
    let old = kdc.ticket("client.old", "allow r", Service::Osd, 3_600_000);
    let osd = kdc.rotating.get_mut(&Service::Osd).unwrap();
    osd.rotate(now_ms());
    s.update_secrets(osd.clone());
    let mut prev = client(&s, 5, Some(old.clone()));
    prev.connect().unwrap();
    prev.send(1, b"previous").unwrap();
    let n = seen.sent + 1;
    pump(&mut s, &mut [&mut prev, &mut a], &mut seen.got, &mut seen.closed, |g, _| g.len() == n);
    seen.sent = n;
    prev.cut();
    let osd = kdc.rotating.get_mut(&Service::Osd).unwrap();
    osd.rotate(now_ms());
    s.update_secrets(osd.clone());
    let bad = client(&s, 6, Some(old));
    refused(&mut s, bad, "not accepted any more", &mut a, &mut seen);
    // Garbage where the handshake should be.
    {
        use std::io::Write;
        let before = seen.closed.len();
        let mut raw = std::net::TcpStream::connect(s.local_addr().unwrap()).unwrap();
        raw.write_all(&[0x53, 0x46, 1, 20, 0, 1, 0, 0, 9, 9, 9, 9]).unwrap();
        raw.write_all(&[0xab; 40]).unwrap();
        pump(&mut s, &mut [&mut a], &mut seen.got, &mut seen.closed, |_, c| c.len() > before);
    }
    // A large frame before anyone is authenticated: refused from its preamble.
    {
        use std::io::Write;
        let before = seen.closed.len();
        let mut big = Vec::new();
        sluice_net::frame::encode(
            &mut big,
            sluice_net::auth_phase::TAG_AUTH,
            0,
            &[&vec![0u8; 64 << 10]],
            &Limits::default(),
        )
        .unwrap();
        let mut raw = std::net::TcpStream::connect(s.local_addr().unwrap()).unwrap();
        raw.write_all(&big[..64]).unwrap();
        pump(&mut s, &mut [&mut a], &mut seen.got, &mut seen.closed, |_, c| c.len() > before);
        assert!(
            seen.closed[before..].iter().any(|r| r.contains("exceeds the limit")),
            "{:?}",
            seen.closed
        );
    }
    // The good client was served all along.
    a.send(1, b"still here").unwrap();
    let n = seen.sent + 1;
    pump(&mut s, &mut [&mut a], &mut seen.got, &mut seen.closed, |g, _| g.len() == n);
    assert_eq!(seen.got.last().unwrap(), &(1, b"still here".to_vec()));
}

#[test]
fn another_entity_cannot_take_over_a_session_by_its_cookie() {
    let mut kdc = Kdc::new();
    let mut s = server(&kdc, false);
    let alice = kdc.ticket("client.alice", "allow rw", Service::Osd, 3_600_000);
    let mallory = kdc.ticket("client.mallory", "allow rw", Service::Osd, 3_600_000);
    let mut a = client(&s, 42, Some(alice));
    a.connect().unwrap();
    a.send(1, b"mine").unwrap();
    let (mut got, mut closed) = (Vec::new(), Vec::new());
    pump(&mut s, &mut [&mut a], &mut got, &mut closed, |g, _| g.len() == 1);
    let mut m = client(&s, 42, Some(mallory));
    m.connect().unwrap();
    m.send(1, b"theirs").unwrap();
    pump(&mut s, &mut [&mut m], &mut got, &mut closed, |_, c| !c.is_empty());
    assert!(
        closed
            .iter()
            .any(|r| r.contains("client.mallory tried to attach to a session of client.alice")),
        "{closed:?}"
    );
    m.cut();
    assert_eq!(s.peer(42, now_ms()).unwrap().entity.to_string(), "client.alice");
    assert_eq!(got.len(), 1, "nothing of mallory's was delivered: {got:?}");
}

/// A recording of a whole authenticated connection (handshake and session), replayed
/// byte for byte on a new connection, is refused at the challenge (the server's
/// challenge is new per connection) while an authenticated client keeps being served.
#[test]
fn a_replayed_connection_is_refused_at_the_challenge() {
    use std::io::{Read, Write};
    use std::sync::{Arc, Mutex};
    let mut kdc = Kdc::new();
    let mut s = server(&kdc, false);
    let mut a = client(&s, 1, Some(kdc.ticket("client.good", "allow rw", Service::Osd, 3_600_000)));
    a.connect().unwrap();
    // A recording proxy in front of the server: what the client sends is kept.
    let proxy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let proxy_addr = proxy.local_addr().unwrap();
    let target = s.local_addr().unwrap();
    let recorded = Arc::new(Mutex::new(Vec::new()));
    let rec = Arc::clone(&recorded);
    std::thread::spawn(move || {
        let (mut from_client, _) = proxy.accept().unwrap();
        let mut to_server = std::net::TcpStream::connect(target).unwrap();
        let (mut c2, mut s2) = (from_client.try_clone().unwrap(), to_server.try_clone().unwrap());
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut s2, &mut c2);
        });
        let mut buf = [0u8; 4096];
        while let Ok(n) = from_client.read(&mut buf) {
            if n == 0 || to_server.write_all(&buf[..n]).is_err() {
                break;
            }
            rec.lock().unwrap().extend_from_slice(&buf[..n]);
        }
    });
    let t = kdc.ticket("client.victim", "allow rw", Service::Osd, 3_600_000);
    let mut victim = ClientConn::new(proxy_addr, 7, F, Limits::default());
    victim.set_ticket(Some(t));
    victim.connect().unwrap();
    victim.send(1, b"transfer 100").unwrap();
    let (mut got, mut closed) = (Vec::new(), Vec::new());
    pump(&mut s, &mut [&mut victim, &mut a], &mut got, &mut closed, |g, _| g.len() == 1);
    assert_eq!(got[0], (7, b"transfer 100".to_vec()));
    std::thread::sleep(Duration::from_millis(50));
    let replay = recorded.lock().unwrap().clone();
    assert!(replay.len() > 100, "recorded the handshake and the message");
    let mut raw = std::net::TcpStream::connect(target).unwrap();
    raw.write_all(&replay).unwrap();
    let before = closed.len();
    a.send(1, b"still here").unwrap();
    pump(&mut s, &mut [&mut a], &mut got, &mut closed, |g, c| c.len() > before && g.len() == 2);
    assert!(
        closed[before..].iter().any(|r| r.contains("replayed or forged authorizer")),
        "{closed:?}"
    );
    assert_eq!(got.len(), 2, "the replayed message was not delivered again: {got:?}");
    assert_eq!(got[1], (1, b"still here".to_vec()));
}
