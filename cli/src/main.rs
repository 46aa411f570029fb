//! `culvert`: parse arguments and dispatch; the work is in the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use culvert_cli::api::ApiClient;
use culvert_cli::connect::{self, ConnectArgs, ConnectError};
use culvert_cli::{EXIT_REFUSED, EXIT_UNTRUSTED, tunnel};
use culvert_protocol::Format;
use culvert_protocol::client::Endpoint;
use tokio_util::sync::CancellationToken;

/// culvert: open and manage tunnels, and reach the machines behind them.
#[derive(Parser)]
#[command(version)]
struct Cli {
    /// The relay, host:port (API and data plane share it).
    #[arg(long, env = "CULVERT_RELAY", global = true)]
    relay: Option<String>,
    /// Extra CA certificate (PEM) to trust, e.g. the dev relay's ca.pem.
    #[arg(long, env = "CULVERT_CA", global = true)]
    ca: Option<PathBuf>,
    /// Print the relay's JSON instead of human output.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Manage tunnels through the relay's API.
    Tunnel {
        /// The relay's API key.
        #[arg(long, env = "CULVERT_API_KEY", hide_env_values = true)]
        api_key: Option<String>,
        #[command(subcommand)]
        command: TunnelCommand,
    },
    /// Manage gateways allowed on the relay's embedded MQTT broker.
    Device {
        /// The relay's API key.
        #[arg(long, env = "CULVERT_API_KEY", hide_env_values = true)]
        api_key: Option<String>,
        #[command(subcommand)]
        command: DeviceCommand,
    },
    /// Run the local proxy: listen on local ports and carry connections through the tunnel.
    Connect {
        /// The tunnel's source access token. Prefer CULVERT_ACCESS_TOKEN or --token-file: on
        /// the command line, every user of the machine can read it with `ps`.
        #[arg(
            long,
            short = 't',
            env = "CULVERT_ACCESS_TOKEN",
            hide_env_values = true,
            required_unless_present = "token_file",
            conflicts_with = "token_file"
        )]
        token: Option<String>,
        /// A file holding the tunnel's source access token.
        #[arg(long)]
        token_file: Option<PathBuf>,
        /// Client token binding this proxy to the token, so it can reconnect (generated if absent).
        #[arg(
            long,
            short = 'i',
            env = "CULVERT_CLIENT_TOKEN",
            hide_env_values = true
        )]
        client_token: Option<String>,
        /// Service mappings: SERVICE=PORT[,SERVICE=PORT…] (port 0 picks a free one).
        #[arg(long = "services", short = 's')]
        services: String,
        /// Local address to listen on.
        #[arg(long, short = 'b', default_value = "127.0.0.1")]
        bind: String,
        /// Use AWS's endpoint for this region instead of --relay.
        #[arg(long, conflicts_with = "relay")]
        region: Option<String>,
        /// Message format to speak (V1 or V2 for older destinations); default: as negotiated.
        #[arg(long)]
        format: Option<Format>,
    },
}

#[derive(Subcommand)]
enum DeviceCommand {
    /// Register a device (or give it a new password); prints its MQTT settings.
    Add {
        #[arg(long)]
        thing: String,
    },
    /// List registered devices.
    List,
    /// Remove a device.
    Remove { thing: String },
}

#[derive(Subcommand)]
enum TunnelCommand {
    /// Open a tunnel to a thing.
    Open {
        #[arg(long)]
        thing: String,
        /// Service name (repeat, or comma-separate, for several).
        #[arg(long = "service", required = true, value_delimiter = ',')]
        services: Vec<String>,
        /// Lifetime in minutes, 1-720 (default 720).
        #[arg(long)]
        lifetime: Option<u32>,
        #[arg(long)]
        description: Option<String>,
        /// Tag KEY=VALUE (repeatable).
        #[arg(long = "tag", value_parser = parse_tag)]
        tags: Vec<(String, String)>,
    },
    /// List tunnels, newest first.
    List {
        #[arg(long)]
        thing: Option<String>,
        /// OPEN or CLOSED.
        #[arg(long)]
        status: Option<String>,
        /// At most this many.
        #[arg(long)]
        max: Option<u32>,
    },
    /// Show one tunnel.
    Describe { id: String },
    /// Close a tunnel, disconnecting both ends.
    Close {
        id: String,
        /// Also delete its record.
        #[arg(long)]
        delete: bool,
    },
    /// Issue new access tokens; the old ones stop working and their holders are disconnected.
    Rotate {
        id: String,
        /// source, destination or all.
        #[arg(long, default_value = "all")]
        mode: String,
    },
}

fn parse_tag(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("{s:?}: expected KEY=VALUE"))
}

fn fail(msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("culvert: {msg}");
    ExitCode::FAILURE
}

fn main() -> ExitCode {
    let matches = <Cli as clap::CommandFactory>::command().get_matches();
    let cli = match <Cli as clap::FromArgMatches>::from_arg_matches(&matches) {
        Ok(c) => c,
        Err(e) => e.exit(),
    };
    let token_on_command_line = matches
        .subcommand_matches("connect")
        .and_then(|m| m.value_source("token"))
        == Some(clap::parser::ValueSource::CommandLine);
    if token_on_command_line {
        eprintln!(
            "culvert: warning: --token shows the token to every user of this machine (ps); \
             set CULVERT_ACCESS_TOKEN or use --token-file instead"
        );
    }
    let default_level = if matches!(cli.command, Command::Connect { .. }) {
        "info"
    } else {
        "warn"
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| default_level.into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let api_client = |key: Option<String>| -> Result<ApiClient, String> {
        let relay = cli
            .relay
            .clone()
            .ok_or("no relay given: pass --relay HOST:PORT or set CULVERT_RELAY")?;
        let key = key.ok_or("no API key given: pass --api-key or set CULVERT_API_KEY")?;
        ApiClient::new(&relay, &key, cli.ca.as_deref()).map_err(|e| e.to_string())
    };
    match cli.command {
        Command::Device { api_key, command } => {
            let api = match api_client(api_key) {
                Ok(a) => a,
                Err(e) => return fail(e),
            };
            let r = match command {
                DeviceCommand::Add { thing } => tunnel::device_add(&api, &thing, cli.json),
                DeviceCommand::List => tunnel::device_list(&api, cli.json),
                DeviceCommand::Remove { thing } => tunnel::device_remove(&api, &thing, cli.json),
            };
            match r {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(e),
            }
        }
        Command::Tunnel { api_key, command } => {
            let api = match api_client(api_key) {
                Ok(a) => a,
                Err(e) => return fail(e),
            };
            let r = match command {
                TunnelCommand::Open {
                    thing,
                    services,
                    lifetime,
                    description,
                    tags,
                } => tunnel::open(
                    &api,
                    tunnel::OpenArgs {
                        thing,
                        services,
                        lifetime_minutes: lifetime,
                        description,
                        tags,
                    },
                    cli.json,
                ),
                TunnelCommand::List { thing, status, max } => {
                    tunnel::list(&api, thing, status, max, cli.json)
                }
                TunnelCommand::Describe { id } => tunnel::describe(&api, &id, cli.json),
                TunnelCommand::Close { id, delete } => tunnel::close(&api, &id, delete, cli.json),
                TunnelCommand::Rotate { id, mode } => tunnel::rotate(&api, &id, &mode, cli.json),
            };
            match r {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(e),
            }
        }
        Command::Connect {
            token,
            token_file,
            client_token,
            services,
            bind,
            region,
            format,
        } => {
            let endpoint = match (region, cli.relay) {
                (Some(r), _) => Endpoint::aws_region(&r),
                (None, Some(relay)) => match Endpoint::parse(&relay) {
                    Ok(e) => e,
                    Err(e) => return fail(e),
                },
                (None, None) => {
                    return fail(
                        "no relay given: pass --relay HOST:PORT (or --region) or set CULVERT_RELAY",
                    );
                }
            };
            let token = match culvert_protocol::client::access_token(token, token_file.as_deref()) {
                Ok(t) => t,
                Err(e) => return fail(e),
            };
            let mappings = match connect::parse_mappings(&services) {
                Ok(m) => m,
                Err(e) => return fail(format!("-s {e}")),
            };
            let args = ConnectArgs {
                endpoint,
                access_token: token,
                client_token,
                ca: cli.ca,
                mappings,
                bind,
                format,
            };
            let rt = match culvert_protocol::session::end_runtime() {
                Ok(rt) => rt,
                Err(e) => return fail(e),
            };
            let shutdown = CancellationToken::new();
            let stop = shutdown.clone();
            rt.spawn(async move {
                let mut term =
                    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                        .expect("installing a SIGTERM handler");
                tokio::select! {
                    _ = term.recv() => {},
                    _ = tokio::signal::ctrl_c() => {},
                }
                stop.cancel();
            });
            let r = rt.block_on(connect::run(args, shutdown));
            rt.shutdown_timeout(std::time::Duration::from_secs(1));
            match r {
                Ok(()) => ExitCode::SUCCESS,
                Err(e @ ConnectError::Refused { .. }) => {
                    eprintln!("culvert: {e}");
                    ExitCode::from(EXIT_REFUSED)
                }
                Err(e @ ConnectError::Untrusted(_)) => {
                    eprintln!("culvert: {e}");
                    ExitCode::from(EXIT_UNTRUSTED)
                }
                Err(e) => fail(e),
            }
        }
    }
}
