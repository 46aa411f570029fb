//! `culvert`: parse arguments and dispatch; the work is in the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use culvert_cli::api::ApiClient;
use culvert_cli::connect::{self, ConnectArgs, ConnectError, Local};
use culvert_cli::credentials::Credentials;
use culvert_cli::reach::{self, RelaySettings};
use culvert_cli::{EXIT_REFUSED, EXIT_UNTRUSTED, operator, tunnel};
use culvert_protocol::Format;
use tokio_util::sync::CancellationToken;

/// culvert: open and manage tunnels, and reach the machines behind them.
#[derive(Parser)]
#[command(version)]
struct Cli {
    /// The relay, host:port (API and data plane share it); default: the one saved by
    /// `culvert login`.
    #[arg(long, env = "CULVERT_RELAY", global = true)]
    relay: Option<String>,
    /// Extra CA certificate (PEM) to trust, e.g. the dev relay's ca.pem, or a directory of
    /// them (the localproxy's `-c DIR`).
    #[arg(
        long,
        short = 'c',
        visible_alias = "capath",
        env = "CULVERT_CA",
        global = true
    )]
    ca: Option<PathBuf>,
    /// Reach the relay through this proxy: http://[USER:PASSWORD@]HOST:PORT (HTTP CONNECT),
    /// socks5:// or socks5h:// (SOCKS5), or `none`. Default: HTTPS_PROXY, then ALL_PROXY,
    /// unless NO_PROXY names the relay.
    #[arg(long, env = "CULVERT_PROXY", hide_env_values = true, global = true)]
    proxy: Option<String>,
    /// The relay's API key (tunnel, device, operator, ssh and open); default: the one saved by
    /// `culvert login`.
    #[arg(long, env = "CULVERT_API_KEY", hide_env_values = true, global = true)]
    api_key: Option<String>,
    /// Print the relay's JSON instead of human output.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Save the relay, its CA and your API key for the commands that follow (checked with
    /// the relay first). The key comes from --api-key or CULVERT_API_KEY, else it is asked for;
    /// with --user, your password is (or CULVERT_PASSWORD) and the relay issues a key that
    /// lives 12 hours.
    Login {
        /// Log in with this operator's password instead of an API key.
        #[arg(long, value_name = "NAME")]
        user: Option<String>,
    },
    /// Forget what `culvert login` saved.
    Logout,
    /// Who the API key belongs to: operator, role and grants.
    Whoami,
    /// Manage operators, their API keys and their grants (admins; anyone for their own keys).
    Operator {
        #[command(subcommand)]
        command: OperatorCommand,
    },
    /// Ask for access you have no grant for, and (admins) approve or refuse such requests.
    Access {
        #[command(subcommand)]
        command: AccessCommand,
    },
    /// The newest records of the relay's audit trail (admins), newest first.
    Audit {
        /// Only this event (tunnel_open, attach, login_refused, …).
        #[arg(long)]
        event: Option<String>,
        /// Only records of this operator.
        #[arg(long)]
        operator: Option<String>,
        /// Only records of this thing.
        #[arg(long)]
        thing: Option<String>,
        /// Only records of this tunnel.
        #[arg(long)]
        tunnel: Option<String>,
        /// At most this many (1-500).
        #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u16).range(1..=500))]
        limit: u16,
    },
    /// Manage tunnels through the relay's API.
    Tunnel {
        #[command(subcommand)]
        command: TunnelCommand,
    },
    /// Manage gateways allowed on the relay's embedded MQTT broker.
    Device {
        #[command(subcommand)]
        command: DeviceCommand,
    },
    /// Log in to a device with the system's ssh: opens a tunnel for SSH, waits for the
    /// device's gateway, runs ssh through it, and closes the tunnel when ssh exits.
    ///
    /// Everything after [USER@]THING goes to ssh (options, then a command), e.g.
    /// `culvert ssh pi@cell-7 -i ~/.ssh/cell uptime`.
    #[command(trailing_var_arg = true)]
    Ssh {
        /// The tunnel service that reaches the device's sshd.
        #[arg(long, default_value = "SSH")]
        service: String,
        /// Seconds to wait for the device's gateway to connect to the new tunnel.
        #[arg(long, value_name = "SECONDS", default_value_t = 60)]
        wait: u64,
        /// The ssh program to run.
        #[arg(long, env = "CULVERT_SSH", default_value = "ssh")]
        ssh: String,
        /// Why: stored with the tunnel and in the audit trails (a relay may require one).
        #[arg(long, env = "CULVERT_REASON")]
        reason: Option<String>,
        /// The device: its thing name, with the user to log in as if not your own.
        #[arg(value_name = "[USER@]THING")]
        destination: String,
        /// Arguments for ssh: options, then the command to run.
        #[arg(allow_hyphen_values = true, value_name = "SSH ARGS")]
        ssh_args: Vec<std::ffi::OsString>,
    },
    /// Reach any service of a device: opens a tunnel of its own, listens on local ports until
    /// Ctrl-C (or SIGTERM), then closes the tunnel.
    Open {
        /// The device's thing name.
        thing: String,
        /// Service name (repeat, or comma-separate, for several).
        #[arg(long = "service", required = true, value_delimiter = ',')]
        services: Vec<String>,
        /// The local port of the (single) service; by default a free one, printed.
        #[arg(long)]
        local: Option<u16>,
        /// Seconds to wait for the device's gateway to connect to the new tunnel.
        #[arg(long, value_name = "SECONDS", default_value_t = 60)]
        wait: u64,
        /// Local address to listen on.
        #[arg(long, short = 'b', default_value = "127.0.0.1")]
        bind: String,
        /// Why: stored with the tunnel and in the audit trails (a relay may require one).
        #[arg(long, env = "CULVERT_REASON")]
        reason: Option<String>,
    },
    /// Run the local proxy: listen on local ports and carry connections through the tunnel.
    ///
    /// The AWS localproxy's options and environment work too, so a script written for it runs
    /// with `culvert connect` in its place: -t, -i, -e, -r, -s, -d, -b, -c, -v, -m, -y, and
    /// AWSIOT_TUNNEL_ACCESS_TOKEN / AWSIOT_TUNNEL_CLIENT_TOKEN.
    Connect {
        /// The tunnel's access token. Prefer CULVERT_ACCESS_TOKEN (or the localproxy's
        /// AWSIOT_TUNNEL_ACCESS_TOKEN) or --token-file: on the command line, every user of the
        /// machine can read it with `ps`.
        #[arg(
            long,
            short = 't',
            visible_alias = "access-token",
            env = "CULVERT_ACCESS_TOKEN",
            hide_env_values = true,
            conflicts_with = "token_file"
        )]
        token: Option<String>,
        /// A file holding the tunnel's access token.
        #[arg(long)]
        token_file: Option<PathBuf>,
        /// Client token binding this proxy to the token, so it can reconnect (generated if
        /// absent; AWSIOT_TUNNEL_CLIENT_TOKEN is read too).
        #[arg(
            long,
            short = 'i',
            env = "CULVERT_CLIENT_TOKEN",
            hide_env_values = true
        )]
        client_token: Option<String>,
        /// The relay, host:port, as the localproxy names it (overrides CULVERT_RELAY).
        #[arg(long, short = 'e', value_name = "HOST:PORT")]
        proxy_endpoint: Option<String>,
        /// Use AWS's endpoint for this region (overrides CULVERT_RELAY).
        #[arg(long, short = 'r')]
        region: Option<String>,
        /// Source side: SERVICE=PORT[,SERVICE=PORT…] (port 0 picks a free one), or a bare PORT
        /// for a one-service tunnel.
        #[arg(long = "services", short = 's', visible_alias = "source-listen-port")]
        services: Option<String>,
        /// Destination side: SERVICE=HOST:PORT[,…], or a bare HOST:PORT or PORT for a
        /// one-service tunnel. No rules or ACL: on a gateway, use culvertd.
        #[arg(
            long = "destination-app",
            short = 'd',
            value_name = "SERVICE=HOST:PORT"
        )]
        destination: Option<String>,
        /// Carry one connection to SERVICE over stdin and stdout instead of listening, e.g.
        /// as ssh's ProxyCommand (what `culvert ssh` does).
        #[arg(long, value_name = "SERVICE", conflicts_with_all = ["services", "destination", "bind"])]
        stdio: Option<String>,
        /// Local address to listen on [default: 127.0.0.1].
        #[arg(long, short = 'b', visible_alias = "local-bind-address")]
        bind: Option<String>,
        /// src or dst (the localproxy's -m); implied by -s or -d.
        #[arg(long, short = 'm')]
        mode: Option<String>,
        /// Message format to speak (V1 or V2 for older destinations); default: as negotiated.
        #[arg(long, short = 'y', visible_alias = "destination-client-type")]
        format: Option<Format>,
        /// How long open connections wait for a dropped tunnel to come back and resume
        /// (seconds; 0: they end with it, as against AWS's relay, which cannot resume).
        #[arg(long, value_name = "SECS", default_value_t = 120, value_parser = clap::value_parser!(u64).range(0..=86_400))]
        resume_hold: u64,
        /// How long a UDP flow (a udp:PORT mapping) lives without a datagram either way.
        #[arg(long, value_name = "SECS", default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=86_400))]
        udp_idle_secs: u64,
        /// Log level as the localproxy counts it: 0 off, 1-2 errors, 3 warnings, 4 info
        /// (default), 5 debug, 6 and up trace. Overrides RUST_LOG.
        #[arg(long, short = 'v', value_name = "LEVEL")]
        verbose: Option<u8>,
        /// Refused: culvert always verifies the relay's certificate.
        #[arg(long = "no-ssl-host-verify", short = 'k', hide = true)]
        no_verify: bool,
    },
}

#[derive(Subcommand)]
enum OperatorCommand {
    /// Add an operator; prints their first API key (shown once).
    Add {
        name: String,
        /// admin, operator (opens tunnels within their grants) or viewer (sees them).
        #[arg(long, default_value = "operator")]
        role: String,
    },
    /// List operators with their keys and grants.
    List,
    /// Disable an operator: their keys stop working and the tunnels they opened close.
    Disable { name: String },
    /// Enable a disabled operator again.
    Enable { name: String },
    /// Set an operator's password, for `culvert login --user` (yours, or anyone's as an
    /// admin). Asked for, or taken from CULVERT_PASSWORD; 12-256 characters.
    Password { name: String },
    /// API keys of an operator.
    Key {
        #[command(subcommand)]
        command: KeyCommand,
    },
    /// What an operator may reach.
    Grant {
        #[command(subcommand)]
        command: GrantCommand,
    },
}

#[derive(Subcommand)]
enum AccessCommand {
    /// Ask an admin for access to a thing's services for a while.
    Request {
        #[arg(long)]
        thing: String,
        /// Service name (repeat, or comma-separate).
        #[arg(long = "service", required = true, value_delimiter = ',')]
        services: Vec<String>,
        /// For this many minutes (at most a week).
        #[arg(long = "for", value_name = "MINUTES")]
        minutes: u32,
        /// From this time (RFC 3339); default: from the approval.
        #[arg(long)]
        from: Option<String>,
        /// Why (required).
        #[arg(long, env = "CULVERT_REASON")]
        reason: String,
    },
    /// List access requests (admins: everyone's; others: their own).
    List {
        /// Only those waiting for a decision.
        #[arg(long)]
        pending: bool,
    },
    /// Approve a request: a grant for the requested window only.
    Approve { request_id: String },
    /// Refuse a request.
    Refuse {
        request_id: String,
        #[arg(long)]
        why: Option<String>,
    },
}

#[derive(Subcommand)]
enum KeyCommand {
    /// A new API key (shown once).
    Create {
        name: String,
        #[arg(long)]
        label: Option<String>,
        /// The key stops working after this many days.
        #[arg(long, value_name = "DAYS")]
        expires_in_days: Option<u32>,
        /// An AWS access key pair instead, for AWS's API on the relay (the aws CLI, boto3 and
        /// the AWS SDKs, signing with SigV4).
        #[arg(long)]
        aws: bool,
    },
    /// Revoke a key: it stops working at once.
    Revoke { name: String, key_id: String },
}

#[derive(Subcommand)]
enum GrantCommand {
    /// Let an operator reach things (names or patterns: cell-7, cell-*) on services (or *).
    Add {
        name: String,
        /// Thing name or pattern (repeat, or comma-separate).
        #[arg(long = "thing", required = true, value_delimiter = ',')]
        things: Vec<String>,
        /// Service name, or * for all (repeat, or comma-separate).
        #[arg(long = "service", required = true, value_delimiter = ',')]
        services: Vec<String>,
        /// Only from this time on (RFC 3339, e.g. 2026-12-24T08:00:00Z).
        #[arg(long)]
        from: Option<String>,
        /// Only until this time (RFC 3339).
        #[arg(long, conflicts_with = "minutes")]
        until: Option<String>,
        /// Only for this many minutes (from --from, or from now).
        #[arg(long = "for", value_name = "MINUTES")]
        minutes: Option<u32>,
    },
    /// Revoke a grant: the tunnels it allowed close at once.
    Revoke { name: String, grant_id: String },
}

#[derive(Subcommand)]
enum DeviceCommand {
    /// Register a device (or give it a new password); prints its MQTT settings.
    Add {
        #[arg(long)]
        thing: String,
        /// KEY=VALUE (repeatable): grants may name things by tag (`--thing tag:line=2`).
        /// Without any, a device keeps the tags it has.
        #[arg(long = "tag", value_parser = parse_tag)]
        tags: Vec<(String, String)>,
    },
    /// Replace a device's tags (none: remove them all); its password stays.
    Tag {
        #[arg(long)]
        thing: String,
        /// KEY=VALUE, as many as it has.
        #[arg(value_parser = parse_tag)]
        tags: Vec<(String, String)>,
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
        /// Why: stored with the tunnel and in the audit trails (a relay may require one).
        #[arg(long, env = "CULVERT_REASON")]
        reason: Option<String>,
        /// Tag KEY=VALUE (repeatable).
        #[arg(long = "tag", value_parser = parse_tag)]
        tags: Vec<(String, String)>,
        /// Refuse (open nothing) unless the gateway's last health report shows a rule for
        /// every service; without it, a warning.
        #[arg(long)]
        strict: bool,
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

/// A password: CULVERT_PASSWORD (for scripts), else asked for without echo.
fn password(prompt: &str) -> Result<String, String> {
    match std::env::var("CULVERT_PASSWORD") {
        Ok(p) if !p.is_empty() => Ok(p),
        _ => culvert_cli::credentials::read_secret(prompt, "password"),
    }
}

fn fail(msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("culvert: {msg}");
    ExitCode::FAILURE
}

/// A token cancelled by SIGTERM, SIGINT or SIGHUP, handled on `rt`.
#[cfg(unix)]
fn stop_on_signals(rt: &tokio::runtime::Runtime) -> CancellationToken {
    let shutdown = CancellationToken::new();
    let stop = shutdown.clone();
    rt.spawn(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let (Ok(mut term), Ok(mut hup)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::hangup()),
        ) else {
            eprintln!("culvert: cannot handle signals; stop it with SIGKILL");
            return;
        };
        tokio::select! {
            _ = term.recv() => {},
            _ = hup.recv() => {},
            _ = tokio::signal::ctrl_c() => {},
        }
        stop.cancel();
    });
    shutdown
}

/// A token cancelled by Ctrl-C or Ctrl-Break, or the console window closing, handled on `rt`.
#[cfg(windows)]
fn stop_on_signals(rt: &tokio::runtime::Runtime) -> CancellationToken {
    let shutdown = CancellationToken::new();
    let stop = shutdown.clone();
    rt.spawn(async move {
        use tokio::signal::windows::{ctrl_break, ctrl_close};
        let (Ok(mut brk), Ok(mut close)) = (ctrl_break(), ctrl_close()) else {
            eprintln!("culvert: cannot handle Ctrl-Break; stop it with taskkill /F");
            return;
        };
        tokio::select! {
            _ = brk.recv() => {},
            _ = close.recv() => {},
            _ = tokio::signal::ctrl_c() => {},
        }
        stop.cancel();
    });
    shutdown
}

/// How `culvert connect` (and `culvert open`) end: the exit code says which kind of end.
fn connect_exit(r: Result<(), ConnectError>) -> ExitCode {
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

fn main() -> ExitCode {
    let matches = <Cli as clap::CommandFactory>::command().get_matches();
    let cli = match <Cli as clap::FromArgMatches>::from_arg_matches(&matches) {
        Ok(c) => c,
        Err(e) => e.exit(),
    };
    let typed = |name: &str| {
        matches
            .subcommand()
            .map_or(&matches, |(_, m)| m)
            .value_source(name)
            == Some(clap::parser::ValueSource::CommandLine)
    };
    let token_on_command_line = matches.subcommand_name() == Some("connect") && typed("token");
    let relay_typed = typed("relay");
    if token_on_command_line {
        eprintln!(
            "culvert: warning: --token shows the token to every user of this machine (ps); \
             set CULVERT_ACCESS_TOKEN or use --token-file instead"
        );
    }
    // The stdio mode's stderr is the ssh user's terminal: warnings only.
    let default_level = if matches!(
        cli.command,
        Command::Connect { stdio: None, .. } | Command::Open { .. }
    ) {
        "info"
    } else {
        "warn"
    };
    let filter = match cli.command {
        Command::Connect {
            verbose: Some(v), ..
        } => connect::log_filter(v).into(),
        _ => tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| default_level.into()),
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    // `culvert login`'s saved relay, CA and key: for that relay only.
    let saved = match cli.command {
        Command::Login { .. } | Command::Logout | Command::Connect { .. } => Ok(None),
        _ => Credentials::load(),
    };
    let saved = match saved {
        Ok(Some(c)) if cli.relay.as_ref().is_none_or(|r| *r == c.relay) => Some(c),
        Ok(_) => None,
        Err(e) if cli.relay.is_none() || cli.api_key.is_none() => return fail(e),
        Err(_) => None,
    };
    let mut cli = cli;
    if let Some(c) = &saved {
        cli.relay.get_or_insert_with(|| c.relay.clone());
        if cli.ca.is_none() {
            cli.ca = c.ca.clone();
        }
        cli.api_key.get_or_insert_with(|| c.api_key.clone());
    }
    let cli = cli;
    let api_key = cli.api_key.clone();
    // The proxy towards `host` (the relay's): --proxy, or the environment's.
    let proxy_for = |host: &str| {
        culvert_protocol::proxy::Proxy::choose(cli.proxy.as_deref(), host)
            .map_err(|e| format!("--proxy: {e}"))
    };
    let api_client = |key: Option<String>| -> Result<ApiClient, String> {
        let relay = cli
            .relay
            .clone()
            .ok_or("no relay given: pass --relay HOST:PORT, set CULVERT_RELAY, or culvert login")?;
        let key =
            key.ok_or("no API key given: pass --api-key, set CULVERT_API_KEY, or culvert login")?;
        let host = culvert_protocol::client::Endpoint::parse(&relay)?.host;
        ApiClient::new(&relay, &key, cli.ca.as_deref(), proxy_for(&host)?.as_ref())
            .map_err(|e| e.to_string())
    };
    let relay_settings = |wait: u64, reason: Option<String>| -> Result<RelaySettings, String> {
        Ok(RelaySettings {
            gateway_wait: std::time::Duration::from_secs(wait),
            reason,
            relay: cli
                .relay
                .clone()
                .ok_or("no relay given: pass --relay HOST:PORT or set CULVERT_RELAY")?,
            ca: cli.ca.clone(),
            proxy: cli.proxy.clone(),
        })
    };
    match cli.command {
        Command::Login { user } => {
            let key = match (user, api_key.clone()) {
                (Some(user), _) => {
                    match password(&format!("Password for {user}: ")).and_then(|pw| {
                        let api = api_client(Some(String::new()))?;
                        let v = api.login(&user, &pw).map_err(|e| e.to_string())?;
                        v["apiKey"]
                            .as_str()
                            .map(str::to_owned)
                            .ok_or_else(|| format!("the relay's answer has no apiKey: {v}"))
                    }) {
                        Ok(k) => k,
                        Err(e) => return fail(e),
                    }
                }
                (None, Some(k)) => k,
                (None, None) => match culvert_cli::credentials::read_secret("API key: ", "API key")
                {
                    Ok(k) => k,
                    Err(e) => return fail(e),
                },
            };
            let api = match api_client(Some(key.clone())) {
                Ok(a) => a,
                Err(e) => return fail(e),
            };
            let me = match api.get("/operators/me", &[]) {
                Ok(v) => v,
                Err(e) => return fail(e),
            };
            let c = Credentials {
                relay: cli.relay.clone().unwrap_or_default(),
                api_key: key,
                ca: cli
                    .ca
                    .as_ref()
                    .map(|p| std::path::absolute(p).unwrap_or_else(|_| p.clone())),
                operator: me["name"].as_str().unwrap_or_default().to_owned(),
            };
            match c.save() {
                Ok(path) => {
                    eprintln!(
                        "culvert: logged in to {} as {} ({}); saved in {}",
                        c.relay,
                        c.operator,
                        me["role"].as_str().unwrap_or("-"),
                        path.display()
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => fail(e),
            }
        }
        Command::Logout => match Credentials::remove() {
            Ok(true) => {
                eprintln!("culvert: logged out (the key itself still works until revoked)");
                ExitCode::SUCCESS
            }
            Ok(false) => {
                eprintln!("culvert: not logged in");
                ExitCode::SUCCESS
            }
            Err(e) => fail(e),
        },
        Command::Whoami => match api_client(api_key).map(|a| operator::whoami(&a, cli.json)) {
            Ok(Ok(_)) => ExitCode::SUCCESS,
            Ok(Err(e)) => fail(e),
            Err(e) => fail(e),
        },
        Command::Audit {
            event,
            operator,
            thing,
            tunnel,
            limit,
        } => {
            let q: Vec<(&str, String)> = [
                ("event", event),
                ("operator", operator),
                ("thing", thing),
                ("tunnel", tunnel),
                ("limit", Some(limit.to_string())),
            ]
            .into_iter()
            .filter_map(|(k, v)| v.map(|v| (k, v)))
            .collect();
            match api_client(api_key).map(|a| operator::audit(&a, &q, cli.json)) {
                Ok(Ok(_)) => ExitCode::SUCCESS,
                Ok(Err(e)) => fail(e),
                Err(e) => fail(e),
            }
        }
        Command::Access { command } => {
            let api = match api_client(api_key) {
                Ok(a) => a,
                Err(e) => return fail(e),
            };
            let j = cli.json;
            let r = match command {
                AccessCommand::Request {
                    thing,
                    services,
                    minutes,
                    from,
                    reason,
                } => operator::request(
                    &api,
                    operator::RequestArgs {
                        thing,
                        services,
                        from,
                        minutes,
                        reason,
                    },
                    j,
                ),
                AccessCommand::List { pending } => operator::requests(&api, pending, j),
                AccessCommand::Approve { request_id } => {
                    operator::decide(&api, &request_id, true, None, j)
                }
                AccessCommand::Refuse { request_id, why } => {
                    operator::decide(&api, &request_id, false, why, j)
                }
            };
            match r {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(e),
            }
        }
        Command::Operator { command } => {
            let api = match api_client(api_key) {
                Ok(a) => a,
                Err(e) => return fail(e),
            };
            let j = cli.json;
            let r = match command {
                OperatorCommand::Add { name, role } => operator::add(&api, &name, &role, j),
                OperatorCommand::List => operator::list(&api, j),
                OperatorCommand::Password { name } => {
                    match password(&format!("New password for {name}: ")) {
                        Ok(pw) => operator::set_password(&api, &name, &pw, j),
                        Err(e) => return fail(e),
                    }
                }
                OperatorCommand::Disable { name } => operator::set_disabled(&api, &name, true, j),
                OperatorCommand::Enable { name } => operator::set_disabled(&api, &name, false, j),
                OperatorCommand::Key {
                    command:
                        KeyCommand::Create {
                            name,
                            label,
                            expires_in_days,
                            aws,
                        },
                } => operator::key_create(&api, &name, label, expires_in_days, aws, j),
                OperatorCommand::Key {
                    command: KeyCommand::Revoke { name, key_id },
                } => operator::key_revoke(&api, &name, &key_id, j),
                OperatorCommand::Grant {
                    command:
                        GrantCommand::Add {
                            name,
                            things,
                            services,
                            from,
                            until,
                            minutes,
                        },
                } => operator::grant_add(
                    &api,
                    &name,
                    operator::GrantArgs {
                        things,
                        services,
                        from,
                        until,
                        minutes,
                    },
                    j,
                ),
                OperatorCommand::Grant {
                    command: GrantCommand::Revoke { name, grant_id },
                } => operator::grant_revoke(&api, &name, &grant_id, j),
            };
            match r {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(e),
            }
        }
        Command::Ssh {
            service,
            wait,
            ssh,
            reason,
            destination,
            ssh_args,
        } => {
            let (api, relay) =
                match api_client(api_key).and_then(|a| Ok((a, relay_settings(wait, reason)?))) {
                    Ok(x) => x,
                    Err(e) => return fail(e),
                };
            match reach::ssh(&api, &relay, &service, &ssh, &destination, &ssh_args) {
                Ok(code) => ExitCode::from(code),
                Err(e) => fail(e),
            }
        }
        Command::Open {
            thing,
            services,
            local,
            wait,
            bind,
            reason,
        } => {
            let (api, relay) =
                match api_client(api_key).and_then(|a| Ok((a, relay_settings(wait, reason)?))) {
                    Ok(x) => x,
                    Err(e) => return fail(e),
                };
            connect_exit(reach::open(
                &api,
                &relay,
                &thing,
                &services,
                local,
                bind,
                stop_on_signals,
            ))
        }
        Command::Device { command } => {
            let api = match api_client(api_key) {
                Ok(a) => a,
                Err(e) => return fail(e),
            };
            let r = match command {
                DeviceCommand::Add { thing, tags } => tunnel::device_add(
                    &api,
                    &thing,
                    &tags,
                    cli.relay.as_deref().unwrap_or_default(),
                    cli.ca.as_deref(),
                    cli.json,
                ),
                DeviceCommand::Tag { thing, tags } => {
                    tunnel::device_tag(&api, &thing, &tags, cli.json)
                }
                DeviceCommand::List => tunnel::device_list(&api, cli.json),
                DeviceCommand::Remove { thing } => tunnel::device_remove(&api, &thing, cli.json),
            };
            match r {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(e),
            }
        }
        Command::Tunnel { command } => {
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
                    reason,
                    tags,
                    strict,
                } => tunnel::open(
                    &api,
                    tunnel::OpenArgs {
                        thing,
                        services,
                        lifetime_minutes: lifetime,
                        description,
                        reason,
                        tags,
                        strict,
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
            proxy_endpoint,
            region,
            services,
            destination,
            stdio,
            bind,
            mode,
            format,
            resume_hold,
            udp_idle_secs,
            verbose: _,
            no_verify,
        } => {
            if no_verify {
                return fail(
                    "-k (no certificate verification) is not supported: culvert always verifies \
                     the relay. Pass the relay's CA with -c DIR or --ca FILE",
                );
            }
            let endpoint = match connect::endpoint(
                cli.relay.as_deref().filter(|_| relay_typed),
                proxy_endpoint.as_deref(),
                region.as_deref(),
                cli.relay.as_deref().filter(|_| !relay_typed),
            ) {
                Ok(e) => e,
                Err(e) => return fail(e),
            };
            // The localproxy's environment, after culvert's own.
            let aws_env = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
            let token = token.or_else(|| {
                token_file
                    .is_none()
                    .then(|| aws_env("AWSIOT_TUNNEL_ACCESS_TOKEN"))
                    .flatten()
            });
            let token = match culvert_protocol::client::access_token(token, token_file.as_deref()) {
                Ok(t) => t,
                Err(e) => {
                    return fail(format!(
                        "{e}: set CULVERT_ACCESS_TOKEN (or AWSIOT_TUNNEL_ACCESS_TOKEN), or pass \
                         --token-file FILE"
                    ));
                }
            };
            let client_token = client_token.or_else(|| aws_env("AWSIOT_TUNNEL_CLIENT_TOKEN"));
            let local = match (stdio, services, destination) {
                (Some(service), _, _) => Local::Stdio { service },
                (None, Some(_), Some(_)) => {
                    return fail(
                        "-s and -d together: a proxy is the tunnel's source (-s) or its \
                         destination (-d), not both",
                    );
                }
                (None, Some(services), None) => match connect::parse_mappings(&services) {
                    Ok(mappings) => Local::Listen {
                        mappings,
                        bind: bind.unwrap_or_else(|| "127.0.0.1".into()),
                    },
                    Err(e) => return fail(format!("-s {e}")),
                },
                (None, None, Some(d)) => match connect::parse_targets(&d) {
                    Ok(targets) => Local::Destination { targets },
                    Err(e) => return fail(format!("-d {e}")),
                },
                (None, None, None) => {
                    return fail(
                        "say what to carry: -s SERVICE=PORT (the source side), -d \
                         SERVICE=HOST:PORT (the destination side), or --stdio SERVICE",
                    );
                }
            };
            match (mode.as_deref(), &local) {
                (None, _)
                | (Some("src" | "source"), Local::Listen { .. } | Local::Stdio { .. })
                | (Some("dst" | "destination"), Local::Destination { .. }) => {}
                (Some(m @ ("src" | "source" | "dst" | "destination")), _) => {
                    return fail(format!(
                        "-m {m} does not match the mappings: -s is the source side, -d the \
                         destination side"
                    ));
                }
                (Some(m), _) => return fail(format!("-m {m:?}: expected src or dst")),
            }
            let proxy = match proxy_for(&endpoint.host) {
                Ok(p) => p,
                Err(e) => return fail(e),
            };
            let args = ConnectArgs {
                proxy,
                endpoint,
                access_token: token,
                client_token,
                ca: cli.ca,
                local,
                format,
                resume_hold: (resume_hold > 0).then(|| std::time::Duration::from_secs(resume_hold)),
                udp_idle: std::time::Duration::from_secs(udp_idle_secs),
            };
            let rt = match culvert_protocol::session::end_runtime() {
                Ok(rt) => rt,
                Err(e) => return fail(e),
            };
            let shutdown = stop_on_signals(&rt);
            let r = rt.block_on(connect::run(args, shutdown));
            rt.shutdown_timeout(std::time::Duration::from_secs(1));
            connect_exit(r)
        }
    }
}
