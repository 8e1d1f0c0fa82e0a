//! The monitor client against real HTTP servers: selection policies, failover, return to
//! the preferred monitor, and a policy change at runtime. States are awaited, never
//! elapsed times asserted.

use std::time::{Duration, Instant};

use axum::Router;
use axum::routing::get;
use sluice_control::api::Ping;
use sluice_control::client::{ClientError, MonClient};
use sluice_control::monclient::Policy;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

struct Server {
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

async fn serve(listener: TcpListener, name: &'static str) -> Server {
    let app = Router::new().route(
        "/v1/ping",
        get(move || async move { axum::Json(Ping { name: name.into(), fsid: String::new() }) }),
    );
    let (tx, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async {
                let _ = rx.await;
            })
            .await
            .unwrap();
    });
    Server { stop: Some(tx), task }
}

impl Server {
    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        self.task.await.unwrap();
    }
}

async fn who(c: &MonClient) -> String {
    c.get::<Ping>("/v1/ping").await.unwrap().name
}

async fn wait_current(c: &MonClient, addr: &str) {
    let end = Instant::now() + Duration::from_secs(30);
    while c.current() != addr {
        assert!(Instant::now() < end, "client never moved to {addr} (at {})", c.current());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policies_failover_and_return_to_the_preferred_monitor() {
    let names = ["m0", "m1", "m2"];
    let mut servers = Vec::new();
    let mut addrs = Vec::new();
    for n in names {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        addrs.push(l.local_addr().unwrap().to_string());
        servers.push(Some(serve(l, n).await));
    }
    let interval = Duration::from_millis(200);

    // static: in order.
    let c = MonClient::new(addrs.clone(), Policy::Static, interval, 7, None);
    c.start_background_check();
    assert_eq!(who(&c).await, "m0");

    // roundrobin: rotated by the client id; shuffle: the selector's permutation.
    let rr = MonClient::new(addrs.clone(), Policy::RoundRobin, interval, 1, None);
    assert_eq!(who(&rr).await, "m1");
    let rr2 = MonClient::new(addrs.clone(), Policy::RoundRobin, interval, 5, None);
    assert_eq!(who(&rr2).await, "m2");
    for id in 0..6 {
        let sh = MonClient::new(addrs.clone(), Policy::Shuffle, interval, id, None);
        let first = sh.order()[0].clone();
        let i = addrs.iter().position(|a| *a == first).unwrap();
        assert_eq!(who(&sh).await, names[i]);
    }

    // The preferred monitor dies: callers do not notice, the client fails over in order.
    servers[0].take().unwrap().stop().await;
    assert_eq!(who(&c).await, "m1");
    assert_eq!(c.current(), addrs[1]);

    // It comes back on the same address: the background check returns the client to it.
    let l = TcpListener::bind(&addrs[0]).await.unwrap();
    servers[0] = Some(serve(l, "m0").await);
    wait_current(&c, &addrs[0]).await;
    assert_eq!(who(&c).await, "m0");

    // Policy changed at runtime (as from central config): the client keeps its monitor,
    // then the background check takes it to its new preferred one (roundrobin, id 7 -> m1).
    c.reconfigure(Policy::RoundRobin, interval);
    assert_eq!(c.order()[0], addrs[1]);
    wait_current(&c, &addrs[1]).await;
    assert_eq!(who(&c).await, "m1");

    // Everyone down: a clear error naming what was tried, after the deadline.
    for s in servers.iter_mut() {
        s.take().unwrap().stop().await;
    }
    let mut c = c;
    c.deadline = Duration::from_secs(1);
    match c.get::<Ping>("/v1/ping").await {
        Err(ClientError::Unreachable { tried, .. }) => {
            for a in &addrs {
                assert!(tried.contains(a.as_str()), "{tried}");
            }
        }
        other => panic!("expected Unreachable, got {other:?}"),
    }
}
