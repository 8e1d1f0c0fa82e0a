//! The live progress line: once a second, the throughput of the last second, on stderr.

use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Prints progress until dropped.
#[derive(Debug)]
pub struct Progress {
    stop: Arc<AtomicBool>,
    join: Option<JoinHandle<()>>,
}

impl Progress {
    /// `ios` is a counter the workload increments; `bytes_per_io` converts it to MB/s.
    pub fn start(what: &'static str, ios: Arc<AtomicU64>, bytes_per_io: u64) -> Progress {
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = Arc::clone(&stop);
        let join = std::thread::spawn(move || {
            let t0 = Instant::now();
            let mut last = (Instant::now(), ios.load(Ordering::Relaxed));
            while !stop2.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(50));
                let now = Instant::now();
                if now.duration_since(last.0) < Duration::from_secs(1) {
                    continue;
                }
                let n = ios.load(Ordering::Relaxed);
                let secs = now.duration_since(last.0).as_secs_f64();
                let iops = (n - last.1) as f64 / secs;
                eprint!(
                    "\r[{what} {:>4.0}s] {:>9.0} IOPS {:>9.1} MB/s   ",
                    t0.elapsed().as_secs_f64(),
                    iops,
                    iops * bytes_per_io as f64 / 1e6
                );
                let _ = std::io::stderr().flush();
                last = (now, n);
            }
            eprintln!();
        });
        Progress { stop, join: Some(join) }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(j) = self.join.take() {
            let _ = j.join();
        }
    }
}
