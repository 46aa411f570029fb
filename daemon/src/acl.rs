//! Which addresses a rule may reach.
//!
//! Checked on the concrete socket address, after name resolution, right before connecting:
//! a name cannot be re-pointed past the check (no DNS rebinding), and every address a name
//! resolves to must pass. The decision, in order:
//!
//! 1. IPv6 addresses that carry an IPv4 address are treated as that IPv4 address: IPv4-mapped
//!    (`::ffff:a.b.c.d`), IPv4-compatible (`::a.b.c.d`), NAT64 with the well-known prefix
//!    (`64:ff9b::a.b.c.d`) or a local-use one (`64:ff9b:1::/48`, with the IPv4 address in the
//!    last 32 bits, as a /96 translation prefix has it), and 6to4 (`2002:aabb:ccdd::/48`).
//!    Deny entries match both the address as written and the IPv4 address it carries.
//! 2. Unspecified, multicast and broadcast addresses are never reached.
//! 3. An address in any `deny` network (global or the rule's) is denied: deny wins.
//! 4. An address in no `allow` network (global or the rule's) is denied: default deny.
//! 5. Sensitive addresses need an *explicit* allow — an allow network that lies inside the
//!    sensitive range, not a wide one that happens to cover it (`0.0.0.0/0` does not open the
//!    cloud metadata service):
//!    - cloud metadata services (169.254.169.254, fd00:ec2::254, 100.100.100.200);
//!    - link-local networks (169.254.0.0/16, fe80::/10);
//!    - the gateway's own management ports (`acl.management_ports`, default 22) on its
//!      loopback and interface addresses;
//!    - local-use NAT64 (`64:ff9b:1::/48`) and Teredo (`2001::/32`) addresses, whose IPv4
//!      target depends on the translator: an allow entry within that range, as written.

use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;

/// The ACL of one rule: global networks plus the rule's own; each remembers the key it came from.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Policy {
    pub allow: Vec<(IpNet, String)>,
    pub deny: Vec<(IpNet, String)>,
    pub management_ports: Vec<u16>,
}

const METADATA: &[&str] = &[
    "169.254.169.254/32",
    "fd00:ec2::254/128",
    "100.100.100.200/32",
];
const LINK_LOCAL: &[&str] = &["169.254.0.0/16", "fe80::/10"];
const LOOPBACK: &[&str] = &["127.0.0.0/8", "::1/128"];
/// Local-use NAT64 (RFC 8215) and Teredo (RFC 4380).
const UNCERTAIN: &[&str] = &["64:ff9b:1::/48", "2001::/32"];

fn nets(list: &'static [&'static str]) -> impl Iterator<Item = IpNet> {
    list.iter().map(|n| n.parse().expect("built-in network"))
}

/// The IPv4 address an IPv6 address stands for, so that IPv4 rules apply to it (a NAT64
/// gateway or a 6to4 relay on site would carry a connection to that IPv4 host); other
/// addresses unchanged:
/// - IPv4-mapped `::ffff:a.b.c.d` and IPv4-compatible `::a.b.c.d` (not `::` or `::1`);
/// - NAT64, the well-known prefix `64:ff9b::/96` and the local-use `64:ff9b:1::/48` (RFC 8215;
///   the IPv4 address in the last 32 bits, as with a /96 translation prefix);
/// - 6to4 `2002:aabb:ccdd::/48` (RFC 3056: the IPv4 address in bits 16-47).
pub fn canonical(ip: IpAddr) -> IpAddr {
    let IpAddr::V6(v6) = ip else { return ip };
    let s = v6.segments();
    let o = v6.octets();
    let last32 = || IpAddr::V4(std::net::Ipv4Addr::new(o[12], o[13], o[14], o[15]));
    if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] || s[..3] == [0x64, 0xff9b, 1] {
        return last32();
    }
    if s[0] == 0x2002 {
        return IpAddr::V4(std::net::Ipv4Addr::new(o[2], o[3], o[4], o[5]));
    }
    if s[..6] == [0; 6] && !v6.is_unspecified() && !v6.is_loopback() {
        return last32();
    }
    ip.to_canonical()
}

/// Parse `10.0.0.0/8`, `fd00::/8` or a bare address (a single host). IPv4-mapped IPv6
/// networks become the IPv4 networks they denote.
pub fn parse_net(s: &str) -> Result<IpNet, String> {
    let s = s.trim();
    let net = match s.parse::<IpNet>() {
        Ok(n) => n,
        Err(_) => match s.parse::<IpAddr>() {
            Ok(ip) => IpNet::from(ip),
            Err(_) => {
                return Err(format!(
                    "{s:?} is not a network (e.g. \"192.168.10.0/24\", \"fd00::/8\") or an address"
                ));
            }
        },
    };
    if let IpNet::V6(v6) = net
        && let Some(v4) = v6.addr().to_ipv4_mapped()
        && v6.prefix_len() >= 96
    {
        return Ok(IpNet::new(IpAddr::V4(v4), v6.prefix_len() - 96)
            .expect("prefix within 32")
            .trunc());
    }
    if net != net.trunc() {
        return Err(format!(
            "{s:?} has host bits set; did you mean {}?",
            net.trunc()
        ));
    }
    Ok(net)
}

/// The gateway's own addresses: loopback and every interface address.
pub fn own_addresses() -> Vec<IpAddr> {
    let mut v: Vec<IpAddr> = Vec::new();
    if let Ok(ifs) = nix::ifaddrs::getifaddrs() {
        for i in ifs {
            let Some(a) = i.address else { continue };
            if let Some(s) = a.as_sockaddr_in() {
                v.push(IpAddr::V4(s.ip()));
            } else if let Some(s) = a.as_sockaddr_in6() {
                v.push(IpAddr::V6(s.ip()));
            }
        }
    }
    v
}

impl Policy {
    /// May a connection go to `addr`? `own` are the gateway's own addresses.
    pub fn check(&self, addr: SocketAddr, own: &[IpAddr]) -> Result<(), String> {
        let raw = addr.ip();
        let ip = canonical(raw);
        let never = match ip {
            IpAddr::V4(v4) => v4.is_unspecified() || v4.is_multicast() || v4.is_broadcast(),
            IpAddr::V6(v6) => v6.is_unspecified() || v6.is_multicast(),
        };
        if never {
            return Err(format!("{ip} is not a unicast host address"));
        }
        // Deny entries apply to the address as written and to the IPv4 address it carries
        // (`deny = ["2002::/16"]` still denies 6to4).
        if let Some((net, from)) = self
            .deny
            .iter()
            .find(|(n, _)| n.contains(&ip) || n.contains(&raw))
        {
            return Err(format!("{raw} is in denied network {net} ({from})"));
        }
        let allowing: Vec<&IpNet> = self
            .allow
            .iter()
            .filter(|(n, _)| n.contains(&ip))
            .map(|(n, _)| n)
            .collect();
        if allowing.is_empty() {
            return Err(format!(
                "{ip} is in no allowed network (default deny: add it to acl.allow or the rule's allow)"
            ));
        }
        // Sensitive ranges: the most specific first, so the message names the narrowest.
        let mut sensitive: Vec<(IpNet, &str)> = Vec::new();
        sensitive.extend(nets(METADATA).map(|n| (n, "a cloud metadata address")));
        sensitive.extend(nets(LINK_LOCAL).map(|n| (n, "link-local")));
        if self.management_ports.contains(&addr.port()) {
            let is_own = own.iter().any(|o| canonical(*o) == ip);
            for n in nets(LOOPBACK).filter(|n| n.contains(&ip)) {
                sensitive.push((n, "this gateway's own management port"));
            }
            if is_own && !ip.is_loopback() {
                sensitive.push((IpNet::from(ip), "this gateway's own management port"));
            }
        }
        for (range, what) in sensitive.iter().filter(|(n, _)| n.contains(&ip)) {
            if !allowing.iter().any(|a| range.contains(*a)) {
                return Err(format!(
                    "{ip}:{} is {what}; only an allow entry within {range} opens it",
                    addr.port()
                ));
            }
        }
        // Translated addresses whose IPv4 target the ACL cannot know for sure: a local-use NAT64
        // prefix may embed the IPv4 address elsewhere than a /96 would, and Teredo obfuscates it.
        for range in nets(UNCERTAIN).filter(|n| n.contains(&raw)) {
            let opened = self
                .allow
                .iter()
                .any(|(a, _)| range.contains(a) && a.contains(&raw));
            if !opened {
                return Err(format!(
                    "{raw} is in {range}, whose IPv4 target depends on the translator; only an allow entry within {range} opens it"
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(allow: &[&str], deny: &[&str]) -> Policy {
        let p = |l: &[&str], key: &str| {
            l.iter()
                .map(|s| (parse_net(s).unwrap(), key.to_owned()))
                .collect()
        };
        Policy {
            allow: p(allow, "acl.allow"),
            deny: p(deny, "acl.deny"),
            management_ports: vec![22, 9100],
        }
    }

    fn ok(p: &Policy, a: &str) -> bool {
        p.check(a.parse().unwrap(), &["192.168.1.5".parse().unwrap()])
            .is_ok()
    }

    #[test]
    fn default_deny_and_deny_wins() {
        let p = policy(&["10.0.0.0/8"], &["10.9.0.0/16"]);
        assert!(ok(&p, "10.1.2.3:502"));
        assert!(!ok(&p, "10.9.0.1:502"));
        assert!(!ok(&p, "192.168.2.1:80"));
        assert!(!ok(&policy(&[], &[]), "10.1.2.3:502"));
        let e = p.check("10.9.0.1:1".parse().unwrap(), &[]).unwrap_err();
        assert!(e.contains("10.9.0.0/16 (acl.deny)"), "{e}");
    }

    #[test]
    fn mapped_ipv6_is_its_ipv4() {
        let p = policy(&["0.0.0.0/0", "::/0"], &["10.9.0.0/16"]);
        assert!(!ok(&p, "[::ffff:10.9.0.1]:80"));
        assert!(!ok(&p, "[::ffff:a09:1]:80"));
        assert!(!ok(&p, "[64:ff9b::10.9.0.1]:80"));
        assert!(
            !ok(&p, "[64:ff9b::a9fe:a9fe]:80"),
            "NAT64 of 169.254.169.254"
        );
        // Networks written in the mapped form mean the IPv4 network.
        assert_eq!(
            parse_net("::ffff:10.9.0.0/112").unwrap(),
            parse_net("10.9.0.0/16").unwrap()
        );
        let p = policy(&["::ffff:10.0.0.0/104"], &[]);
        assert!(ok(&p, "10.1.1.1:80"));
    }

    #[test]
    fn every_ipv6_form_that_carries_an_ipv4_address_is_that_address() {
        let p = policy(&["0.0.0.0/0", "::/0"], &["10.9.0.0/16"]);
        for (addr, v4) in [
            ("[2002:a09:1::1]:80", "10.9.0.1"),       // 6to4
            ("[::10.9.0.1]:80", "10.9.0.1"),          // IPv4-compatible
            ("[64:ff9b:1::10.9.0.1]:80", "10.9.0.1"), // local-use NAT64
            ("[64:ff9b:1:7::a09:1]:80", "10.9.0.1"),
            ("[2002:a9fe:a9fe::]:80", "169.254.169.254"), // 6to4 of the metadata service
        ] {
            assert!(!ok(&p, addr), "{addr} reaches {v4}");
            let sa: SocketAddr = addr.parse().unwrap();
            assert_eq!(canonical(sa.ip()), v4.parse::<IpAddr>().unwrap(), "{addr}");
        }
        // Not IPv4 in disguise: loopback and unspecified stay IPv6; other addresses unchanged.
        assert_eq!(
            canonical("::1".parse().unwrap()),
            "::1".parse::<IpAddr>().unwrap()
        );
        assert_eq!(
            canonical("::".parse().unwrap()),
            "::".parse::<IpAddr>().unwrap()
        );
        assert_eq!(
            canonical("2001:db8::1".parse().unwrap()),
            "2001:db8::1".parse::<IpAddr>().unwrap()
        );
        assert!(ok(&p, "[2001:db8::1]:80"));
    }

    #[test]
    fn ipv6_deny_entries_still_apply_and_uncertain_translations_need_an_explicit_allow() {
        let p = policy(&["0.0.0.0/0", "::/0"], &["2002::/16", "64:ff9b::/96"]);
        assert!(!ok(&p, "[2002:c000:201::1]:80"), "6to4 denied as written");
        assert!(!ok(&p, "[64:ff9b::c000:201]:80"), "NAT64 denied as written");
        assert!(ok(&p, "192.0.2.1:80"), "the IPv4 host itself is not denied");
        // Local-use NAT64 and Teredo: a wide allow does not open them, an entry within does.
        let wide = policy(&["0.0.0.0/0", "::/0"], &[]);
        assert!(!ok(&wide, "[64:ff9b:1:7::c000:201]:80"));
        assert!(!ok(&wide, "[2001:0:4136:e378:8000:63bf:3fff:fdd2]:80"));
        let narrow = policy(&["0.0.0.0/0", "64:ff9b:1:7::/96"], &[]);
        assert!(ok(&narrow, "[64:ff9b:1:7::c000:201]:80"));
        assert!(!ok(&narrow, "[64:ff9b:1:8::c000:201]:80"));
    }

    #[test]
    fn sensitive_ranges_need_an_explicit_allow() {
        let all = policy(&["0.0.0.0/0", "::/0"], &[]);
        assert!(!ok(&all, "169.254.169.254:80"));
        assert!(!ok(&all, "[::ffff:169.254.169.254]:80"));
        assert!(!ok(&all, "[fd00:ec2::254]:80"));
        assert!(!ok(&all, "169.254.10.10:80"));
        assert!(!ok(&all, "[fe80::1]:80"));
        assert!(!ok(&all, "127.0.0.1:22"));
        assert!(!ok(&all, "192.168.1.5:9100"));
        assert!(ok(&all, "192.168.1.5:80"));
        assert!(ok(&all, "192.168.1.6:22"));
        assert!(ok(&all, "127.0.0.1:8080"));
        assert!(!ok(&all, "0.0.0.0:80"));
        assert!(!ok(&all, "[::]:80"));
        // Link-local opened explicitly; metadata still needs its own entry.
        let ll = policy(&["169.254.0.0/16"], &[]);
        assert!(ok(&ll, "169.254.10.10:80"));
        assert!(!ok(&ll, "169.254.169.254:80"));
        assert!(ok(&policy(&["169.254.169.254"], &[]), "169.254.169.254:80"));
        assert!(ok(&policy(&["127.0.0.1"], &[]), "127.0.0.1:22"));
        assert!(ok(&policy(&["192.168.1.5/32"], &[]), "192.168.1.5:22"));
    }

    #[test]
    fn networks_parse_strictly() {
        assert!(parse_net("10.0.0.1/8").unwrap_err().contains("10.0.0.0/8"));
        assert!(parse_net("banana").is_err());
        assert_eq!(parse_net("10.0.0.1").unwrap().prefix_len(), 32);
    }
}
