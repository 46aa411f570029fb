//! `culvertd`: parse the arguments, load and check the rules, bind the metrics port, open the
//! audit trail, drop privileges, and hand over to [`culvertd::run`] with the Unix signals as
//! [`culvertd::Signal`]s: SIGTERM / SIGINT stop (drain, then cut), SIGHUP re-reads the rules (a
//! broken file is refused and the rules in force stay).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use culvert_appliance::systemd;
use culvert_protocol::client::Endpoint;
use culvertd::gateway::{RelayLink, TunnelArgs, TunnelError};
use culvertd::rules::Gateway;
use culvertd::{Daemon, EXIT_CONFIG, EXIT_REFUSED, Signal, Work, config, notify};
use tokio::signal::unix::{SignalKind, signal};
use tracing::{info, warn};

/// culvert's gateway daemon: carries tunnel connections to LAN targets by rules.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// Rules file (TOML).
    #[arg(long, short, default_value = "/etc/culvert/culvertd.toml")]
    config: PathBuf,
    /// Check the configuration, print every problem, and exit (0: valid, 64: invalid).
    #[arg(long)]
    check_config: bool,
    /// The tunnel's destination access token. Prefer CULVERT_DESTINATION_TOKEN or --token-file:
    /// on the command line, every user of the machine can read it with `ps`.
    #[arg(
        long,
        short = 't',
        env = "CULVERT_DESTINATION_TOKEN",
        hide_env_values = true,
        conflicts_with = "token_file"
    )]
    token: Option<String>,
    /// A file holding the tunnel's destination access token.
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// Client token to bind the access token with (generated if absent).
    #[arg(long, env = "CULVERT_CLIENT_TOKEN", hide_env_values = true)]
    client_token: Option<String>,
    /// The tunnel's id, for the audit trail (with --token; notifications carry it).
    #[arg(long, env = "CULVERT_TUNNEL_ID")]
    tunnel_id: Option<String>,
    /// Relay host:port (overrides relay.endpoint in the config).
    #[arg(long, env = "CULVERT_RELAY")]
    relay: Option<String>,
    /// Extra CA certificate to trust (overrides relay.ca in the config).
    #[arg(long, env = "CULVERT_CA")]
    ca: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(clap::Subcommand)]
enum Command {
    #[command(flatten)]
    Audit(culvert_appliance::audit::Command),
    /// Decide on tunnels waiting for on-site approval ([consent] approve_tunnels).
    Consent {
        /// The approval directory (default: [consent] approval_dir of --config).
        #[arg(long)]
        dir: Option<PathBuf>,
        #[command(subcommand)]
        command: culvertd::approval::Command,
    },
}

/// `culvertd consent …` against the directory the running daemon uses.
fn consent(
    config: &std::path::Path,
    dir: Option<PathBuf>,
    c: &culvertd::approval::Command,
) -> ExitCode {
    let dir = match dir {
        Some(d) => d,
        None => match config::load(config) {
            Ok(cfg) => match cfg.approval {
                Some(a) => a.dir,
                None => {
                    eprintln!(
                        "culvertd: {} does not set [consent] approve_tunnels = true: no tunnel waits for approval",
                        config.display()
                    );
                    return ExitCode::from(EXIT_CONFIG);
                }
            },
            Err(e) => {
                eprintln!("{e}");
                eprintln!(
                    "culvertd: cannot read the approval directory from the configuration; pass --dir"
                );
                return ExitCode::from(EXIT_CONFIG);
            }
        },
    };
    match c.run(&dir) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("culvertd: {e}");
            ExitCode::FAILURE
        }
    }
}

fn main() -> ExitCode {
    let matches = <Args as clap::CommandFactory>::command().get_matches();
    let mut args = match <Args as clap::FromArgMatches>::from_arg_matches(&matches) {
        Ok(a) => a,
        Err(e) => e.exit(),
    };
    match args.command.take() {
        Some(Command::Audit(c)) => return c.run(),
        Some(Command::Consent { dir, command }) => return consent(&args.config, dir, &command),
        None => {}
    }
    culvert_appliance::logging::init();
    // Before the configuration: daemon.max_connections defaults to a share of this limit.
    let open_files = culvert_appliance::limits::raise_open_file_limit();
    if matches.value_source("token") == Some(clap::parser::ValueSource::CommandLine) {
        warn!(
            "--token shows the token to every user of this machine (ps); set CULVERT_DESTINATION_TOKEN or use --token-file instead"
        );
    }
    let token = match (args.token.take(), args.token_file.take()) {
        (None, None) => None,
        (direct, file) => match culvert_protocol::client::access_token(direct, file.as_deref()) {
            Ok(t) => Some(t),
            Err(e) => {
                eprintln!("culvertd: --token-file: {e}");
                return ExitCode::from(EXIT_CONFIG);
            }
        },
    };
    let cfg = match config::load(&args.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            eprintln!(
                "culvertd: the configuration has {} problem(s); nothing was started",
                e.problems.len()
            );
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if let Some(dir) = cfg.audit_file.as_ref().and_then(|f| f.parent())
        && let Err(e) = std::fs::metadata(dir)
    {
        eprintln!("culvertd: audit file directory {}: {e}", dir.display());
        return ExitCode::from(EXIT_CONFIG);
    }
    let endpoint = match args.relay.as_deref().map(Endpoint::parse) {
        Some(Ok(e)) => e,
        Some(Err(e)) => {
            eprintln!("culvertd: --relay {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
        None => match cfg.endpoint.clone() {
            Some(e) => e,
            None => {
                eprintln!(
                    "culvertd: no relay: set relay.endpoint in {} or pass --relay (CULVERT_RELAY)",
                    args.config.display()
                );
                return ExitCode::from(EXIT_CONFIG);
            }
        },
    };
    let ca = args.ca.or_else(|| cfg.ca.clone());
    // Every key and CA is read now, before privileges are dropped.
    let relay_tls = match culvert_protocol::client::tls_config(ca.as_deref()) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("culvertd: relay CA: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    // The proxy to the relay: relay.proxy, or the environment's (HTTPS_PROXY, ALL_PROXY,
    // NO_PROXY), as a systemd unit's Environment= sets them.
    let proxy = match culvert_protocol::proxy::Proxy::choose(cfg.proxy.as_deref(), &endpoint.host) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("culvertd: relay.proxy: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if let Some(p) = &proxy {
        info!(proxy = %p, "reaching the relay through a proxy");
    }
    let mqtt_tls = match (&token, &cfg.mqtt) {
        (None, Some(m)) => match notify::tls_config(m, ca.as_deref()) {
            Ok(t) => Some(t),
            Err(e) => {
                eprintln!("culvertd: MQTT TLS: {e}");
                return ExitCode::from(EXIT_CONFIG);
            }
        },
        _ => None,
    };
    // What a start would refuse, a check refuses too: the relay, its CA, the broker's TLS
    // settings and the audit directory were all checked above.
    if args.check_config {
        println!(
            "{}: OK ({} service(s): {})",
            args.config.display(),
            cfg.services.len(),
            cfg.service_names().join(", ")
        );
        return ExitCode::SUCCESS;
    }
    if token.is_none() && cfg.mqtt.is_none() {
        eprintln!(
            "culvertd: nothing to do: add an [mqtt] section to {} to wait for tunnel notifications, \
             or pass a destination token (--token / CULVERT_DESTINATION_TOKEN)",
            args.config.display()
        );
        return ExitCode::from(EXIT_CONFIG);
    }
    let rt = match culvert_protocol::session::end_runtime() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("culvertd: cannot start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let settings = cfg.daemon.clone();
    info!(
        open_files,
        max_connections = settings.max_connections,
        max_tunnels = settings.max_tunnels,
        "connection limits"
    );
    if settings.max_connections + settings.max_tunnels + 64 > open_files {
        warn!(
            open_files,
            "daemon.max_connections and daemon.max_tunnels exceed what the open-file limit allows: raise it (LimitNOFILE=) or lower them"
        );
    }
    let gw = Gateway::new(cfg);
    // Install the handlers before anything runs: until then SIGHUP would end the process.
    let handlers = rt.block_on(async {
        Ok::<_, std::io::Error>((
            signal(SignalKind::terminate())?,
            signal(SignalKind::interrupt())?,
            signal(SignalKind::hangup())?,
        ))
    });
    let (mut term, mut int, mut hup) = match handlers {
        Ok(h) => h,
        Err(e) => {
            eprintln!("culvertd: cannot install signal handlers: {e}");
            return ExitCode::FAILURE;
        }
    };
    // Bind the metrics port while still privileged, then drop root if asked to.
    if let Some(addr) = settings.metrics_listen {
        match rt.block_on(tokio::net::TcpListener::bind(addr)) {
            Ok(l) => {
                if let Ok(a) = l.local_addr() {
                    gw.protect_metrics_port(a.port());
                }
                let _guard = rt.enter();
                culvert_appliance::metrics::spawn(l, gw.metrics.registry.clone());
            }
            Err(e) => {
                // Not a configuration error: the address may come up later; let systemd retry.
                eprintln!("culvertd: daemon.metrics_listen {addr}: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    if let Err(e) = gw.audit.open() {
        eprintln!("culvertd: {e}");
        return ExitCode::from(EXIT_CONFIG);
    }
    // The HMI's port too (on-site approval over HTTP).
    if let Some(hmi) = gw.config().approval.as_ref().and_then(|a| a.hmi.clone()) {
        match rt.block_on(tokio::net::TcpListener::bind(hmi.listen)) {
            Ok(l) => {
                rt.spawn(culvertd::hmi::serve(l, gw.clone()));
            }
            Err(e) => {
                eprintln!("culvertd: consent.hmi_listen {}: {e}", hmi.listen);
                return ExitCode::FAILURE;
            }
        }
    }
    match culvert_appliance::privileges::drop_to(settings.user.as_deref()) {
        Ok(Some(what)) => info!("{what}"),
        Ok(None) => {}
        Err(e) => {
            eprintln!("culvertd: {e}");
            return ExitCode::FAILURE;
        }
    }
    rt.spawn(culvertd::consent::watch(gw.clone()));
    let (signals, signalled) = tokio::sync::mpsc::channel(8);
    rt.spawn(async move {
        loop {
            let s = tokio::select! {
                _ = term.recv() => Signal::Stop,
                _ = int.recv() => Signal::Stop,
                _ = hup.recv() => Signal::Reload,
            };
            if signals.send(s).await.is_err() {
                break;
            }
        }
    });
    {
        let _guard = rt.enter();
        let gw_status = gw.clone();
        systemd::spawn_watchdog(move || gw_status.metrics.status());
    }
    systemd::ready(&gw.metrics.status());
    let relay = RelayLink {
        endpoint,
        tls: relay_tls,
        proxy,
    };
    let work = match token {
        Some(token) => Work::Tunnel(TunnelArgs {
            relay,
            access_token: token,
            client_token: args.client_token.map(Into::into),
            tunnel_id: args.tunnel_id,
            identity: Default::default(),
            reporter: None,
        }),
        None => Work::Notifications {
            relay,
            mqtt_tls: mqtt_tls.expect("built above for MQTT mode"),
        },
    };
    let daemon = Daemon {
        gateway: gw,
        work,
        config_path: args.config,
        grace: settings.shutdown_grace,
    };
    let r = rt.block_on(culvertd::run(daemon, signalled));
    rt.shutdown_timeout(std::time::Duration::from_secs(1));
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e @ TunnelError::Refused { .. }) => {
            eprintln!("culvertd: {e}");
            ExitCode::from(EXIT_REFUSED)
        }
        Err(e) => {
            eprintln!("culvertd: {e}");
            ExitCode::FAILURE
        }
    }
}
