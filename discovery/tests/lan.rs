//! A real announcement found by a real browse over the machine's LAN interface (multicast
//! looped back to this host), and withdrawn when dropped.

use std::time::Duration;

use labrack_discovery::{Announcement, browse};

#[test]
fn an_announced_appliance_is_found_with_its_certificate_name_port_and_hint()
-> Result<(), Box<dyn std::error::Error>> {
    // A port no real appliance here uses, so parallel tests cannot be confused with it.
    let port = 40_000 + u16::try_from(std::process::id() % 20_000)?;
    let announcement = Announcement::start("test-rack", "appliance.test", port, "AB:CD")?;
    assert!(
        announcement
            .fullname()
            .starts_with(&format!("LabRack on test-rack ({port})")),
        "{}",
        announcement.fullname()
    );
    let found = browse(Duration::from_secs(3))?;
    let ours = found
        .iter()
        .find(|f| f.port == port)
        .ok_or_else(|| format!("not found among {found:?}"))?;
    assert_eq!(ours.host, "appliance.test");
    assert_eq!(ours.url(), format!("https://appliance.test:{port}"));
    assert_eq!(ours.fingerprint_hint.as_deref(), Some("AB:CD"));
    assert!(
        ours.best_address().is_some(),
        "announced with this machine's addresses: {ours:?}"
    );
    drop(announcement);
    Ok(())
}
