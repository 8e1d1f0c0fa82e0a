//! The monitor client used by OSDs, the CLI and the client library: HTTP+JSON to the
//! monitors in the order [`Selector`] chooses, failing over on errors invisibly to the
//! caller, and returning to the preferred monitor once a background probe finds it back.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reqwest::Method;
use serde::{Serialize, de::DeserializeOwned};

use crate::api::{self, ApiError, ErrorKind};
use crate::conf::{Conf, format_fsid};
use crate::monclient::{Policy, Selector};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("no monitor answered (tried {tried}); last error: {last}")]
    Unreachable { tried: String, last: String },
    #[error("{0}")]
    NoQuorum(String),
    #[error("{0}")]
    WrongFsid(String),
    #[error("{0}")]
    Rejected(String),
    #[error("authentication failed: {0}")]
    Unauthenticated(String),
    #[error("{0}")]
    PermissionDenied(String),
    #[error("{0}")]
    Other(String),
}

#[derive(Debug, Clone)]
pub struct MonClient {
    sel: Arc<Mutex<Selector>>,
    http: reqwest::Client,
    fsid: Option<String>,
    /// How long a call keeps trying (across monitors) before giving up.
    pub deadline: Duration,
    /// Per attempt.
    pub attempt_timeout: Duration,
    epoch: Instant,
    /// Credentials every request is signed with (shared by clones), once logged in.
    creds: Arc<Mutex<Option<sluice_auth::kdc::Credentials>>>,
}

impl MonClient {
    pub fn new(
        mons: Vec<String>,
        policy: Policy,
        check_interval: Duration,
        client_id: u64,
        fsid: Option<[u8; 16]>,
    ) -> MonClient {
        MonClient {
            sel: Arc::new(Mutex::new(Selector::new(mons, policy, client_id, check_interval))),
            http: reqwest::Client::builder()
                .connect_timeout(Duration::from_millis(500))
                .build()
                .expect("http client"),
            fsid: fsid.map(|f| format_fsid(&f)),
            deadline: Duration::from_secs(15),
            attempt_timeout: Duration::from_secs(8),
            epoch: Instant::now(),
            creds: Arc::new(Mutex::new(None)),
        }
    }

    /// A client of the one monitor at `addr`, signing with this client's credentials
    /// (shared: a renewal reaches it) and giving up quickly: for messages every monitor
    /// gets (PG reports), where failing over would send one monitor two copies.
    pub fn pinned(&self, addr: &str, deadline: Duration) -> MonClient {
        MonClient {
            sel: Arc::new(Mutex::new(Selector::new(
                vec![addr.to_string()],
                Policy::Static,
                0,
                Duration::from_secs(3600),
            ))),
            deadline,
            attempt_timeout: deadline,
            ..self.clone()
        }
    }

    pub fn from_conf(conf: &Conf, client_id: u64) -> MonClient {
        MonClient::new(
            conf.mon_hosts.clone(),
            conf.mon_selection,
            conf.mon_check_interval,
            client_id,
            Some(conf.fsid),
        )
    }

    /// Signs every later request (of this client and its clones) with `creds`: a
    /// cluster with authentication on serves only signed requests (mon cap `r` for
    /// reads, `w` for changes, `x` for daemons). Set again after each renewal.
    pub fn set_credentials(&self, creds: Option<sluice_auth::kdc::Credentials>) {
        *self.creds.lock().expect("lock") = creds;
    }

    pub fn has_credentials(&self) -> bool {
        self.creds.lock().expect("lock").is_some()
    }

    /// The monitor in use.
    pub fn current(&self) -> String {
        self.sel.lock().expect("lock").current().to_string()
    }

    pub fn order(&self) -> Vec<String> {
        self.sel.lock().expect("lock").order().into_iter().map(String::from).collect()
    }

    /// New policy or check interval (from central config), at runtime.
    pub fn reconfigure(&self, policy: Policy, check_interval: Duration) {
        self.sel.lock().expect("lock").reconfigure(policy, check_interval);
    }

    /// Starts the background probe of the preferred monitor (needs a tokio runtime). It
    /// stops when every clone of this client is dropped.
    pub fn start_background_check(&self) {
        let weak = Arc::downgrade(&self.sel);
        let http = self.http.clone();
        let epoch = self.epoch;
        let fsid = self.fsid.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(100)).await;
                let Some(sel) = weak.upgrade() else { return };
                let probe = {
                    let mut s = sel.lock().expect("lock");
                    let now = epoch.elapsed().as_nanos() as u64;
                    s.should_check_preferred(now).then(|| s.preferred().to_string())
                };
                let Some(addr) = probe else { continue };
                let mut req =
                    http.get(format!("http://{addr}/v1/ping")).timeout(Duration::from_millis(500));
                if let Some(f) = &fsid {
                    req = req.header(api::FSID_HEADER, f);
                }
                if req.send().await.is_ok_and(|r| r.status().is_success()) {
                    let mut s = sel.lock().expect("lock");
                    if s.preferred() == addr {
                        tracing::info!("monitor {addr} is back: returning to it");
                        s.preferred_is_back();
                    }
                }
            }
        });
    }

    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        let b = self.call(Method::GET, path, None, self.attempt_timeout).await?;
        serde_json::from_slice(&b).map_err(|e| ClientError::Other(format!("{path}: reply: {e}")))
    }

    pub async fn get_text(&self, path: &str) -> Result<String, ClientError> {
        let b = self.call(Method::GET, path, None, self.attempt_timeout).await?;
        Ok(String::from_utf8_lossy(&b).into_owned())
    }

    /// A GET whose answer may take up to `wait` (long polls).
    pub async fn get_bytes(&self, path: &str, wait: Duration) -> Result<Vec<u8>, ClientError> {
        self.call(Method::GET, path, None, wait + self.attempt_timeout).await
    }

    pub async fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, ClientError> {
        let body = serde_json::to_vec(body).expect("requests serialize");
        let b = self.call(Method::POST, path, Some(body), self.attempt_timeout).await?;
        serde_json::from_slice(&b).map_err(|e| ClientError::Other(format!("{path}: reply: {e}")))
    }

    /// Logs in as `entity` with its `secret` (the challenge and the proof may go to
    /// different monitors: any of them checks both), getting tickets for `want`. With
    /// the auth ticket of an earlier login, the global id stays the same.
    pub async fn login(
        &self,
        entity: &sluice_auth::EntityName,
        secret: &sluice_auth::Secret,
        old_ticket: Option<sluice_auth::TicketBlob>,
        want: &[sluice_auth::Service],
    ) -> Result<sluice_auth::kdc::Credentials, ClientError> {
        use sluice_auth::kdc;
        let c: kdc::ServerChallenge = self.get("/v1/auth/challenge").await?;
        let req = kdc::request_session_key(entity, secret, c, old_ticket, want);
        let reply: kdc::SessionKeyReply = self.post("/v1/auth/session", &req).await?;
        kdc::open_reply(secret, &req, &reply).map_err(|e| {
            ClientError::Unauthenticated(format!("the monitors' reply does not open: {e}"))
        })
    }

    /// A daemon's fetch of its service's rotating secrets, signed with `creds` (needs
    /// mon cap `x`).
    pub async fn fetch_rotating(
        &self,
        creds: &sluice_auth::kdc::Credentials,
        service: sluice_auth::Service,
    ) -> Result<sluice_auth::RotatingSecrets, ClientError> {
        let body = crate::mon::RotatingRequest { service };
        self.signed_sealed(creds, "/v1/auth/rotating", &body, b"rotating").await
    }

    /// Registers a new OSD with the key it made (`req.key_sealed`), signed with `creds`
    /// (needs mon 'profile bootstrap-osd' or 'allow *').
    pub async fn osd_new(
        &self,
        creds: &sluice_auth::kdc::Credentials,
        req: &crate::api::OsdNewRequest,
    ) -> Result<crate::api::OsdNewReply, ClientError> {
        self.signed_sealed(creds, "/v1/osd/new", req, b"osd-new").await
    }

    /// A request to the key database (`sluice auth ...`), signed with `creds` (needs mon
    /// cap `*`); the answer comes sealed under the session key.
    pub async fn auth_command(
        &self,
        creds: &sluice_auth::kdc::Credentials,
        op: &crate::auth::AuthOp,
    ) -> Result<crate::auth::AuthAnswer, ClientError> {
        self.signed_sealed(creds, "/v1/auth/command", op, b"auth").await
    }

    /// A POST signed with `creds` whose answer comes sealed under its session key,
    /// labelled `what` (`sluice_auth::request::seal_reply`).
    async fn signed_sealed<B: Serialize, T: DeserializeOwned>(
        &self,
        creds: &sluice_auth::kdc::Credentials,
        path: &str,
        body: &B,
        what: &[u8],
    ) -> Result<T, ClientError> {
        let body = serde_json::to_vec(body).expect("requests serialize");
        let b = self
            .call_with(Method::POST, path, Some(body), self.attempt_timeout, Some(creds))
            .await?;
        let sealed: Vec<u8> = serde_json::from_slice(&b)
            .map_err(|e| ClientError::Other(format!("{path}: reply: {e}")))?;
        sluice_auth::request::open_reply(&creds.session_key, what, &sealed).map_err(|e| {
            ClientError::Unauthenticated(format!("the monitors' reply does not open: {e}"))
        })
    }

    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
        attempt_timeout: Duration,
    ) -> Result<Vec<u8>, ClientError> {
        self.call_with(method, path, body, attempt_timeout, None).await
    }

    /// [`Self::call`] with every attempt signed with `creds` (`sluice_auth::request`: a
    /// signature is good for one attempt, so a retry is signed anew).
    async fn call_with(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
        attempt_timeout: Duration,
        creds: Option<&sluice_auth::kdc::Credentials>,
    ) -> Result<Vec<u8>, ClientError> {
        let end = Instant::now() + self.deadline;
        let n = self.sel.lock().expect("lock").order().len();
        let mut tried: Vec<String> = Vec::new();
        let mut last = String::new();
        let mut no_quorum = None;
        let mut misses = 0usize;
        loop {
            let addr = self.current();
            if !tried.contains(&addr) {
                tried.push(addr.clone());
            }
            let mut req = self
                .http
                .request(method.clone(), format!("http://{addr}{path}"))
                .timeout(attempt_timeout);
            if let Some(f) = &self.fsid {
                req = req.header(api::FSID_HEADER, f);
            }
            let stored = match creds {
                Some(_) => None,
                None => self.creds.lock().expect("lock").clone(),
            };
            if let Some(c) = creds.or(stored.as_ref()) {
                let b = body.as_deref().unwrap_or(&[]);
                let sig =
                    sluice_auth::request::sign(c, method.as_str(), path, b, crate::auth::wall_ms());
                req = req.header(sluice_auth::request::HEADER, sig);
            }
            if let Some(b) = &body {
                req = req.header("content-type", "application/json").body(b.clone());
            }
            match req.send().await {
                Err(e) => last = format!("{addr}: {e}"),
                Ok(r) => {
                    let status = r.status();
                    match r.bytes().await {
                        Err(e) => last = format!("{addr}: {e}"),
                        Ok(b) if status.is_success() => return Ok(b.to_vec()),
                        Ok(b) => match serde_json::from_slice::<ApiError>(&b) {
                            Ok(e) => match e.kind {
                                ErrorKind::NoQuorum => no_quorum = Some(e.message),
                                ErrorKind::WrongFsid => {
                                    return Err(ClientError::WrongFsid(format!(
                                        "{addr}: {}",
                                        e.message
                                    )));
                                }
                                ErrorKind::Rejected | ErrorKind::BadRequest => {
                                    return Err(ClientError::Rejected(e.message));
                                }
                                ErrorKind::Unauthenticated => {
                                    return Err(ClientError::Unauthenticated(e.message));
                                }
                                ErrorKind::PermissionDenied => {
                                    return Err(ClientError::PermissionDenied(e.message));
                                }
                                ErrorKind::Internal => {
                                    return Err(ClientError::Other(format!(
                                        "{addr}: {}",
                                        e.message
                                    )));
                                }
                            },
                            Err(_) => {
                                last = format!("{addr}: {status}: {}", String::from_utf8_lossy(&b))
                            }
                        },
                    }
                }
            }
            // This monitor failed us: the next one in order.
            self.sel.lock().expect("lock").failed();
            misses += 1;
            if Instant::now() >= end {
                return Err(match no_quorum {
                    Some(m) => ClientError::NoQuorum(m),
                    None => ClientError::Unreachable { tried: tried.join(", "), last },
                });
            }
            if misses.is_multiple_of(n) {
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
    }
}
