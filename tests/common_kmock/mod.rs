//! The emulated API server of the end-to-end tests: kmock 0.8 with the repository's
//! extension (`tests/kmock/portico_kmock.py`), started on 127.0.0.1 on a free port and
//! stopped on drop. `scripts/bootstrap.sh` installs kmock pinned in a virtual environment
//! at `/opt/portico-kmock` (override with `PORTICO_KMOCK_PYTHON`).

#![allow(dead_code, reason = "each test file uses some of the helpers")]

use std::io::{BufRead as _, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use kube::{Client, Config};

/// Python of the virtual environment with kmock.
pub const DEFAULT_PYTHON: &str = "/opt/portico-kmock/bin/python";

/// A running emulator.
pub struct Kmock {
    child: Child,
    /// Its port on 127.0.0.1.
    pub port: u16,
}

impl Kmock {
    /// Starts the emulator and waits until it listens.
    ///
    /// # Panics
    /// kmock is not installed (run `scripts/bootstrap.sh`) or does not start.
    pub fn start() -> Self {
        Self::start_with(|p| Command::new(p))
    }

    /// Python of kmock's virtual environment.
    #[must_use]
    pub fn python() -> String {
        std::env::var("PORTICO_KMOCK_PYTHON").unwrap_or_else(|_| DEFAULT_PYTHON.to_owned())
    }

    /// Starts the emulator through `command` (e.g. inside a network namespace), listening
    /// on that namespace's 127.0.0.1.
    ///
    /// # Panics
    /// As [`Kmock::start`].
    pub fn start_with(command: impl FnOnce(&str) -> Command) -> Self {
        Self::spawn(command, &[])
    }

    /// Starts the emulator recording every request, as one JSON line, into `file` (who
    /// sent it and what kube-apiserver's authorizer would see: `tests/kmock/portico_kmock.py`).
    ///
    /// # Panics
    /// As [`Kmock::start`].
    pub fn start_recording(file: &std::path::Path) -> Self {
        Self::spawn(
            |p| Command::new(p),
            &["--record".as_ref(), file.as_os_str()],
        )
    }

    fn spawn(command: impl FnOnce(&str) -> Command, args: &[&std::ffi::OsStr]) -> Self {
        let python = Self::python();
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/kmock/portico_kmock.py");
        let mut child = command(&python)
            .arg(script)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start {python} (kmock's virtual environment; run scripts/bootstrap.sh): {e}")
            });
        let stdout = child.stdout.take().unwrap();
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("reading kmock's first line");
        let port = line
            .trim()
            .strip_prefix("listening on ")
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| {
                let _ = child.kill();
                panic!("kmock did not start (is kmock 0.8 installed for {python}?): {line:?}")
            });
        Kmock { child, port }
    }

    /// Its URL.
    #[must_use]
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// A kubeconfig that points at it (plain HTTP, no credentials).
    #[must_use]
    pub fn kubeconfig(&self) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters: [{{name: kmock, cluster: {{server: \"{}\"}}}}]\n\
             users: [{{name: test, user: {{}}}}]\n\
             contexts: [{{name: kmock, context: {{cluster: kmock, user: test, namespace: default}}}}]\n\
             current-context: kmock\n",
            self.url()
        )
    }

    /// A client of it.
    pub fn client(&self) -> Client {
        Client::try_from(self.config()).expect("a client of kmock")
    }

    /// A client of it that authenticates as `user` (a bearer token with the user name,
    /// which a recording kmock writes down with each request).
    pub fn client_as(&self, user: &str) -> Client {
        let mut config = self.config();
        config.headers.push((
            http::header::AUTHORIZATION,
            http::HeaderValue::from_str(&format!("Bearer {user}")).unwrap(),
        ));
        Client::try_from(config).expect("a client of kmock")
    }

    fn config(&self) -> Config {
        let mut config = Config::new(self.url().parse().unwrap());
        config.default_namespace = "default".into();
        config.read_timeout = Some(Duration::from_secs(300));
        config
    }
}

impl Drop for Kmock {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `check` every 50 ms for up to `secs` seconds.
///
/// # Panics
/// `check` never returned `Some`.
pub async fn eventually<T, F, Fut>(secs: u64, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {secs} s waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Logs to the test's output (`RUST_LOG`, default warnings).
pub fn init_logs() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .try_init();
}

/// Creates any object from its JSON (kind → plural by the usual English rule, with the
/// exceptions the tests use).
///
/// # Panics
/// The API refuses it.
pub async fn create_json(client: &Client, obj: serde_json::Value) {
    use kube::api::{DynamicObject, PostParams};
    use kube::core::{ApiResource, GroupVersionKind};
    use kube::Api;
    let api_version = obj["apiVersion"].as_str().unwrap();
    let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
    let kind = obj["kind"].as_str().unwrap();
    let plural = match kind {
        "BGPPeer" => "bgppeers".to_owned(),
        "BGPAdvertisement" => "bgpadvertisements".to_owned(),
        "GatewayClass" => "gatewayclasses".to_owned(),
        k => format!("{}s", k.to_lowercase()),
    };
    let ar =
        ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(group, version, kind), &plural);
    let o: DynamicObject = serde_json::from_value(obj.clone()).unwrap();
    let api: Api<DynamicObject> = match obj["metadata"]["namespace"].as_str() {
        Some(ns) => Api::namespaced_with(client.clone(), ns, &ar),
        None => Api::all_with(client.clone(), &ar),
    };
    api.create(&PostParams::default(), &o)
        .await
        .unwrap_or_else(|e| panic!("creating {kind}: {e}"));
}

/// An IPv4 EndpointSlice `name` of Service `service` in `shop` with one TCP port `http` on
/// 8080 and a ready endpoint per (address, node).
#[must_use]
pub fn web_endpoints(name: &str, service: &str, endpoints: &[(&str, &str)]) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": name, "namespace": "shop",
                     "labels": {"kubernetes.io/service-name": service}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": endpoints.iter().map(|(a, n)| serde_json::json!(
            {"addresses": [a], "nodeName": n, "conditions": {"ready": true}})).collect::<Vec<_>>(),
    })
}
