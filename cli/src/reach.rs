//! `culvert ssh` and `culvert open`: one command to a device.
//!
//! Each opens a tunnel of its own to the thing, waits for the thing's gateway to connect to it,
//! carries the session, and closes the tunnel when the session ends: ssh exits, or Ctrl-C,
//! SIGTERM or SIGHUP arrive. The tunnel's record stays (closed) for the audit trail.
//!
//! Decision: a new tunnel every time, never a reuse of an open one. The relay shows a source
//! token only when it issues it, so reusing a tunnel would mean rotating its source token, which
//! cuts off whoever holds it now (another operator's `culvert connect`). Once operators have
//! accounts of their own (issue 16), a tunnel can be reused by the operator who opened it.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::api::ApiClient;
use crate::connect::{self, ConnectArgs, ConnectError, Local, Mapping};
use culvert_protocol::client::Endpoint;

/// A tunnel this command opened; closed when dropped.
pub struct Opened<'a> {
    api: &'a ApiClient,
    pub id: String,
    pub source_token: culvert_protocol::Secret,
}

impl Drop for Opened<'_> {
    fn drop(&mut self) {
        match self
            .api
            .post(&format!("/tunnels/{}/close", self.id), &json!({}))
        {
            Ok(_) => eprintln!("culvert: tunnel {} closed", self.id),
            Err(e) => eprintln!(
                "culvert: could not close tunnel {} ({e}); close it with `culvert tunnel close {}`",
                self.id, self.id
            ),
        }
    }
}

/// Open a tunnel to `thing` for `services` and wait until the thing's gateway is connected.
pub fn open_tunnel<'a>(
    api: &'a ApiClient,
    thing: &str,
    services: &[String],
    purpose: &str,
    reason: Option<&str>,
    wait: Duration,
) -> Result<Opened<'a>, String> {
    let by = std::env::var("USER").unwrap_or_default();
    let description = format!(
        "culvert {purpose} by {}",
        if by.is_empty() { "-" } else { &by }
    );
    // A service the gateway has reported no rule for would only give an empty session: refuse
    // before opening anything; a target that does not answer is a warning.
    let check = crate::tunnel::check_services(api, thing, services);
    if matches!(check, crate::tunnel::ServiceCheck::Reported { .. }) {
        crate::tunnel::warn_of(thing, &check, true).map_err(|e| e.to_string())?;
    }
    let mut body = json!({"thingName": thing, "services": services, "description": description});
    if let Some(r) = reason {
        body["reason"] = json!(r);
    }
    let v = api.post("/tunnels", &body).map_err(|e| e.to_string())?;
    let (Some(id), Some(token)) = (v["tunnelId"].as_str(), v["sourceAccessToken"].as_str()) else {
        return Err(format!(
            "the relay's answer has no tunnel id or source token: {v}"
        ));
    };
    let opened = Opened {
        api,
        id: id.to_owned(),
        source_token: token.into(),
    };
    eprintln!(
        "culvert: tunnel {id} opened to {thing} ({}); waiting for its gateway",
        services.join(", ")
    );
    let deadline = Instant::now() + wait;
    loop {
        let v: Value = api
            .get(&format!("/tunnels/{id}"), &[])
            .map_err(|e| e.to_string())?;
        if v["destinationConnectionState"]["status"] == "CONNECTED" {
            wait_on_site(api, thing, id)?;
            return Ok(opened);
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "the gateway of {thing} did not connect to the tunnel within {wait:?}: is \
                 its culvertd running, with thing_name = \"{thing}\" and the password from \
                 `culvert device add --thing {thing}`? (`culvert device list` shows the registered \
                 devices)"
            ));
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Longest wait for a site's decision (culvertd's approval timeout is at most a day).
const ON_SITE_WAIT: Duration = Duration::from_secs(86_400);
/// How long a connected gateway's "waiting" report may lag behind its connection.
const ON_SITE_REPORT_LAG: Duration = Duration::from_secs(1);

/// If the thing's site approves each tunnel (culvertd `[consent] approve_tunnels`), say so and
/// wait for its decision: `Err` if it refused.
fn wait_on_site(api: &ApiClient, thing: &str, id: &str) -> Result<(), String> {
    let started = Instant::now();
    let mut told = false;
    loop {
        let v: Value = api
            .get(&format!("/tunnels/{id}"), &[])
            .map_err(|e| e.to_string())?;
        let on_site = &v["onSite"];
        let by = on_site["by"].as_str().map(crate::output::shown);
        let detail = on_site["detail"].as_str().map(crate::output::shown);
        match on_site["state"].as_str() {
            // A site that asks for no approval (or a gateway that is not culvertd) reports
            // nothing; its report, if any, comes with the gateway's connection.
            None if started.elapsed() >= ON_SITE_REPORT_LAG => return Ok(()),
            Some("approved") => {
                if told {
                    eprintln!(
                        "culvert: approved on site by {}",
                        by.as_deref().unwrap_or("someone")
                    );
                }
                return Ok(());
            }
            Some("refused") => {
                return Err(format!(
                    "the site refused the tunnel to {thing} (by {}): {}",
                    by.as_deref().unwrap_or("someone"),
                    detail.as_deref().unwrap_or("no reason given")
                ));
            }
            Some("waiting") if !told => {
                eprintln!(
                    "culvert: waiting for on-site approval at {thing} (someone there runs \
                     `culvertd consent approve {id}`)"
                );
                told = true;
            }
            _ if v["status"] == "CLOSED" => {
                return Err(format!(
                    "tunnel {id} was closed while waiting ({})",
                    v["closeReason"].as_str().unwrap_or("closed")
                ));
            }
            _ => {}
        }
        if started.elapsed() >= ON_SITE_WAIT {
            return Err(format!(
                "nobody at the site of {thing} decided on tunnel {id} within {ON_SITE_WAIT:?}"
            ));
        }
        std::thread::sleep(Duration::from_millis(if told { 500 } else { 100 }));
    }
}

/// The relay's settings, handed to the `culvert connect` that ssh starts.
pub struct RelaySettings {
    pub relay: String,
    pub ca: Option<PathBuf>,
    /// `--proxy` as given (the environment's proxy variables reach ssh's proxy as they are).
    pub proxy: Option<String>,
    /// How long to wait for the thing's gateway to connect to a new tunnel.
    pub gateway_wait: Duration,
    /// Why the tunnel is opened (`--reason`).
    pub reason: Option<String>,
}

/// `culvert ssh [user@]THING [ssh arguments…]`: returns ssh's exit code.
pub fn ssh(
    api: &ApiClient,
    relay: &RelaySettings,
    service: &str,
    ssh_program: &str,
    destination: &str,
    ssh_args: &[OsString],
) -> Result<u8, String> {
    let thing = destination.rsplit_once('@').map_or(destination, |(_, t)| t);
    if !culvert_protocol::valid_name(thing) {
        return Err(format!(
            "{thing:?} is not a thing name (1-128 characters of A-Z a-z 0-9 : _ -)"
        ));
    }
    let me = std::env::current_exe()
        .map_err(|e| format!("cannot find the culvert program itself: {e}"))?;
    let opened = open_tunnel(
        api,
        thing,
        &[service.to_owned()],
        "ssh",
        relay.reason.as_deref(),
        relay.gateway_wait,
    )?;
    let mut cmd = tokio::process::Command::new(ssh_program);
    cmd.arg("-o")
        .arg(format!("ProxyCommand={}", proxy_command(&me, service)))
        // Known hosts are kept by thing name, not by the proxy's address.
        .arg("-o")
        .arg(format!("HostKeyAlias={thing}"))
        .arg(destination)
        .args(ssh_args)
        // The proxy gets the tunnel's token and the relay in its environment (not on a command
        // line `ps` shows), and nothing it does not need.
        .env("CULVERT_ACCESS_TOKEN", opened.source_token.expose())
        .env("CULVERT_RELAY", &relay.relay)
        .env_remove("CULVERT_API_KEY")
        .env_remove("CULVERT_CLIENT_TOKEN");
    match &relay.ca {
        Some(ca) => cmd.env("CULVERT_CA", ca),
        None => cmd.env_remove("CULVERT_CA"),
    };
    match &relay.proxy {
        Some(proxy) => cmd.env("CULVERT_PROXY", proxy),
        None => cmd.env_remove("CULVERT_PROXY"),
    };
    let rt = culvert_protocol::session::end_runtime().map_err(|e| e.to_string())?;
    let status = rt.block_on(async {
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("cannot run {ssh_program}: {e} (install openssh-client)"))?;
        wait_child_forwarding_signals(&mut child).await
    })?;
    drop(opened);
    // ssh's own code; a signal that ended it reads as the shell shows it.
    Ok(status.code().map_or(255, |c| c.clamp(0, 255) as u8))
}

/// ssh runs its ProxyCommand through the user's shell, and expands `%` tokens in it.
fn proxy_command(culvert: &Path, service: &str) -> String {
    let path = culvert.to_string_lossy().replace('\'', r"'\''");
    format!("'{path}' connect --stdio {service}").replace('%', "%%")
}

/// Wait for ssh. Ctrl-C belongs to ssh (it is in the terminal's foreground group with us), so
/// SIGINT is ignored here; SIGTERM and SIGHUP are passed on to ssh, which restores the
/// terminal before it exits.
#[cfg(unix)]
async fn wait_child_forwarding_signals(
    child: &mut tokio::process::Child,
) -> Result<std::process::ExitStatus, String> {
    use tokio::signal::unix::{SignalKind, signal};
    let handler = |kind| signal(kind).map_err(|e| format!("cannot handle signals: {e}"));
    let (mut int, mut term, mut hup) = (
        handler(SignalKind::interrupt())?,
        handler(SignalKind::terminate())?,
        handler(SignalKind::hangup())?,
    );
    loop {
        let pass_on = tokio::select! {
            status = child.wait() => return status.map_err(|e| e.to_string()),
            _ = int.recv() => None,
            _ = term.recv() => Some(nix::sys::signal::Signal::SIGTERM),
            _ = hup.recv() => Some(nix::sys::signal::Signal::SIGHUP),
        };
        if let (Some(sig), Some(pid)) = (pass_on, child.id()) {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), sig);
        }
    }
}

/// Wait for ssh. On Windows, Ctrl-C reaches every process of the console, ssh included, which
/// decides what it means: it is ignored here.
#[cfg(not(unix))]
async fn wait_child_forwarding_signals(
    child: &mut tokio::process::Child,
) -> Result<std::process::ExitStatus, String> {
    loop {
        tokio::select! {
            status = child.wait() => return status.map_err(|e| e.to_string()),
            _ = tokio::signal::ctrl_c() => {}
        }
    }
}

/// `culvert open THING --service X…`: the local proxy for a tunnel of its own, in the
/// foreground until `shutdown`.
pub fn open(
    api: &ApiClient,
    relay: &RelaySettings,
    thing: &str,
    services: &[String],
    local: Option<u16>,
    bind: String,
    shutdown: impl FnOnce(&tokio::runtime::Runtime) -> CancellationToken,
) -> Result<(), ConnectError> {
    if local.is_some() && services.len() != 1 {
        return Err(ConnectError::Fatal(
            "--local names the port of a single service; with several, each gets a free port \
             (or use `culvert tunnel open` and `culvert connect -s SERVICE=PORT,…`)"
                .into(),
        ));
    }
    let endpoint = Endpoint::parse(&relay.relay).map_err(ConnectError::Fatal)?;
    let proxy = culvert_protocol::proxy::Proxy::choose(relay.proxy.as_deref(), &endpoint.host)
        .map_err(|e| ConnectError::Fatal(format!("--proxy: {e}")))?;
    let opened = open_tunnel(
        api,
        thing,
        services,
        "open",
        relay.reason.as_deref(),
        relay.gateway_wait,
    )
    .map_err(ConnectError::Fatal)?;
    eprintln!("culvert: Ctrl-C closes the tunnel");
    let args = ConnectArgs {
        endpoint,
        proxy,
        access_token: opened.source_token.clone(),
        client_token: None,
        ca: relay.ca.clone(),
        local: Local::Listen {
            mappings: services
                .iter()
                .map(|s| Mapping {
                    service: Some(s.clone()),
                    port: local.unwrap_or(0),
                    udp: false,
                })
                .collect(),
            bind,
        },
        resume_hold: Some(culvert_protocol::session::DEFAULT_RESUME_HOLD),
        udp_idle: connect::DEFAULT_UDP_IDLE,
        format: None,
    };
    let rt =
        culvert_protocol::session::end_runtime().map_err(|e| ConnectError::Fatal(e.to_string()))?;
    let stop = shutdown(&rt);
    let r = rt.block_on(connect::run(args, stop));
    rt.shutdown_timeout(Duration::from_secs(1));
    drop(opened);
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_proxy_command_survives_the_shell_and_ssh_tokens() {
        assert_eq!(
            proxy_command(Path::new("/opt/it's 100%/culvert"), "SSH"),
            r"'/opt/it'\''s 100%%/culvert' connect --stdio SSH"
        );
    }
}
