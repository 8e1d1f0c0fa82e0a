//! Secure mode over real loopback sockets: sessions run unchanged over sealed records
//! (large messages both ways, acks between them), the switch from plaintext lands on
//! the right byte, and a tampered record closes the connection with a clear reason.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use sluice_net::frame::Limits;
use sluice_net::secure::{Role, SecureChannel};
use sluice_net::session::{Event, Features, Handshake, Session};
use sluice_net::tcp::Connection;

const F: Features = Features { supported: 1, required: 1 };

fn socket_pair() -> (TcpStream, TcpStream) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
    let (s, _) = l.accept().unwrap();
    (c, s)
}

fn payload(i: usize) -> Vec<u8> {
    // Sizes from tiny to several records long.
    let len = [0, 1, 4095, 4097, 300 << 10, (3 << 20) + 5][i % 6];
    (0..len).map(|k| (k as u8) ^ (i as u8)).collect()
}

#[test]
fn sessions_run_over_secure_mode_with_messages_both_ways() {
    let (cs, ss) = socket_pair();
    let (mut cc, mut sc) = (Connection::new(cs).unwrap(), Connection::new(ss).unwrap());
    let secret = [42u8; 32];
    // Secure from the first byte here; the switch mid-stream is tested below.
    cc.start_secure(SecureChannel::new(&secret, Role::Client)).unwrap();
    sc.start_secure(SecureChannel::new(&secret, Role::Server)).unwrap();
    let limits = Limits::default();
    let mut client = Session::client(7, F, limits);
    client.connect(cc.out());
    let mut hs = Some(Handshake::new(F, limits, sc.out()));
    let mut server = Session::server(7, F, limits);
    const N: usize = 24;
    for i in 0..N {
        client.send(1, &[&payload(i)]).unwrap();
    }
    let (mut at_server, mut at_client) = (Vec::new(), Vec::new());
    let mut sent_back = 0;
    let end = Instant::now() + Duration::from_secs(60);
    while at_server.len() < N || at_client.len() < N {
        assert!(Instant::now() < end, "stuck at {} / {}", at_server.len(), at_client.len());
        cc.read_some().unwrap();
        let mut out = std::mem::take(cc.out());
        let used = client
            .receive(cc.input(), &mut out, |e| {
                if let Event::Message { frame, .. } = e {
                    at_client.push(sluice_net::session::payload(&frame).to_vec());
                }
            })
            .unwrap();
        *cc.out() = out;
        cc.consume(used);
        client.flush_ack(cc.out());
        cc.flush_with(&mut client).unwrap();

        sc.read_some().unwrap();
        if let Some(h) = hs.as_mut() {
            let (used, hello) = h.receive(sc.input()).unwrap();
            sc.consume(used);
            if let Some(hello) = hello {
                server.attach(&hello, sc.out()).unwrap();
                hs = None;
            }
        }
        if hs.is_none() {
            let mut out = std::mem::take(sc.out());
            let used = server
                .receive(sc.input(), &mut out, |e| {
                    if let Event::Message { frame, .. } = e {
                        at_server.push(sluice_net::session::payload(&frame).to_vec());
                    }
                })
                .unwrap();
            *sc.out() = out;
            sc.consume(used);
            // Answer each message with the same payload.
            while sent_back < at_server.len() {
                server.send(2, &[&at_server[sent_back]]).unwrap();
                sent_back += 1;
            }
            server.flush_ack(sc.out());
            sc.flush_with(&mut server).unwrap();
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    for i in 0..N {
        assert_eq!(at_server[i], payload(i), "message {i} at the server");
        assert_eq!(at_client[i], payload(i), "reply {i} at the client");
    }
}

#[test]
fn the_switch_to_secure_mode_lands_on_the_agreed_byte() {
    let (mut raw, ss) = socket_pair();
    let mut sc = Connection::new(ss).unwrap();
    let secret = [1u8; 32];
    let mut peer = SecureChannel::new(&secret, Role::Client);
    // The peer's last plaintext bytes and its first record arrive in one read.
    let mut wire = b"DONE".to_vec();
    peer.seal(b"sealed hello", &mut wire).unwrap();
    raw.write_all(&wire).unwrap();
    let end = Instant::now() + Duration::from_secs(30);
    while sc.input().len() < wire.len() {
        assert!(Instant::now() < end);
        sc.read_some().unwrap();
    }
    assert_eq!(&sc.input()[..4], b"DONE");
    sc.consume(4);
    // Our reply to the handshake is queued before the switch and goes out plain.
    sc.out().extend_from_slice(b"OK");
    sc.start_secure(SecureChannel::new(&secret, Role::Server)).unwrap();
    assert_eq!(sc.input(), b"sealed hello");
    sc.out().extend_from_slice(b"secret reply");
    assert!(sc.flush().unwrap());
    let mut got = vec![0u8; 2 + 12 + SecureChannel::overhead(12)];
    raw.read_exact(&mut got).unwrap();
    assert_eq!(&got[..2], b"OK");
    let mut plain = Vec::new();
    assert_eq!(peer.open(&mut got[2..], &mut plain).unwrap(), got.len() - 2);
    assert_eq!(plain, b"secret reply");
}

#[test]
fn a_tampered_record_closes_the_connection_with_the_reason() {
    let (mut raw, ss) = socket_pair();
    let mut sc = Connection::new(ss).unwrap();
    let secret = [3u8; 32];
    sc.start_secure(SecureChannel::new(&secret, Role::Server)).unwrap();
    let mut peer = SecureChannel::new(&secret, Role::Client);
    let mut wire = Vec::new();
    peer.seal(b"a frame, say", &mut wire).unwrap();
    wire[9] ^= 0x80;
    raw.write_all(&wire).unwrap();
    let end = Instant::now() + Duration::from_secs(30);
    let e = loop {
        assert!(Instant::now() < end, "tampering not noticed");
        match sc.read_some() {
            Ok(_) => assert!(sc.input().is_empty(), "unauthenticated plaintext handed out"),
            Err(e) => break e,
        }
        std::thread::sleep(Duration::from_millis(1));
    };
    assert_eq!(e.kind(), std::io::ErrorKind::InvalidData);
    assert!(e.to_string().contains("failed authentication"), "{e}");
}
