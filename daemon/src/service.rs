//! culvertd as a service: what it serves ([`Work`]), told from outside to stop or reload
//! ([`Signal`]), with one shutdown for everything under it.
//!
//! `main` parses the arguments, loads and checks the configuration, binds what needs binding,
//! drops privileges, turns Unix signals into [`Signal`]s and calls [`run`]. Everything after that
//! is here, so it can be tested in-process without signals or a terminal.
//!
//! One cancellation tree: the root [`Shutdown`] goes to [`Work`]; the notification loop gives
//! each tunnel a child of it (cancelled alone when a newer token replaces that tunnel); each
//! tunnel closes its relay session on `hard`, which ends every connection of that session.
//! `drain` stops new connections and reconnects and lets the open connections finish.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use culvert_appliance::systemd;
use tokio::sync::mpsc;
use tracing::{error, info, warn};

use crate::config;
use crate::gateway::{RelayLink, Shutdown, TunnelArgs, TunnelError, run_tunnel};
use crate::metrics::Metrics;
use crate::notify;
use crate::rules::Gateway;

/// What the outside world asks of a running culvertd.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Signal {
    /// SIGTERM / SIGINT: drain, then stop; a second one stops at once.
    Stop,
    /// SIGHUP: read the configuration file again.
    Reload,
}

/// What culvertd serves.
pub enum Work {
    /// One tunnel, its destination token given by hand.
    Tunnel(TunnelArgs),
    /// The tunnels announced over MQTT.
    Notifications {
        relay: RelayLink,
        mqtt_tls: Arc<rustls::ClientConfig>,
    },
}

/// A culvertd ready to run: the rules in force, what to serve, where the configuration file
/// is (for reloads), and how long open connections may take to finish at shutdown.
pub struct Daemon {
    pub gateway: Arc<Gateway>,
    pub work: Work,
    pub config_path: PathBuf,
    pub grace: Duration,
}

/// Serve until the work ends by itself (the relay refused the token) or until [`Signal::Stop`].
pub async fn run(d: Daemon, signals: mpsc::Receiver<Signal>) -> Result<(), TunnelError> {
    let gw = d.gateway.clone();
    supervise(&gw, &d.config_path, d.grace, signals, |stop| async move {
        match d.work {
            Work::Tunnel(args) => run_tunnel(args, d.gateway, stop).await,
            Work::Notifications { relay, mqtt_tls } => {
                notify::run(d.gateway, relay, mqtt_tls, stop)
                    .await
                    .map_err(TunnelError::Fatal)
            }
        }
    })
    .await
}

/// Run `serve` under the root shutdown, acting on signals until it returns.
async fn supervise<F, Fut>(
    gw: &Gateway,
    config_path: &std::path::Path,
    grace: Duration,
    mut signals: mpsc::Receiver<Signal>,
    serve: F,
) -> Result<(), TunnelError>
where
    F: FnOnce(Shutdown) -> Fut,
    Fut: std::future::Future<Output = Result<(), TunnelError>>,
{
    let root = Shutdown::default();
    let work = serve(root.clone());
    tokio::pin!(work);
    // Set once the first stop came: when the grace period ends.
    let mut deadline: Option<tokio::time::Instant> = None;
    loop {
        let grace_over = async {
            match deadline {
                Some(d) => tokio::time::sleep_until(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            r = &mut work => return r,
            _ = grace_over, if !root.hard.is_cancelled() => {
                let left = gw.metrics.connections.get();
                if left > 0 {
                    warn!(left, "grace period over: closing the remaining connections");
                }
                root.hard.cancel();
            }
            s = signals.recv() => match s {
                Some(Signal::Reload) => reload(gw, config_path),
                Some(Signal::Stop) if deadline.is_none() => {
                    let open = gw.metrics.connections.get();
                    info!(open, ?grace, "shutting down: draining open connections");
                    systemd::stopping(&format!("draining {open} connection(s), at most {grace:?}"));
                    // send_replace: the value must change even with no HTTP connection open yet.
                    gw.http_shutdown.send_replace(true);
                    root.drain.cancel();
                    deadline = Some(tokio::time::Instant::now() + grace);
                }
                Some(Signal::Stop) => {
                    warn!("second signal: closing the remaining connections");
                    root.hard.cancel();
                }
                // Nobody can signal any more: serve on until the work ends.
                None => {
                    let r = (&mut work).await;
                    return r;
                }
            },
        }
    }
}

/// Read the configuration again: applied whole, or refused whole (the rules in force stay).
fn reload(gw: &Gateway, path: &std::path::Path) {
    info!(file = %path.display(), "SIGHUP: reloading the configuration");
    let result = match config::load(path) {
        Ok(c) => {
            gw.reload(c);
            "applied"
        }
        Err(e) => {
            error!(
                "configuration not reloaded, the rules in force stay: {} problem(s):\n{e}",
                e.problems.len()
            );
            "refused"
        }
    };
    gw.metrics
        .reloads
        .get_or_create(&Metrics::label("result", result))
        .inc();
    systemd::status(&format!(
        "configuration reload {result}; {}",
        gw.metrics.status()
    ));
}

#[cfg(test)]
mod tests {
    //! The shutdown and reload logic on paused time, around a stand-in for the tunnels that
    //! records what it was told. (The real tunnels, relay and signals are in
    //! tests/tests/lifecycle.rs and tests/tests/systemd_units.rs.)
    use super::*;
    use tokio::time::{Instant, advance};

    const GRACE: Duration = Duration::from_secs(30);

    struct Fixture {
        dir: PathBuf,
        gw: Arc<Gateway>,
    }

    impl Fixture {
        fn new(rules: &str) -> Fixture {
            static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
            let dir = std::env::temp_dir().join(format!(
                "culvertd-service-{}-{}",
                std::process::id(),
                N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            ));
            std::fs::create_dir_all(&dir).unwrap();
            let path = dir.join("culvertd.toml");
            std::fs::write(&path, rules).unwrap();
            let cfg = config::load(&path).unwrap();
            Fixture {
                gw: Gateway::new(cfg),
                dir,
            }
        }

        fn path(&self) -> PathBuf {
            self.dir.join("culvertd.toml")
        }

        fn reloads(&self, result: &str) -> u64 {
            self.gw
                .metrics
                .reloads
                .get_or_create(&Metrics::label("result", result))
                .get()
        }
    }

    impl Drop for Fixture {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    const RULES: &str =
        "[acl]\nallow = [\"127.0.0.0/8\"]\n[services.SSH]\ntarget = \"127.0.0.1:22\"\n";

    /// Stands in for the tunnels: drains when told (after `drain_takes`), or ends at `hard`.
    /// Returns when it saw drain and when it ended.
    async fn tunnels(stop: Shutdown, drain_takes: Duration) -> (Option<Instant>, Instant) {
        stop.drain.cancelled().await;
        let drained_at = Instant::now();
        tokio::select! {
            _ = tokio::time::sleep(drain_takes) => {}
            _ = stop.hard.cancelled() => {}
        }
        (Some(drained_at), Instant::now())
    }

    fn spawn_supervised(
        f: &Fixture,
        drain_takes: Duration,
    ) -> (
        mpsc::Sender<Signal>,
        tokio::task::JoinHandle<(Option<Instant>, Instant)>,
    ) {
        let (tx, rx) = mpsc::channel(4);
        let (gw, path) = (f.gw.clone(), f.path());
        let task = tokio::spawn(async move {
            let mut seen = None;
            supervise(&gw, &path, GRACE, rx, |stop| async {
                seen = Some(tunnels(stop, drain_takes).await);
                Ok(())
            })
            .await
            .unwrap();
            seen.unwrap()
        });
        (tx, task)
    }

    #[tokio::test(start_paused = true)]
    async fn a_stop_drains_at_once_and_waits_for_open_connections_within_the_grace_period() {
        let f = Fixture::new(RULES);
        let (tx, task) = spawn_supervised(&f, Duration::from_secs(5));
        let t0 = Instant::now();
        tx.send(Signal::Stop).await.unwrap();
        let (drained, ended) = task.await.unwrap();
        assert_eq!(
            drained.unwrap() - t0,
            Duration::ZERO,
            "drain starts at the signal"
        );
        assert_eq!(
            ended - t0,
            Duration::from_secs(5),
            "the connections finished by themselves"
        );
        assert!(
            *f.gw.http_shutdown.borrow(),
            "HTTP routing was told to stop too"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn connections_still_open_after_the_grace_period_are_cut() {
        let f = Fixture::new(RULES);
        let (tx, task) = spawn_supervised(&f, Duration::from_secs(3600));
        let t0 = Instant::now();
        tx.send(Signal::Stop).await.unwrap();
        let (_, ended) = task.await.unwrap();
        assert_eq!(ended - t0, GRACE);
    }

    #[tokio::test(start_paused = true)]
    async fn a_second_stop_cuts_at_once() {
        let f = Fixture::new(RULES);
        let (tx, task) = spawn_supervised(&f, Duration::from_secs(3600));
        let t0 = Instant::now();
        tx.send(Signal::Stop).await.unwrap();
        advance(Duration::from_secs(2)).await;
        tx.send(Signal::Stop).await.unwrap();
        let (_, ended) = task.await.unwrap();
        assert_eq!(ended - t0, Duration::from_secs(2));
    }

    #[tokio::test(start_paused = true)]
    async fn reload_applies_a_valid_file_and_refuses_a_broken_one_whole() {
        let f = Fixture::new(RULES);
        let (tx, task) = spawn_supervised(&f, Duration::ZERO);
        std::fs::write(
            f.path(),
            format!("{RULES}[services.HMI]\ntarget = \"127.0.0.1:80\"\n"),
        )
        .unwrap();
        tx.send(Signal::Reload).await.unwrap();
        tokio::task::yield_now().await;
        while f.reloads("applied") == 0 {
            advance(Duration::from_millis(1)).await;
        }
        assert_eq!(f.gw.config().service_names(), ["HMI", "SSH"]);
        std::fs::write(f.path(), "[services.SSH]\ntarget = 22\n").unwrap();
        tx.send(Signal::Reload).await.unwrap();
        while f.reloads("refused") == 0 {
            advance(Duration::from_millis(1)).await;
        }
        assert_eq!(
            f.gw.config().service_names(),
            ["HMI", "SSH"],
            "the rules in force stay"
        );
        tx.send(Signal::Stop).await.unwrap();
        task.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn work_that_ends_by_itself_ends_the_daemon_with_its_result() {
        let f = Fixture::new(RULES);
        let (_tx, rx) = mpsc::channel(1);
        let r = supervise(&f.gw, &f.path(), GRACE, rx, |_| async {
            Err(TunnelError::Refused {
                status: 410,
                message: "tunnel closed".into(),
            })
        })
        .await;
        assert!(matches!(r, Err(TunnelError::Refused { status: 410, .. })));
    }

    #[tokio::test(start_paused = true)]
    async fn without_a_signal_source_the_work_runs_on() {
        let f = Fixture::new(RULES);
        let (tx, rx) = mpsc::channel(1);
        drop(tx);
        let t0 = Instant::now();
        supervise(&f.gw, &f.path(), GRACE, rx, |stop| async move {
            tokio::time::sleep(Duration::from_secs(100)).await;
            assert!(!stop.drain.is_cancelled());
            Ok(())
        })
        .await
        .unwrap();
        assert_eq!(Instant::now() - t0, Duration::from_secs(100));
    }
}
