//! Reaching a rule's target: resolve its name (now, not at configuration time), check every
//! address it resolves to against the rule's ACL, and connect to the first that answers within
//! the rule's connect timeout. Used for tcp rules and for the upstreams of http routes. A udp
//! target is resolved and checked the same way; its socket is connected to the first address
//! (UDP sends nothing to connect, so there is nothing to wait for).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::net::{TcpStream, UdpSocket, UnixStream};

use crate::acl;
use crate::audit::EndReason;
use crate::config::{HostPort, Service, Target};

/// Why a connection could not be made.
#[derive(Debug)]
pub struct Refusal {
    pub reason: EndReason,
    pub detail: String,
    pub address: Option<String>,
}

impl Refusal {
    pub fn new(reason: EndReason, detail: String) -> Refusal {
        Refusal {
            reason,
            detail,
            address: None,
        }
    }
}

pub enum Local {
    Tcp(TcpStream, SocketAddr),
    Udp(UdpSocket, SocketAddr),
    Unix(UnixStream),
    /// The port, and the claim that keeps other connections off it until it ends.
    Serial(serial2_tokio::SerialPort, crate::serial::Claim),
}

/// Resolve `hp` (literal addresses as they are, names now), within `timeout`.
pub async fn resolve(hp: &HostPort, timeout: Duration) -> Result<Vec<SocketAddr>, Refusal> {
    if let Some(ip) = hp.literal() {
        return Ok(vec![SocketAddr::new(ip, hp.port)]);
    }
    match tokio::time::timeout(
        timeout,
        tokio::net::lookup_host((hp.host.as_str(), hp.port)),
    )
    .await
    {
        Ok(Ok(addrs)) => {
            let v: Vec<SocketAddr> = addrs.collect();
            if v.is_empty() {
                Err(Refusal::new(
                    EndReason::ConnectFailed,
                    format!("{} resolves to no address", hp.host),
                ))
            } else {
                Ok(v)
            }
        }
        Ok(Err(e)) => Err(Refusal::new(
            EndReason::ConnectFailed,
            format!("cannot resolve {}: {e}", hp.host),
        )),
        Err(_) => Err(Refusal::new(
            EndReason::ConnectTimeout,
            format!("resolving {} took longer than {timeout:?}", hp.host),
        )),
    }
}

/// Every address must pass the rule's ACL: a name that resolves to one denied address is refused
/// as a whole (it is either misconfigured or being used to reach around the ACL).
pub fn check_all(svc: &Service, hp: &HostPort, addrs: &[SocketAddr]) -> Result<(), Refusal> {
    let own = acl::own_addresses();
    for a in addrs {
        if let Err(why) = svc.policy.check(*a, &own) {
            let detail = if hp.literal().is_some() {
                format!("{hp} denied: {why}")
            } else {
                format!("{hp} resolves to {a}, denied: {why}")
            };
            return Err(Refusal {
                reason: EndReason::Denied,
                detail,
                address: Some(a.to_string()),
            });
        }
    }
    Ok(())
}

pub async fn connect(svc: &Service, target: &Target) -> Result<Local, Refusal> {
    let deadline = Instant::now() + svc.connect_timeout;
    let timed_out = || {
        Refusal::new(
            EndReason::ConnectTimeout,
            format!("{target} did not answer within {:?}", svc.connect_timeout),
        )
    };
    match target {
        Target::Serial(path) => {
            let claim =
                crate::serial::claim(path).map_err(|why| Refusal::new(EndReason::InUse, why))?;
            let settings = svc.serial.clone().unwrap_or_default();
            match crate::serial::open(path, &settings) {
                Ok(port) => Ok(Local::Serial(port, claim)),
                Err(e) => Err(Refusal::new(
                    EndReason::ConnectFailed,
                    format!("{target}: {e}"),
                )),
            }
        }
        Target::Unix(path) => {
            match tokio::time::timeout(svc.connect_timeout, UnixStream::connect(path)).await {
                Ok(Ok(s)) => Ok(Local::Unix(s)),
                Ok(Err(e)) => Err(Refusal::new(
                    EndReason::ConnectFailed,
                    format!("{target}: {e}"),
                )),
                Err(_) => Err(timed_out()),
            }
        }
        Target::Udp(hp) => {
            let addrs = resolve(hp, svc.connect_timeout).await?;
            check_all(svc, hp, &addrs)?;
            let a = addrs[0];
            let failed = |e: std::io::Error| Refusal {
                reason: EndReason::ConnectFailed,
                detail: format!("{target} ({a}): {e}"),
                address: Some(a.to_string()),
            };
            let any: SocketAddr = if a.is_ipv4() {
                (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
            } else {
                (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
            };
            let udp = UdpSocket::bind(any).await.map_err(failed)?;
            udp.connect(a).await.map_err(failed)?;
            Ok(Local::Udp(udp, a))
        }
        Target::Tcp(hp) => {
            let addrs = resolve(hp, svc.connect_timeout).await?;
            check_all(svc, hp, &addrs)?;
            let mut last = None;
            for a in &addrs {
                let left = deadline.saturating_duration_since(Instant::now());
                match tokio::time::timeout(left, TcpStream::connect(a)).await {
                    Ok(Ok(tcp)) => {
                        let _ = tcp.set_nodelay(true);
                        return Ok(Local::Tcp(tcp, *a));
                    }
                    Ok(Err(e)) => last = Some((*a, e)),
                    Err(_) => {
                        let mut r = timed_out();
                        r.address = Some(a.to_string());
                        return Err(r);
                    }
                }
            }
            let (a, e) = last.expect("at least one address");
            let detail = match hp.literal() {
                Some(_) => format!("{target}: {e}"),
                None => format!("{target} ({a}): {e}"),
            };
            Err(Refusal {
                reason: EndReason::ConnectFailed,
                detail,
                address: Some(a.to_string()),
            })
        }
    }
}
