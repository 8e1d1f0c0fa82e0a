//! Sessions across broken connections: every message is delivered exactly once and in
//! order, whatever bytes a cut loses, in both directions.

use proptest::prelude::*;
use sluice_net::frame::Limits;
use sluice_net::session::{self, Event, Features, Handshake, Session, SessionError};

const F: Features = Features { supported: 0b111, required: 0b1 };

/// One connection's state at each end: bytes in flight and bytes received but not yet
/// consumed; the server also has a handshake until the hello is in.
struct Conn {
    to_server: Vec<u8>,
    to_client: Vec<u8>,
    server_in: Vec<u8>,
    client_in: Vec<u8>,
    handshake: Option<Handshake>,
}

struct World {
    client: Session,
    server: Session,
    conn: Conn,
    got_by_server: Vec<Vec<u8>>,
    got_by_client: Vec<Vec<u8>>,
}

impl World {
    fn new() -> World {
        let mut w = World {
            client: Session::client(42, F, Limits::DEFAULT),
            server: Session::server(42, F, Limits::DEFAULT),
            conn: Conn {
                to_server: vec![],
                to_client: vec![],
                server_in: vec![],
                client_in: vec![],
                handshake: None,
            },
            got_by_server: vec![],
            got_by_client: vec![],
        };
        w.connect();
        w
    }

    fn connect(&mut self) {
        let mut to_client = Vec::new();
        let hs = Handshake::new(F, Limits::DEFAULT, &mut to_client);
        let mut to_server = Vec::new();
        self.client.connect(&mut to_server);
        self.conn = Conn {
            to_server,
            to_client,
            server_in: vec![],
            client_in: vec![],
            handshake: Some(hs),
        };
    }

    /// The connection breaks: whatever was in flight or half-received is lost.
    fn cut(&mut self) {
        self.client.disconnected();
        self.server.disconnected();
        self.connect();
    }

    /// Moves up to `n` bytes each way and lets both ends process them.
    fn pump(&mut self, n: usize) -> Result<(), SessionError> {
        let k = n.min(self.conn.to_server.len());
        let moved: Vec<u8> = self.conn.to_server.drain(..k).collect();
        self.conn.server_in.extend(moved);
        let k = n.min(self.conn.to_client.len());
        let moved: Vec<u8> = self.conn.to_client.drain(..k).collect();
        self.conn.client_in.extend(moved);

        if let Some(hs) = &mut self.conn.handshake {
            let (used, hello) = hs.receive(&self.conn.server_in)?;
            self.conn.server_in.drain(..used);
            if let Some(h) = hello {
                assert_eq!(h.cookie, 42);
                let ev = self.server.attach(&h, &mut self.conn.to_client)?;
                self.server.drain_into(&mut self.conn.to_client);
                assert!(matches!(ev, Event::Ready { features: 0b111 }));
                self.conn.handshake = None;
            }
        }
        if self.conn.handshake.is_none() {
            let got = &mut self.got_by_server;
            let used =
                self.server.receive(&self.conn.server_in, &mut self.conn.to_client, |e| {
                    if let Event::Message { frame, .. } = e {
                        got.push(session::payload(&frame).to_vec());
                    }
                })?;
            self.conn.server_in.drain(..used);
            self.server.flush_ack(&mut self.conn.to_client);
            self.server.drain_into(&mut self.conn.to_client);
        }
        let got = &mut self.got_by_client;
        let used = self.client.receive(&self.conn.client_in, &mut self.conn.to_server, |e| {
            if let Event::Message { frame, .. } = e {
                got.push(session::payload(&frame).to_vec());
            }
        })?;
        self.conn.client_in.drain(..used);
        self.client.flush_ack(&mut self.conn.to_server);
        self.client.drain_into(&mut self.conn.to_server);
        Ok(())
    }
}

#[derive(Debug, Clone)]
enum Step {
    ClientSends,
    ServerSends,
    Pump(usize),
    Cut,
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        3 => Just(Step::ClientSends),
        3 => Just(Step::ServerSends),
        6 => (1usize..200).prop_map(Step::Pump),
        1 => Just(Step::Cut),
    ]
}

fn msg(side: u8, i: usize) -> Vec<u8> {
    let mut v = vec![side; i % 50];
    v.extend_from_slice(&(i as u64).to_le_bytes());
    v
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    #[test]
    fn exactly_once_in_order_across_cuts(steps in proptest::collection::vec(step(), 1..120)) {
        let mut w = World::new();
        let (mut sent_c, mut sent_s) = (0usize, 0usize);
        for s in steps {
            match s {
                Step::ClientSends => {
                    w.client.send(1, &[&msg(b'c', sent_c)]).unwrap();
                    w.client.drain_into(&mut w.conn.to_server);
                    sent_c += 1;
                }
                Step::ServerSends => {
                    w.server.send(2, &[&msg(b's', sent_s)]).unwrap();
                    w.server.drain_into(&mut w.conn.to_client);
                    sent_s += 1;
                }
                Step::Pump(n) => w.pump(n).unwrap(),
                Step::Cut => w.cut(),
            }
            // Never a duplicate, never out of order, at any point.
            for (i, m) in w.got_by_server.iter().enumerate() {
                prop_assert_eq!(m, &msg(b'c', i));
            }
            for (i, m) in w.got_by_client.iter().enumerate() {
                prop_assert_eq!(m, &msg(b's', i));
            }
        }
        // With the connection left alone, everything arrives and is acked.
        for _ in 0..1000 {
            w.pump(4096).unwrap();
            if w.got_by_server.len() == sent_c && w.got_by_client.len() == sent_s
                && w.client.unacked() == 0 && w.server.unacked() == 0 {
                break;
            }
        }
        prop_assert_eq!(w.got_by_server.len(), sent_c);
        prop_assert_eq!(w.got_by_client.len(), sent_s);
        prop_assert_eq!((w.client.unacked(), w.server.unacked()), (0, 0));
    }

    #[test]
    fn garbage_handshakes_and_sessions_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
        let mut out = Vec::new();
        let mut hs = Handshake::new(F, Limits::DEFAULT, &mut out);
        let _ = hs.receive(&bytes);
        let mut c = Session::client(1, F, Limits::DEFAULT);
        c.connect(&mut out);
        let _ = c.receive(&bytes, &mut out, |_| {});
    }
}

#[test]
fn feature_mismatch_is_a_clear_error_both_ways() {
    let mut out = Vec::new();
    let needy = Features { supported: 0b11, required: 0b10 };
    let mut hs = Handshake::new(needy, Limits::DEFAULT, &mut out);
    let lacking = Features { supported: 0b101, required: 0b1 };
    let mut c = Session::client(1, lacking, Limits::DEFAULT); // lacks bit 1
    let mut to_server = Vec::new();
    c.connect(&mut to_server);
    assert_eq!(hs.receive(&to_server).unwrap_err(), SessionError::PeerLacksFeatures(0b10));
    let mut to_client = Vec::new();
    let _ = Handshake::new(needy, Limits::DEFAULT, &mut to_client);
    let mut c = Session::client(1, lacking, Limits::DEFAULT);
    c.connect(&mut Vec::new());
    assert_eq!(
        c.receive(&to_client, &mut Vec::new(), |_| {}).unwrap_err(),
        SessionError::WeLackFeatures(0b10)
    );
}

#[test]
fn keepalives_are_echoed_and_messages_before_the_handshake_refused() {
    let mut w = World::new();
    for _ in 0..3 {
        w.pump(10_000).unwrap();
    }
    assert!(w.client.is_open() && w.server.is_open());
    w.client.keepalive(12345, &mut w.conn.to_server);
    let mut echoed = None;
    for _ in 0..3 {
        let k = w.conn.to_server.len();
        let moved: Vec<u8> = w.conn.to_server.drain(..k).collect();
        w.server.receive(&moved, &mut w.conn.to_client, |_| {}).unwrap();
        let k = w.conn.to_client.len();
        let moved: Vec<u8> = w.conn.to_client.drain(..k).collect();
        w.client
            .receive(&moved, &mut w.conn.to_server, |e| {
                if let Event::KeepaliveAck { sent_ns } = e {
                    echoed = Some(sent_ns);
                }
            })
            .unwrap();
    }
    assert_eq!(echoed, Some(12345));
    // A message frame where a banner is expected closes the connection.
    let mut s = Session::server(9, F, Limits::DEFAULT);
    let mut bytes = Vec::new();
    s.send(1, &[b"x"]).unwrap();
    let mut c2 = Session::client(9, F, Limits::DEFAULT);
    c2.connect(&mut Vec::new());
    let mut open_server = Session::server(9, F, Limits::DEFAULT);
    let mut out = Vec::new();
    let hello = sluice_net::session::Hello { cookie: 9, peer_in_seq: 0, features: 0b111 };
    open_server.attach(&hello, &mut out).unwrap();
    open_server.send(1, &[b"early"]).unwrap();
    open_server.drain_into(&mut bytes);
    assert!(matches!(
        c2.receive(&bytes, &mut Vec::new(), |_| {}),
        Err(SessionError::Unexpected { .. })
    ));
}

/// A reply carries the ack of what came before it: the owner can hold a separate ack
/// back (`tcp::ACK_DELAY`) and usually never send one.
#[test]
fn messages_carry_acks_so_a_separate_one_is_owed_only_until_a_reply() {
    let mut w = World::new();
    for _ in 0..4 {
        w.pump(10_000).unwrap();
    }
    w.client.send(1, &[b"request"]).unwrap();
    w.client.drain_into(&mut w.conn.to_server);
    // Deliver to the server without letting it ack.
    let moved: Vec<u8> = w.conn.to_server.drain(..).collect();
    w.server.receive(&moved, &mut w.conn.to_client, |_| {}).unwrap();
    assert_eq!(w.server.acks_owed(), 1);
    w.server.send(2, &[b"reply"]).unwrap();
    assert_eq!(w.server.acks_owed(), 0, "the reply carries the ack");
    w.server.drain_into(&mut w.conn.to_client);
    let moved: Vec<u8> = w.conn.to_client.drain(..).collect();
    w.client.receive(&moved, &mut w.conn.to_server, |_| {}).unwrap();
    assert_eq!(w.client.unacked(), 0, "acked by the reply alone");
    assert_eq!(w.client.acks_owed(), 1, "and the client owes one for the reply");
}
