//! Each lab's network namespace: its own loopback (two labs can both listen on 8080, and a
//! check's `localhost:8080` is its own lab's), and — when its template allows any network —
//! a veth pair to the host with the policy enforced by nftables *inside* the namespace,
//! where the lab's processes (no `CAP_NET_ADMIN` there) cannot change it:
//!
//! - `none`: loopback only, plus the allowlist;
//! - `venue`: the private networks (10/8, 172.16/12, 192.168/16) too;
//! - `internet`: anywhere;
//!
//! and never the host itself (any of its addresses) nor another lab, whatever the policy.
//! New connections *into* a lab are dropped: the agent reaches the lab's desktop and SSH
//! servers over the lab's own loopback (see `supervisor.rs`), never over the veth.
//!
//! The host side masquerades lab traffic and refuses to forward between labs. Its end of
//! each link has no address at all (the lab's one address is routed to the link, and the
//! lab reaches the host through a fixed neighbour entry for [`GATEWAY`]), as Calico does:
//! making or removing a lab never changes the host's addresses, which programs on the host
//! watch (Chromium drops its connections when they change).

use std::io::Write as _;
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};

use anyhow::{Context as _, bail};
use labrack_provisioner::limits::{Endpoint, LabLimits, NetworkPolicy};
use sha2::Digest as _;

/// The lab's gateway: a link-local address nobody holds, answered by the host's end of the
/// link (a permanent neighbour entry in the lab).
pub(crate) const GATEWAY: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);

/// The venue's networks for `network = "venue"`.
const VENUE_NETWORKS: &str = "10.0.0.0/8, 172.16.0.0/12, 192.168.0.0/16";

/// An IPv4 network `a.b.c.d/len` that labs' addresses come from (one each).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct LabNetwork {
    pub(crate) base: Ipv4Addr,
    pub(crate) prefix: u8,
}

impl std::str::FromStr for LabNetwork {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let (address, prefix) = text
            .split_once('/')
            .ok_or_else(|| format!("{text:?}: write ADDRESS/PREFIX, e.g. 100.64.0.0/16"))?;
        let base: Ipv4Addr = address
            .parse()
            .map_err(|_| format!("{text:?}: {address:?} is not an IPv4 address"))?;
        let prefix: u8 = prefix
            .parse()
            .ok()
            .filter(|p| (8..=30).contains(p))
            .ok_or_else(|| format!("{text:?}: the prefix must be 8–30"))?;
        let mask = u32::MAX << (32 - prefix);
        if u32::from(base) & !mask != 0 {
            return Err(format!("{text:?}: {base} is not the start of a /{prefix}"));
        }
        Ok(Self { base, prefix })
    }
}

impl std::fmt::Display for LabNetwork {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.base, self.prefix)
    }
}

impl LabNetwork {
    /// How many labs fit (one address each, the first and last unused).
    pub(crate) fn slots(self) -> u32 {
        (1 << (32 - u32::from(self.prefix))) - 2
    }

    /// The address of the lab in slot `slot`.
    pub(crate) fn address(self, slot: u32) -> Option<Ipv4Addr> {
        (slot < self.slots()).then(|| Ipv4Addr::from(u32::from(self.base) + 1 + slot))
    }
}

/// Names of one lab's network pieces.
#[derive(Debug, Clone)]
pub(crate) struct LabNet {
    /// the namespace (`ip netns`), named after the lab user
    pub(crate) netns: String,
    /// the host side of the veth pair (at most 15 characters)
    pub(crate) veth: String,
}

impl LabNet {
    pub(crate) fn new(lab: &str) -> Self {
        let digest = sha2::Sha256::digest(lab.as_bytes());
        Self {
            netns: lab.to_owned(),
            veth: format!("lv{}", &hex::encode(digest)[..10]),
        }
    }

    pub(crate) fn netns_path(&self) -> String {
        format!("/run/netns/{}", self.netns)
    }
}

/// Whether a lab needs a link to the outside at all.
pub(crate) fn needs_link(limits: &LabLimits) -> bool {
    limits.network != NetworkPolicy::None || !limits.allow.is_empty()
}

fn run(program: &str, args: &[&str]) -> anyhow::Result<String> {
    let output = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {program} (iproute2 / nftables)"))?;
    if !output.status.success() {
        bail!(
            "{program} {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

fn nft_load(netns: Option<&str>, ruleset: &str) -> anyhow::Result<()> {
    let mut command = match netns {
        Some(netns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", netns, "nft", "-f", "-"]);
            c
        }
        None => {
            let mut c = Command::new("nft");
            c.args(["-f", "-"]);
            c
        }
    };
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("running nft (apt package nftables)")?;
    child
        .stdin
        .take()
        .context("nft stdin")?
        .write_all(ruleset.as_bytes())?;
    let output = child.wait_with_output()?;
    if !output.status.success() {
        bail!(
            "nft refused the lab's rules: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}

/// The host's own IPv4 addresses (every interface): what no lab may reach.
pub(crate) fn host_addresses() -> anyhow::Result<Vec<Ipv4Addr>> {
    let text = run("ip", &["-4", "-o", "addr", "show"])?;
    Ok(text
        .lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            words.find(|w| *w == "inet")?;
            words.next()?.split('/').next()?.parse().ok()
        })
        .collect())
}

/// The nftables rules inside a lab's namespace.
pub(crate) fn lab_ruleset(
    limits: &LabLimits,
    host_addrs: &[Ipv4Addr],
    lab_network: LabNetwork,
    allowed: &[(Ipv4Addr, u16)],
) -> String {
    let mut out = String::from(
        "table inet labrack_lab\ndelete table inet labrack_lab\ntable inet labrack_lab {\n",
    );
    out.push_str("  chain input {\n    type filter hook input priority 0; policy drop;\n    iif \"lo\" accept\n    ct state established,related accept\n  }\n");
    out.push_str("  chain output {\n    type filter hook output priority 0; policy drop;\n    oif \"lo\" accept\n    ct state established,related accept\n");
    // Other labs first: no allowlist entry reaches them. Refused, not dropped, so a
    // participant's program fails at once instead of hanging.
    out.push_str(&format!(
        "    ip daddr {lab_network} reject with icmpx admin-prohibited\n"
    ));
    for (address, port) in allowed {
        out.push_str(&format!("    ip daddr {address} tcp dport {port} accept\n    ip daddr {address} udp dport {port} accept\n"));
    }
    if !host_addrs.is_empty() {
        let list: Vec<String> = host_addrs.iter().map(Ipv4Addr::to_string).collect();
        out.push_str(&format!(
            "    ip daddr {{ {} }} reject with icmpx admin-prohibited\n",
            list.join(", ")
        ));
    }
    match limits.network {
        NetworkPolicy::None => {}
        NetworkPolicy::Venue => {
            out.push_str(&format!("    ip daddr {{ {VENUE_NETWORKS} }} accept\n"))
        }
        NetworkPolicy::Internet => out.push_str("    meta nfproto ipv4 accept\n"),
    }
    out.push_str("    reject with icmpx admin-prohibited\n  }\n}\n");
    out
}

/// The host's rules for its labs: masquerade their traffic, never forward between labs or
/// open a new connection into one, and (when the host did not forward before) forward
/// nothing but lab traffic. Several agents' tables may meet at the forward hook (tests run
/// several on one machine): no rule here drops another agent's lab traffic.
fn host_ruleset(table: &str, lab_network: LabNetwork, host_forwarded_before: bool) -> String {
    let rest = if host_forwarded_before {
        ""
    } else {
        "    iifname != \"lv*\" drop\n"
    };
    format!(
        "table inet {table}\ndelete table inet {table}\ntable inet {table} {{\n  chain forward {{\n    type filter hook forward priority 0; policy accept;\n    \
         iifname \"lv*\" oifname \"lv*\" drop\n    oifname \"lv*\" ct state established,related accept\n    \
         oifname \"lv*\" drop\n{rest}  }}\n  chain postrouting {{\n    type nat hook postrouting priority srcnat; policy accept;\n    \
         ip saddr {lab_network} oifname != \"lv*\" masquerade\n  }}\n}}\n"
    )
}

/// Resolves the allowlist (names at start-up; a name that does not resolve is an error
/// naming it).
pub(crate) fn resolve_allowlist(allow: &[Endpoint]) -> anyhow::Result<Vec<(Ipv4Addr, u16)>> {
    let mut resolved = Vec::new();
    for endpoint in allow {
        let addrs =
            std::net::ToSocketAddrs::to_socket_addrs(&(endpoint.host.as_str(), endpoint.port))
                .with_context(|| format!("allow: {endpoint} does not resolve on this host"))?;
        let v4: Vec<Ipv4Addr> = addrs
            .filter_map(|a| match a.ip() {
                std::net::IpAddr::V4(ip) => Some(ip),
                std::net::IpAddr::V6(_) => None,
            })
            .collect();
        if v4.is_empty() {
            bail!("allow: {endpoint} has no IPv4 address (labs have IPv4 links only)");
        }
        resolved.extend(v4.into_iter().map(|ip| (ip, endpoint.port)));
    }
    Ok(resolved)
}

/// Creates the lab's namespace afresh (an old one is removed with everything in it) and,
/// when its policy allows any network, its link and rules.
pub(crate) fn setup(
    net: &LabNet,
    limits: &LabLimits,
    lab_network: LabNetwork,
    slot: u32,
    host_table: &str,
) -> anyhow::Result<()> {
    teardown(net);
    run("ip", &["netns", "add", &net.netns])?;
    run("ip", &["-n", &net.netns, "link", "set", "lo", "up"])?;
    let allowed = resolve_allowlist(&limits.allow)?;
    let mut host_addrs = host_addresses()?;
    if needs_link(limits) {
        let lab_ip = lab_network
            .address(slot)
            .with_context(|| format!("lab slot {slot} is outside --lab-network {lab_network}"))?;
        run(
            "ip",
            &[
                "link", "add", &net.veth, "type", "veth", "peer", "name", "eth0", "netns",
                &net.netns,
            ],
        )?;
        // No address on the host's end, IPv6 off before it comes up (no link-local address).
        std::fs::write(
            format!("/proc/sys/net/ipv6/conf/{}/disable_ipv6", net.veth),
            "1",
        )
        .context("turning IPv6 off on the lab's link")?;
        run("ip", &["link", "set", &net.veth, "up"])?;
        run(
            "ip",
            &["route", "add", &format!("{lab_ip}/32"), "dev", &net.veth],
        )?;
        let mac = std::fs::read_to_string(format!("/sys/class/net/{}/address", net.veth))
            .context("reading the link's address")?;
        run(
            "ip",
            &[
                "-n",
                &net.netns,
                "addr",
                "add",
                &format!("{lab_ip}/32"),
                "dev",
                "eth0",
            ],
        )?;
        run("ip", &["-n", &net.netns, "link", "set", "eth0", "up"])?;
        run(
            "ip",
            &[
                "-n",
                &net.netns,
                "route",
                "add",
                &GATEWAY.to_string(),
                "dev",
                "eth0",
                "scope",
                "link",
            ],
        )?;
        run(
            "ip",
            &[
                "-n",
                &net.netns,
                "neigh",
                "replace",
                &GATEWAY.to_string(),
                "lladdr",
                mac.trim(),
                "dev",
                "eth0",
                "nud",
                "permanent",
            ],
        )?;
        run(
            "ip",
            &[
                "-n",
                &net.netns,
                "route",
                "add",
                "default",
                "via",
                &GATEWAY.to_string(),
                "dev",
                "eth0",
            ],
        )?;
        host_addrs.push(GATEWAY);
        let forwarding =
            std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").unwrap_or_default();
        let forwarded_before = forwarding.trim() == "1"
            && !std::path::Path::new(&format!("/run/{host_table}.forwarding")).exists();
        if !forwarded_before {
            // Remember that it was us, so a restart does not mistake it for the host's own.
            let _ = std::fs::write(
                format!("/run/{host_table}.forwarding"),
                "set by labrack-host\n",
            );
        }
        nft_load(
            None,
            &host_ruleset(host_table, lab_network, forwarded_before),
        )?;
        std::fs::write("/proc/sys/net/ipv4/ip_forward", "1")
            .context("enabling IPv4 forwarding for lab links")?;
    }
    host_addrs.sort();
    host_addrs.dedup();
    nft_load(
        Some(&net.netns),
        &lab_ruleset(limits, &host_addrs, lab_network, &allowed),
    )?;
    Ok(())
}

/// Removes the lab's namespace and link (nothing happens if there are none).
pub(crate) fn teardown(net: &LabNet) {
    let _ = Command::new("ip")
        .args(["link", "del", &net.veth])
        .stderr(Stdio::null())
        .status();
    let _ = Command::new("ip")
        .args(["netns", "del", &net.netns])
        .stderr(Stdio::null())
        .status();
}

/// Whether nftables and iproute2 are there to isolate labs' networks.
pub(crate) fn available() -> bool {
    Command::new("nft")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
        && Command::new("ip")
            .arg("-V")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lab_links_are_carved_from_the_network() {
        let network: LabNetwork = "100.64.3.0/24".parse().expect("valid");
        assert_eq!(network.slots(), 254);
        assert_eq!(network.address(0), Some("100.64.3.1".parse().expect("ip")));
        assert_eq!(
            network.address(253),
            Some("100.64.3.254".parse().expect("ip"))
        );
        assert_eq!(network.address(254), None);
        for bad in ["100.64.3.1/24", "100.64.0.0", "100.64.0.0/31", "x/16"] {
            assert!(bad.parse::<LabNetwork>().is_err(), "{bad}");
        }
        assert!(LabNet::new("lrt12345-a123456").veth.len() <= 15);
    }

    #[test]
    fn the_lab_ruleset_keeps_the_host_and_other_labs_out_whatever_the_policy() {
        let network: LabNetwork = "100.64.0.0/16".parse().expect("valid");
        let host = ["192.168.1.10".parse().expect("ip")];
        let venue = lab_ruleset(
            &LabLimits {
                network: NetworkPolicy::Venue,
                ..LabLimits::default()
            },
            &host,
            network,
            &[("192.168.1.20".parse().expect("ip"), 5432)],
        );
        let drop_labs = venue
            .find("ip daddr 100.64.0.0/16 reject")
            .expect("other labs refused");
        let allow = venue
            .find("ip daddr 192.168.1.20 tcp dport 5432 accept")
            .expect("allowlist");
        let drop_host = venue
            .find("ip daddr { 192.168.1.10 } reject")
            .expect("host refused");
        let venue_accept = venue.find("ip daddr { 10.0.0.0/8").expect("venue networks");
        assert!(
            drop_labs < allow && allow < drop_host && drop_host < venue_accept,
            "{venue}"
        );
        assert!(venue.contains("policy drop"));
        let none = lab_ruleset(
            &LabLimits {
                network: NetworkPolicy::None,
                ..LabLimits::default()
            },
            &host,
            network,
            &[],
        );
        assert!(
            !none.contains("10.0.0.0/8") && !none.contains("nfproto"),
            "{none}"
        );
        let internet = lab_ruleset(
            &LabLimits {
                network: NetworkPolicy::Internet,
                ..LabLimits::default()
            },
            &host,
            network,
            &[],
        );
        assert!(
            internet.find("192.168.1.10").expect("host")
                < internet.find("nfproto ipv4 accept").expect("anywhere")
        );
        assert!(!needs_link(&LabLimits {
            network: NetworkPolicy::None,
            ..LabLimits::default()
        }));
    }
}
