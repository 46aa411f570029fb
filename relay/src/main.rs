//! `culvert-relay`: parse arguments, load the configuration, serve until SIGTERM / SIGINT.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use culvert_appliance::systemd;
use culvert_relay::config::{RawConfig, RawMqtt};
use culvert_relay::metrics::METRICS;
use culvert_relay::{dev, server::Relay};
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;

/// culvert's tunnel relay: control API and AWS-compatible WebSocket data plane on one HTTPS port.
#[derive(Parser)]
#[command(version, subcommand_negates_reqs = true)]
struct Args {
    /// Configuration file (TOML). Not needed with --dev.
    #[arg(long, short, required_unless_present = "dev")]
    config: Option<PathBuf>,
    /// Local trial mode: generate a CA, certificate and API key in --state-dir and serve on loopback.
    #[arg(long, conflicts_with = "config")]
    dev: bool,
    /// State directory for --dev.
    #[arg(long, default_value = ".culvert-dev", requires = "dev")]
    state_dir: PathBuf,
    /// Listen address for --dev (port 0: any free port on the first start, the same one after;
    /// see client.env).
    #[arg(long, default_value = "127.0.0.1:8443", requires = "dev")]
    listen: std::net::SocketAddr,
    /// Check the configuration and exit (0: valid, 64: invalid).
    #[arg(long)]
    check_config: bool,
    /// --dev: the embedded MQTT broker's TLS listener (port 0: any free port on the first start,
    /// the same one after).
    #[arg(long, default_value = "127.0.0.1:0", requires = "dev")]
    mqtt_listen: String,
    /// --dev: the web console's listener (port 0: any free port on the first start, the same
    /// one after); "off" serves none.
    #[arg(long, default_value = "127.0.0.1:0", requires = "dev")]
    console_listen: String,
    /// --dev: notify devices through this external broker (mqtts://host:port) instead.
    #[arg(long, requires = "dev")]
    mqtt_broker: Option<String>,
    /// --dev: username on the external broker.
    #[arg(long, requires = "mqtt_broker")]
    mqtt_username: Option<String>,
    /// --dev: file holding the password on the external broker.
    #[arg(long, requires = "mqtt_broker")]
    mqtt_password_file: Option<PathBuf>,
    /// --dev: most services one tunnel may carry (default 8; a config file sets limits.max_services).
    #[arg(long, requires = "dev", value_parser = clap::value_parser!(u16).range(1..))]
    max_services: Option<u16>,
    /// --dev: serve Prometheus metrics here (a config file sets daemon.metrics_listen).
    #[arg(long, requires = "dev")]
    metrics_listen: Option<std::net::SocketAddr>,
    /// --dev: seconds connected peers may stay after SIGTERM (default 30; daemon.shutdown_grace_secs).
    #[arg(long, requires = "dev")]
    shutdown_grace_secs: Option<u64>,
    /// Do not offer culvert's flow-control extension: peers see exactly AWS's protocol
    /// (the configuration file's `flow_control = false`).
    #[arg(long)]
    no_flow_control: bool,
    /// --dev: opening a tunnel needs a reason (a config file sets access.require_reason).
    #[arg(long, requires = "dev")]
    require_reason: bool,
    /// --dev: CA of the external broker (default: the dev CA).
    #[arg(long, requires = "mqtt_broker")]
    mqtt_ca: Option<PathBuf>,
    /// --dev: keep state in this PostgreSQL database (postgres://USER@HOST:PORT/DB) instead of
    /// the state directory's redb file (a config file sets store).
    #[arg(long, requires = "dev")]
    store: Option<String>,
    /// --dev: the CA (PEM) of the database server's TLS certificate (a config file sets
    /// store_ca_file).
    #[arg(long, requires = "store")]
    store_ca: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<culvert_appliance::audit::Command>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Some(c) = &args.command {
        return c.run();
    }
    culvert_appliance::logging::init();
    // Before the configuration: its connection limits default to a share of this limit.
    let open_files = culvert_appliance::limits::raise_open_file_limit();
    // --dev ports given as 0 that an earlier start chose (and that clients were told).
    let mut kept_in_use = false;
    let (cfg, dev_files) = if args.dev {
        let broker = args.mqtt_broker.clone();
        let kept = dev::KeptPorts::read(&args.state_dir);
        let listen = dev::KeptPorts::apply(args.listen, kept.https);
        let mqtt_listen = match args.mqtt_listen.parse() {
            Ok(addr) => {
                let a = dev::KeptPorts::apply(addr, kept.mqtt);
                kept_in_use |= a != addr && broker.is_none();
                a.to_string()
            }
            Err(_) => args.mqtt_listen.clone(),
        };
        kept_in_use |= listen != args.listen;
        let console = if args.console_listen == "off" {
            None
        } else {
            match args.console_listen.parse() {
                Ok(addr) => {
                    let a = dev::KeptPorts::apply(addr, kept.console);
                    kept_in_use |= a != addr;
                    Some(a)
                }
                Err(_) => {
                    eprintln!(
                        "culvert-relay: --console-listen {:?}: expected address:port (such as 127.0.0.1:8444) or off",
                        args.console_listen
                    );
                    std::process::exit(64);
                }
            }
        };
        let raw = |dev_ca: &std::path::Path| {
            RawMqtt {
                listen: broker.is_none().then_some(mqtt_listen),
                ca: broker
                    .as_ref()
                    .map(|_| args.mqtt_ca.clone().unwrap_or_else(|| dev_ca.to_owned())),
                broker: broker.clone(),
                username: args.mqtt_username.clone(),
                password_file: args.mqtt_password_file.clone(),
                client_id: None,
                topic: None,
                region: None,
                max_connections: None,
                max_connections_per_source: None,
            }
            .validate(|p| p.to_owned())
        };
        match dev::prepare(&args.state_dir, listen, raw) {
            Ok((mut c, f)) => {
                if let Some(n) = args.max_services {
                    c.limits.max_services = n.into();
                }
                c.daemon.metrics_listen = args.metrics_listen;
                let known_hosts = c.state_dir.join(culvert_relay::console::KNOWN_HOSTS_FILE);
                c.console = console.map(|listen| culvert_relay::console::ConsoleSettings {
                    listen,
                    idle: std::time::Duration::from_secs(
                        culvert_relay::console::DEFAULT_IDLE_MINUTES * 60,
                    ),
                    known_hosts,
                });
                match culvert_relay::config::StoreSettings::parse(
                    args.store.clone(),
                    None,
                    args.store_ca.clone(),
                ) {
                    Ok(s) => c.store = s,
                    Err(e) => {
                        eprintln!("culvert-relay: --store: {e}");
                        return ExitCode::from(64);
                    }
                }
                c.require_reason = args.require_reason;
                if let Some(g) = args.shutdown_grace_secs {
                    c.daemon.shutdown_grace = std::time::Duration::from_secs(g.min(3600));
                }
                (c, Some(f))
            }
            Err(e) => {
                eprintln!("culvert-relay: {e:#}");
                return ExitCode::from(64);
            }
        }
    } else {
        let path = args.config.expect("clap requires --config without --dev");
        match RawConfig::load(&path) {
            Ok(c) => (c, None),
            Err(e) => {
                eprintln!("culvert-relay: invalid configuration: {e}");
                return ExitCode::from(64);
            }
        }
    };
    let mut cfg = cfg;
    if args.no_flow_control {
        cfg.flow_control = false;
    }
    if args.check_config {
        println!("configuration OK");
        return ExitCode::SUCCESS;
    }
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("culvert-relay: cannot start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(serve(cfg, dev_files, open_files)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("culvert-relay: {e:#}");
            if kept_in_use && format!("{e:#}").contains("cannot listen") {
                eprintln!(
                    "culvert-relay: --dev keeps the ports of its first start (in {}), so that \
                     clients and gateways configured for them keep working. Stop whatever holds \
                     the port now, give ports explicitly (--listen, --mqtt-listen), or delete \
                     that file to choose new ones (then update client.env users and gateways).",
                    args.state_dir.join("ports").display()
                );
            }
            ExitCode::FAILURE
        }
    }
}

async fn serve(
    cfg: culvert_relay::config::RelayConfig,
    dev_files: Option<dev::DevFiles>,
    open_files: usize,
) -> anyhow::Result<()> {
    let embedded = matches!(
        cfg.mqtt.mode,
        culvert_relay::config::BrokerMode::Embedded { .. }
    );
    let mqtt_max = if embedded {
        cfg.mqtt.listener.max_connections
    } else {
        0
    };
    tracing::info!(
        open_files,
        https_max_connections = cfg.listener.max_connections,
        https_max_per_source = cfg.listener.max_connections_per_source,
        mqtt_max_connections = mqtt_max,
        "connection limits"
    );
    if cfg.listener.max_connections + mqtt_max > open_files {
        tracing::warn!(
            open_files,
            "limits.max_connections and mqtt.max_connections together exceed the open-file limit: \
             raise it (LimitNOFILE= in the unit) or lower them, or the relay will fail to accept \
             before it refuses"
        );
    }
    let relay = Relay::bind(&cfg).await?;
    let addr = relay.local_addr()?;
    if let Some(files) = &dev_files {
        let aws = relay.aws_bootstrap();
        let env = dev::write_client_env(
            files,
            addr,
            &cfg.api_key,
            relay.mqtt_addr(),
            relay.console_addr(),
            aws.as_ref().map(|(id, secret)| dev::AwsEnv {
                access_key_id: id,
                secret_access_key: secret,
                region: relay.aws_region(),
            }),
        )?;
        println!("culvert-relay (dev mode) serving https://{addr}");
        println!("  state directory  {}", files.dir.display());
        println!("  CA certificate   {}", files.ca.display());
        println!("  API key          {}", files.dir.join("api-key").display());
        if let Some(m) = relay.mqtt_addr() {
            println!("  MQTT broker      mqtts://{m}   (devices: culvert device add --thing NAME)");
        }
        if let Some(c) = relay.console_addr() {
            println!(
                "  web console      https://{c}/   (trust the CA above; log in as an operator with a password: culvert operator add, culvert operator password)"
            );
        }
        println!(
            "  client settings  . {}   (then: culvert tunnel open --thing NAME --service SSH)",
            env.display()
        );
        println!(
            "  AWS's API        aws iotsecuretunneling list-tunnels --endpoint-url https://{addr}   (after . client.env)"
        );
    } else {
        println!("culvert-relay serving https://{addr}");
        if let Some(c) = relay.console_addr() {
            println!("culvert-relay web console at https://{c}/");
        }
    }
    if let Some(addr) = cfg.daemon.metrics_listen {
        let l = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| anyhow::anyhow!("daemon.metrics_listen {addr}: {e}"))?;
        culvert_appliance::metrics::spawn(l, METRICS.registry.clone());
    }
    // Ports are bound and keys read: drop root if asked to.
    match culvert_appliance::privileges::drop_to(cfg.daemon.user.as_deref()) {
        Ok(Some(what)) => tracing::info!("{what}"),
        Ok(None) => {}
        Err(e) => anyhow::bail!(e),
    }
    let (shutdown, hard) = (CancellationToken::new(), CancellationToken::new());
    let (stop, stop_hard) = (shutdown.clone(), hard.clone());
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => {},
            _ = int.recv() => {},
        }
        systemd::stopping("draining connected peers");
        stop.cancel();
        tokio::select! {
            _ = term.recv() => {},
            _ = int.recv() => {},
        }
        stop_hard.cancel();
    });
    let registry = relay.registry();
    let status = move || {
        let (tunnels, peers) = registry.counts();
        METRICS.tunnels.set(tunnels as i64);
        format!("{tunnels} tunnel(s) open, {peers} peer(s) connected")
    };
    systemd::ready(&status());
    systemd::spawn_watchdog(status);
    relay.run(shutdown, cfg.daemon.shutdown_grace, hard).await
}
