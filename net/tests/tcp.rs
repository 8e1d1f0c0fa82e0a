//! The TCP transport on loopback: a connection cut mid-stream loses and duplicates
//! nothing; garbage, truncated and oversized frames close that connection with a reason
//! while the server keeps serving others. States are awaited with generous deadlines.

use std::io::Write;
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use sluice_net::frame::{self, Limits};
use sluice_net::session::{self, Event, Features};
use sluice_net::tcp::{ClientConn, Server, ServerEvent};

const F: Features = Features { supported: 1, required: 1 };

enum Seen {
    Msg(u64, u64, Vec<u8>),
    Closed(String),
}

/// Messages of this type are echoed back to their sender.
const ECHO: u16 = 9;

/// A server polled on its own thread until `stop`.
fn server(limits: Limits) -> (std::net::SocketAddr, mpsc::Receiver<Seen>, Arc<AtomicBool>) {
    let mut s = Server::bind("127.0.0.1:0".parse().unwrap(), F, limits).unwrap();
    let addr = s.local_addr().unwrap();
    let (tx, rx) = mpsc::channel();
    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = Arc::clone(&stop);
    std::thread::spawn(move || {
        let mut echoes = Vec::new();
        while !stop2.load(Ordering::Relaxed) {
            let busy = s.poll(|e| {
                let _ = tx.send(match e {
                    ServerEvent::Message { cookie, seq, payload, msg_type, .. } => {
                        if msg_type == ECHO {
                            echoes.push((cookie, payload.to_vec()));
                        }
                        Seen::Msg(cookie, seq, payload.to_vec())
                    }
                    ServerEvent::Closed { reason, .. } => Seen::Closed(reason),
                });
            });
            for (cookie, p) in echoes.drain(..) {
                s.send(cookie, ECHO, &p).expect("the session exists");
            }
            if !busy {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    });
    (addr, rx, stop)
}

/// Polls until everything sent is acked, reconnecting after errors if `reconnect` (else
/// an error fails the test).
fn until_acked(c: &mut ClientConn, reconnect: bool, mut on: impl FnMut(Event<'_>)) {
    let end = Instant::now() + Duration::from_secs(60);
    while c.session.unacked() > 0 {
        assert!(Instant::now() < end, "{} messages never acked", c.session.unacked());
        if !c.connected() {
            c.connect().unwrap();
        }
        let r = c.poll(&mut on);
        assert!(reconnect || r.is_ok(), "{r:?}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn payload(i: usize) -> Vec<u8> {
    let len = (i * 7919) % 5000;
    (0..len).map(|j| (i + j) as u8).collect()
}

#[test]
fn cuts_mid_stream_lose_and_duplicate_nothing() {
    let (addr, rx, stop) = server(Limits::DEFAULT);
    let mut c = ClientConn::new(addr, 77, F, Limits::DEFAULT);
    c.connect().unwrap();
    let n = 3000;
    let mut seed = 0x1234_5678u64;
    let mut cuts = 0;
    for i in 0..n {
        c.send(1, &payload(i)).unwrap();
        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        if (seed >> 33).is_multiple_of(150) {
            // Cut with whatever is in flight either way, then reconnect.
            c.cut();
            cuts += 1;
            c.connect().unwrap();
        }
        if c.poll(|_| {}).is_err() {
            c.connect().unwrap();
        }
    }
    until_acked(&mut c, true, |_| {});
    stop.store(true, Ordering::Relaxed);
    let mut got = Vec::new();
    while let Ok(s) = rx.recv_timeout(Duration::from_secs(1)) {
        if let Seen::Msg(cookie, seq, p) = s {
            assert_eq!(cookie, 77);
            got.push((seq, p));
        }
    }
    assert!(cuts >= 5, "the test cut only {cuts} times");
    assert_eq!(got.len(), n, "lost or duplicated messages");
    for (i, (seq, p)) in got.iter().enumerate() {
        assert_eq!(*seq, i as u64 + 1);
        assert_eq!(p, &payload(i), "message {i} damaged");
    }
}

#[test]
fn bad_input_closes_only_that_connection() {
    let limits = Limits { max_segment_bytes: 1 << 20, max_frame_bytes: 1 << 20 };
    let (addr, rx, stop) = server(limits);
    let mut good = ClientConn::new(addr, 5, F, limits);
    good.connect().unwrap();

    let mut reasons = Vec::new();
    let mut wait_closed = |what: &str| {
        let end = Instant::now() + Duration::from_secs(30);
        loop {
            let left = end.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(Seen::Closed(r)) => {
                    reasons.push(r.clone());
                    return r;
                }
                Ok(Seen::Msg(..)) => {}
                Err(_) => panic!("{what}: the connection was never closed"),
            }
        }
    };
    // Garbage.
    let mut g = TcpStream::connect(addr).unwrap();
    g.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
    let r = wait_closed("garbage");
    assert!(r.contains("not a Sluice frame"), "{r}");
    // An oversized frame: refused from its preamble.
    let mut big = Vec::new();
    frame::encode(&mut big, 1, 0, &[&vec![0u8; (1 << 20) + 1]], &Limits::DEFAULT).unwrap();
    let mut o = TcpStream::connect(addr).unwrap();
    o.write_all(&big[..frame::PREAMBLE_BYTES]).unwrap();
    let r = wait_closed("oversized");
    assert!(r.contains("exceeds the limit"), "{r}");
    // Truncated: half a valid frame, then the peer goes away.
    let mut small = Vec::new();
    frame::encode(&mut small, 1, 0, &[b"hello"], &Limits::DEFAULT).unwrap();
    let mut t = TcpStream::connect(addr).unwrap();
    t.write_all(&small[..small.len() / 2]).unwrap();
    drop(t);
    let r = wait_closed("truncated");
    assert!(r.contains("peer closed"), "{r}");
    drop((g, o));

    // The good client was served throughout.
    for i in 0..50 {
        good.send(2, &payload(i)).unwrap();
    }
    until_acked(&mut good, false, |_| {});
    stop.store(true, Ordering::Relaxed);
}

#[test]
fn payloads_of_every_awkward_size_arrive_intact() {
    let (addr, rx, stop) = server(Limits::DEFAULT);
    let mut c = ClientConn::new(addr, 9, F, Limits::DEFAULT);
    c.connect().unwrap();
    let sizes = [0usize, 1, 4095, 4096, 4097, (4 << 20) + 1, 3];
    for (i, &n) in sizes.iter().enumerate() {
        let p: Vec<u8> = (0..n).map(|j| (j * 31 + i) as u8).collect();
        c.send(3, &p).unwrap();
    }
    until_acked(&mut c, false, |_| {});
    stop.store(true, Ordering::Relaxed);
    let got: Vec<Vec<u8>> = std::iter::from_fn(|| rx.recv_timeout(Duration::from_secs(1)).ok())
        .map(|s| match s {
            Seen::Msg(_, _, p) => p,
            Seen::Closed(r) => panic!("closed: {r}"),
        })
        .collect();
    assert_eq!(got.len(), sizes.len());
    for (i, (&n, p)) in sizes.iter().zip(&got).enumerate() {
        assert_eq!(p.len(), n);
        assert!(p.iter().enumerate().all(|(j, &b)| b == (j * 31 + i) as u8), "message {i}");
    }
}

/// The server's sends to a client survive cuts too: every echo comes back once, in order.
#[test]
fn server_sends_survive_cuts() {
    let (addr, _rx, stop) = server(Limits::DEFAULT);
    let mut c = ClientConn::new(addr, 31, F, Limits::DEFAULT);
    c.connect().unwrap();
    let echoed: std::cell::RefCell<Vec<Vec<u8>>> = Default::default();
    let mut keep = |e: Event<'_>| {
        if let Event::Message { frame, msg_type: ECHO, .. } = e {
            echoed.borrow_mut().push(session::payload(&frame).to_vec());
        }
    };
    let n = 500;
    for i in 0..n {
        c.send(ECHO, &payload(i)).unwrap();
        if i % 97 == 50 {
            c.cut();
            c.connect().unwrap();
        }
        if c.poll(&mut keep).is_err() {
            c.connect().unwrap();
        }
    }
    until_acked(&mut c, true, &mut keep);
    let end = Instant::now() + Duration::from_secs(60);
    while echoed.borrow().len() < n {
        assert!(Instant::now() < end, "{} of {n} echoes came back", echoed.borrow().len());
        if !c.connected() {
            c.connect().unwrap();
        }
        let _ = c.poll(&mut keep);
        std::thread::sleep(Duration::from_millis(1));
    }
    stop.store(true, Ordering::Relaxed);
    let echoed = echoed.into_inner();
    assert_eq!(echoed.len(), n, "duplicated echoes");
    for (i, p) in echoed.iter().enumerate() {
        assert_eq!(p, &payload(i), "echo {i}");
    }
}

/// Polls a server and a client in turn until `done` (or a generous deadline).
fn pump(
    s: &mut Server,
    c: &mut ClientConn,
    got: &mut Vec<(u64, Vec<u8>)>,
    events: &mut Vec<String>,
    done: impl Fn(&Vec<(u64, Vec<u8>)>, &ClientConn) -> bool,
) {
    let end = Instant::now() + Duration::from_secs(60);
    while !done(got, c) {
        assert!(Instant::now() < end, "stuck: got {:?}, events {events:?}", got.len());
        s.poll(|e| {
            if let ServerEvent::Message { seq, payload, .. } = e {
                got.push((seq, payload.to_vec()));
            }
        });
        if !c.connected() {
            c.connect().unwrap();
        }
        let _ = c.poll(|e| match e {
            Event::Reset { resent } => events.push(format!("reset {resent}")),
            Event::Ready { .. } => events.push("ready".into()),
            _ => {}
        });
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn a_server_that_forgot_the_session_gets_the_unacked_messages_again() {
    let mut s = Server::bind("127.0.0.1:0".parse().unwrap(), F, Limits::DEFAULT).unwrap();
    let addr = s.local_addr().unwrap();
    let mut c = ClientConn::new(addr, 5, F, Limits::DEFAULT);
    let (mut got, mut events) = (Vec::new(), Vec::new());
    for i in 1..=3u8 {
        c.send(1, &[i]).unwrap();
    }
    pump(&mut s, &mut c, &mut got, &mut events, |g, c| g.len() == 3 && c.session.unacked() == 0);
    assert_eq!(events, ["ready"]);
    // Two more the server never reads: then it restarts (a new process, same port).
    c.send(1, &[4]).unwrap();
    c.send(1, &[5]).unwrap();
    let _ = c.poll(|_| {});
    drop(s);
    let mut s = Server::bind(addr, F, Limits::DEFAULT).unwrap();
    got.clear();
    pump(&mut s, &mut c, &mut got, &mut events, |g, c| g.len() == 2 && c.session.unacked() == 0);
    assert_eq!(got, vec![(1, vec![4]), (2, vec![5])], "renumbered from 1, in order");
    assert!(events.iter().any(|e| e == "reset 2"), "{events:?}");
    // The new session then works as any other.
    c.send(1, &[6]).unwrap();
    pump(&mut s, &mut c, &mut got, &mut events, |g, _| g.len() == 3);
    assert_eq!(got[2], (3, vec![6]));
}

#[test]
fn expired_sessions_are_forgotten_and_reset_on_return() {
    let mut s = Server::bind("127.0.0.1:0".parse().unwrap(), F, Limits::DEFAULT).unwrap();
    let addr = s.local_addr().unwrap();
    let mut c = ClientConn::new(addr, 6, F, Limits::DEFAULT);
    let (mut got, mut events) = (Vec::new(), Vec::new());
    c.send(1, b"a").unwrap();
    pump(&mut s, &mut c, &mut got, &mut events, |g, c| g.len() == 1 && c.session.unacked() == 0);
    assert_eq!(s.expire_idle(Instant::now(), Duration::ZERO), 0, "connected: kept");
    c.cut();
    let end = Instant::now() + Duration::from_secs(30);
    while s.connections() > 0 {
        assert!(Instant::now() < end);
        s.poll(|_| {});
    }
    assert_eq!(
        s.expire_idle(Instant::now() + Duration::from_secs(3600), Duration::from_secs(60)),
        1
    );
    assert_eq!(s.sessions(), 0);
    c.send(1, b"b").unwrap();
    pump(&mut s, &mut c, &mut got, &mut events, |g, _| g.len() == 2);
    assert_eq!(got[1], (1, b"b".to_vec()));
    assert!(events.iter().any(|e| e.starts_with("reset")), "{events:?}");
}

/// Messages larger than the socket buffers go out in pieces, straight from the session's
/// buffer, both ways at once; the acks generated meanwhile must never land inside a
/// message frame (the test fails if `Session::unsent_in_frame` is ignored). Sent as pieces (a header and the data), echoed back whole.
#[test]
fn large_messages_both_ways_interleave_with_control_frames_intact() {
    let (addr, rx, stop) = server(Limits::DEFAULT);
    let mut c = ClientConn::new(addr, 91, F, Limits::DEFAULT);
    c.connect().unwrap();
    let big =
        |i: usize| -> Vec<u8> { (0..(3 << 20) + i * 4099).map(|j| (j * 31 + i) as u8).collect() };
    let n = 12;
    let mut echoed = Vec::new();
    let mut sent = 0;
    let end = Instant::now() + Duration::from_secs(120);
    while echoed.len() < n {
        assert!(Instant::now() < end, "only {} of {n} echoes came back", echoed.len());
        if sent < n && c.session.unacked() < 4 {
            let data = big(sent);
            let head = (sent as u64).to_le_bytes();
            c.send_parts(ECHO, &[&head, &data]).unwrap();
            sent += 1;
        }
        c.poll(|e| {
            if let Event::Message { frame, .. } = e {
                echoed.push(session::payload(&frame).to_vec());
            }
        })
        .expect("the connection stays up");
    }
    for (i, e) in echoed.iter().enumerate() {
        assert_eq!(e[..8], (i as u64).to_le_bytes(), "echo {i} out of order");
        assert!(e[8..] == big(i)[..], "echo {i} damaged");
    }
    stop.store(true, Ordering::Relaxed);
    let closed: Vec<String> = rx
        .try_iter()
        .filter_map(|s| if let Seen::Closed(r) = s { Some(r) } else { None })
        .collect();
    assert!(closed.is_empty(), "connections closed: {closed:?}");
}

#[test]
fn a_non_blocking_connect_delivers_once_connected_and_reports_a_refusal_at_poll() {
    let (addr, rx, stop) = server(Limits::DEFAULT);
    let mut c = ClientConn::new(addr, 91, F, Limits::DEFAULT);
    // Queued before the connection exists, sent once the socket connects.
    for i in 0..50 {
        c.send(1, &payload(i)).unwrap();
    }
    c.connect_nonblocking().unwrap();
    let end = Instant::now() + Duration::from_secs(60);
    while c.session.unacked() > 0 {
        assert!(Instant::now() < end, "{} messages never acked", c.session.unacked());
        c.poll(|_| {}).unwrap();
        std::thread::sleep(Duration::from_millis(1));
    }
    let mut got = Vec::new();
    while got.len() < 50 {
        match rx.recv_timeout(Duration::from_secs(30)).expect("a message") {
            Seen::Msg(_, _, p) => got.push(p),
            Seen::Closed(why) => panic!("closed: {why}"),
        }
    }
    assert!(got.iter().enumerate().all(|(i, p)| *p == payload(i)));
    stop.store(true, Ordering::Relaxed);

    // Nobody listens on a port just released: the refusal shows at poll, not at connect.
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let mut c = ClientConn::new(free, 92, F, Limits::DEFAULT);
    c.send(1, b"x").unwrap();
    c.connect_nonblocking().unwrap();
    let end = Instant::now() + Duration::from_secs(30);
    loop {
        assert!(Instant::now() < end, "a refused connection was never reported");
        if c.poll(|_| {}).is_err() {
            break;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    assert!(!c.connected(), "the failed connection is dropped");
    assert_eq!(c.session.unacked(), 1, "the message is kept for the next connection");
}

#[test]
fn a_non_blocking_connect_leaves_from_the_local_address_it_is_given() {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mut c = ClientConn::new(l.local_addr().unwrap(), 93, F, Limits::DEFAULT);
    let ip: std::net::IpAddr = "127.0.0.5".parse().unwrap();
    c.set_local_ip(Some(ip));
    c.connect_nonblocking().unwrap();
    let (_s, peer) = l.accept().unwrap();
    assert_eq!(peer.ip(), ip);
}
