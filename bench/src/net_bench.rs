//! `sluice-bench net`: the null network, the baseline for everything that crosses a socket.
//!
//! A client thread sends requests of `--size` bytes over one loopback TCP connection to a
//! server thread in this process, which reads each request whole and answers with a
//! 16-byte reply; `--qd` requests are kept in flight. Both ends use blocking sockets, so
//! a side with nothing to do sleeps in the kernel and is woken by the other: what a
//! client and a parked reactor pay. No store, no decoding, no Sluice code: with a small
//! `--size` at QD1 this is the loopback round trip that issue 5's latency bar adds to
//! the device; with `--size 4M` it is the most any server could take in over loopback
//! on this machine.
//!
//! With `--secure` both ends seal what they send as secure mode does
//! (`sluice_net::secure`: AES-128-GCM records under keys from a per-connection secret)
//! and open what they receive: the cost of secure mode on the wire, beside crc mode's
//! zero.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Args;
use serde_json::json;
use sluice_vocab::{ByteSize, parse_duration};

use sluice_net::secure::{Role, SecureChannel};

use crate::progress::Progress;
use crate::report::{OpResults, Report, Results, new_histogram, process_cpu_time, unix_now_s};

#[derive(Debug, Clone, Args)]
pub struct NetArgs {
    /// Bytes per request (the reply is 16 bytes).
    #[arg(long, default_value = "64")]
    pub size: ByteSize,
    /// Requests kept in flight on the connection.
    #[arg(long, default_value_t = 1)]
    pub qd: u32,
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub runtime: Duration,
    #[arg(long)]
    pub json: Option<std::path::PathBuf>,
    #[arg(long)]
    pub quiet: bool,
    /// Seal both directions as secure mode does (AES-128-GCM records).
    #[arg(long)]
    pub secure: bool,
}

/// One end's stream: plain, or sealed records as secure mode sends them.
struct Wire {
    s: TcpStream,
    chan: Option<SecureChannel>,
    /// Opened plaintext not consumed yet (secure mode), from `at`.
    plain: Vec<u8>,
    at: usize,
    raw: Vec<u8>,
    sealed: Vec<u8>,
}

impl Wire {
    fn new(s: TcpStream, secret: Option<(&[u8; 32], Role)>) -> Wire {
        let chan = secret.map(|(k, role)| SecureChannel::new(k, role));
        Wire { s, chan, plain: Vec::new(), at: 0, raw: Vec::new(), sealed: Vec::new() }
    }

    fn write_all(&mut self, b: &[u8]) -> std::io::Result<()> {
        match &mut self.chan {
            None => self.s.write_all(b),
            Some(c) => {
                self.sealed.clear();
                c.seal(b, &mut self.sealed)?;
                self.s.write_all(&self.sealed)
            }
        }
    }

    fn read_exact(&mut self, out: &mut [u8]) -> std::io::Result<()> {
        let Some(c) = &mut self.chan else { return self.s.read_exact(out) };
        while self.plain.len() - self.at < out.len() {
            let mut chunk = [0u8; 64 << 10];
            let n = self.s.read(&mut chunk)?;
            if n == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            self.raw.extend_from_slice(&chunk[..n]);
            if self.at > 0 {
                self.plain.drain(..self.at);
                self.at = 0;
            }
            let used = c.open(&mut self.raw, &mut self.plain)?;
            self.raw.drain(..used);
        }
        out.copy_from_slice(&self.plain[self.at..self.at + out.len()]);
        self.at += out.len();
        Ok(())
    }
}

/// Request header: length (u32 LE), then a sequence number (u32 LE).
const HEADER: usize = 8;
const REPLY: usize = 16;

fn serve(mut s: Wire) -> std::io::Result<u64> {
    let mut head = [0u8; HEADER];
    let mut body = Vec::new();
    let mut served = 0;
    loop {
        match s.read_exact(&mut head) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(served),
            Err(e) => return Err(e),
        }
        let len = u32::from_le_bytes(head[..4].try_into().expect("4 bytes")) as usize;
        body.resize(len, 0);
        s.read_exact(&mut body)?;
        let mut reply = [0u8; REPLY];
        reply[..4].copy_from_slice(&head[4..]);
        s.write_all(&reply)?;
        served += 1;
    }
}

pub fn run(args: NetArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.qd >= 1, "--qd must be at least 1");
    let size = usize::try_from(args.size.0).ok().filter(|&s| s <= u32::MAX as usize);
    let size = size.context("--size must fit in 32 bits")?;
    let listener = TcpListener::bind("127.0.0.1:0").context("binding a loopback listener")?;
    let addr = listener.local_addr()?;
    // Both ends are in this process, so the connection secret the handshake would agree
    // on is simply shared.
    let secret = args.secure.then(|| *sluice_auth::Secret::generate().as_bytes());
    let server = std::thread::Builder::new().name("net-server".into()).spawn(move || {
        let (s, _) = listener.accept()?;
        s.set_nodelay(true)?;
        serve(Wire::new(s, secret.as_ref().map(|k| (k, Role::Server))))
    })?;
    let s = TcpStream::connect(addr).with_context(|| format!("connecting to {addr}"))?;
    s.set_nodelay(true)?;
    let mut s = Wire::new(s, secret.as_ref().map(|k| (k, Role::Client)));
    let mut req = vec![0x5au8; HEADER + size];
    req[..4].copy_from_slice(&(size as u32).to_le_bytes());
    let qd = args.qd as usize;
    let ios = Arc::new(AtomicU64::new(0));
    let progress = (!args.quiet).then(|| Progress::start("net", Arc::clone(&ios), size as u64));
    let mut hist = new_histogram();
    let mut sent_at = vec![Instant::now(); qd];
    let mut send = |s: &mut Wire, seq: u32, sent_at: &mut [Instant]| -> std::io::Result<()> {
        req[4..8].copy_from_slice(&seq.to_le_bytes());
        sent_at[seq as usize % qd] = Instant::now();
        s.write_all(&req)
    };
    let cpu0 = process_cpu_time();
    let start = Instant::now();
    let mut seq = 0u32;
    for _ in 0..qd {
        send(&mut s, seq, &mut sent_at)?;
        seq = seq.wrapping_add(1);
    }
    let mut reply = [0u8; REPLY];
    let mut done = 0u64;
    while start.elapsed() < args.runtime {
        s.read_exact(&mut reply).context("reading a reply")?;
        let got = u32::from_le_bytes(reply[..4].try_into().expect("4 bytes"));
        let rt = sent_at[got as usize % qd].elapsed();
        let _ = hist.record((rt.as_nanos() as u64).max(100));
        done += 1;
        ios.store(done, Ordering::Relaxed);
        send(&mut s, seq, &mut sent_at)?;
        seq = seq.wrapping_add(1);
    }
    let elapsed = start.elapsed();
    // Drain the requests still in flight, then close: the server ends at end of stream.
    for _ in 0..qd {
        s.read_exact(&mut reply).context("reading a reply")?;
    }
    let cpu = process_cpu_time() - cpu0;
    drop(s);
    let served = server.join().map_err(|_| anyhow::anyhow!("the server thread panicked"))??;
    anyhow::ensure!(
        served == done + qd as u64,
        "server answered {served}, client sent {}",
        done + qd as u64
    );
    drop(progress);
    let all = OpResults::from_histogram(&hist, elapsed, size as u64);
    let results = Results::new(&all, elapsed, cpu, 0.0, 0);
    let config = json!({
        "size": size, "qd": args.qd, "runtime_s": args.runtime.as_secs_f64(),
        "transport": "kernel TCP over loopback, blocking sockets, TCP_NODELAY",
        "mode": if args.secure { "secure (AES-128-GCM records)" } else { "plain" },
    });
    let report = Report::new("net", std::path::Path::new("/"), unix_now_s(), config, results);
    report.print_table();
    println!("(both ends in this process: cpu us/io counts the client and the server)");
    report.finish(args.json.as_deref(), "errors")
}
