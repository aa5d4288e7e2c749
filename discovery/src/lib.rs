//! Finding appliances on the venue LAN with mDNS / DNS-SD (`_labrack._tcp.local.`).
//!
//! `labrack serve` announces itself ([`Announcement`]); the staff console browses
//! ([`browse`]) and offers what it found. An announcement names a host the appliance's
//! server certificate is valid for (`host`), the port, and the CA fingerprint as a *hint*
//! (`fp`): anyone on a LAN can announce anything, so the console still pins the fingerprint
//! staff confirm against the appliance's own screen.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use mdns_sd::{ServiceDaemon, ServiceEvent, ServiceInfo};
use serde::Serialize;

/// The DNS-SD service type appliances announce.
pub const SERVICE_TYPE: &str = "_labrack._tcp.local.";
const TXT_HOST: &str = "host";
const TXT_FINGERPRINT: &str = "fp";
const TXT_VERSION: &str = "v";

#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    #[error("mDNS: {0}")]
    Mdns(#[from] mdns_sd::Error),
}

/// An appliance found on the LAN.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Found {
    /// the announced instance name, e.g. "LabRack on rack-1 (8443)"
    pub instance: String,
    /// a name the appliance's certificate is valid for
    pub host: String,
    pub port: u16,
    /// where it answers on this LAN, IPv4 first
    pub addresses: Vec<IpAddr>,
    /// the CA fingerprint the announcement claims (a hint, not a trust anchor)
    pub fingerprint_hint: Option<String>,
}

impl Found {
    /// The URL to connect to (reach `host` at one of `addresses`).
    #[must_use]
    pub fn url(&self) -> String {
        format!("https://{}:{}", self.host, self.port)
    }

    /// The address to reach `host` at: the first non-loopback IPv4, else the first at all.
    #[must_use]
    pub fn best_address(&self) -> Option<IpAddr> {
        self.addresses
            .iter()
            .copied()
            .find(|a| a.is_ipv4() && !a.is_loopback())
            .or_else(|| self.addresses.first().copied())
    }
}

/// A running announcement; dropping it withdraws it.
pub struct Announcement {
    daemon: ServiceDaemon,
    fullname: String,
}

impl std::fmt::Debug for Announcement {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Announcement")
            .field("fullname", &self.fullname)
            .finish()
    }
}

impl Announcement {
    /// Announces an appliance on `machine` (its host name) reachable as `https://cert_host:port`.
    /// The instance name carries the port, so two appliances on one machine stay apart.
    pub fn start(
        machine: &str,
        cert_host: &str,
        port: u16,
        fingerprint: &str,
    ) -> Result<Self, DiscoveryError> {
        let daemon = ServiceDaemon::new()?;
        let label: String = machine
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' {
                    c
                } else {
                    '-'
                }
            })
            .collect();
        let label = if label.is_empty() {
            "labrack".to_owned()
        } else {
            label
        };
        let instance = format!("LabRack on {label} ({port})");
        let properties = [
            (TXT_HOST, cert_host),
            (TXT_FINGERPRINT, fingerprint),
            (TXT_VERSION, "1"),
        ];
        let info = ServiceInfo::new(
            SERVICE_TYPE,
            &instance,
            &format!("{label}.local."),
            "",
            port,
            &properties[..],
        )?
        .enable_addr_auto();
        let fullname = info.get_fullname().to_owned();
        daemon.register(info)?;
        Ok(Self { daemon, fullname })
    }

    #[must_use]
    pub fn fullname(&self) -> &str {
        &self.fullname
    }
}

impl Drop for Announcement {
    fn drop(&mut self) {
        let _ = self.daemon.unregister(&self.fullname);
        let _ = self.daemon.shutdown();
    }
}

fn found_from(info: &ServiceInfo) -> Option<Found> {
    let host = info
        .get_property_val_str(TXT_HOST)
        .filter(|h| !h.is_empty())?
        .to_owned();
    let mut addresses: Vec<IpAddr> = info.get_addresses().iter().copied().collect();
    addresses.sort_by_key(|a| (!a.is_ipv4(), a.is_loopback(), *a));
    let instance = info
        .get_fullname()
        .strip_suffix(SERVICE_TYPE)
        .unwrap_or(info.get_fullname())
        .trim_end_matches('.')
        .to_owned();
    Some(Found {
        instance,
        host,
        port: info.get_port(),
        addresses,
        fingerprint_hint: info
            .get_property_val_str(TXT_FINGERPRINT)
            .map(str::to_owned),
    })
}

/// Listens for announcements for `wait` (2–3 s finds a LAN's appliances); blocking.
pub fn browse(wait: Duration) -> Result<Vec<Found>, DiscoveryError> {
    let daemon = ServiceDaemon::new()?;
    let events = daemon.browse(SERVICE_TYPE)?;
    let deadline = Instant::now() + wait;
    let mut found = BTreeMap::new();
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        match events.recv_timeout(left) {
            Ok(ServiceEvent::ServiceResolved(info)) => {
                if let Some(appliance) = found_from(&info) {
                    found.insert(info.get_fullname().to_owned(), appliance);
                }
            }
            Ok(_) => {}
            Err(_) => break,
        }
    }
    let _ = daemon.stop_browse(SERVICE_TYPE);
    let _ = daemon.shutdown();
    Ok(found.into_values().collect())
}
