//! `labrack-host lab-box`: one process per lab, outside the lab, that builds its box and
//! holds it up.
//!
//! 1. sets up the lab's cgroup and network namespace (fresh each start);
//! 2. writes the box's sshd, xrdp and session-manager configuration;
//! 3. binds the lab's two ports on the host (RDP and SSH) — in the host's namespace;
//! 4. starts the lab's init (`init.rs`) inside new PID, mount, IPC and UTS namespaces and
//!    the lab's network namespace (`nsenter` + `unshare` from util-linux, under
//!    `setpriv --pdeathsig`, so the box dies with its supervisor);
//! 5. forwards each connection on the lab's ports to the matching server on the lab's own
//!    loopback: a connector thread that has entered the lab's network namespace opens the
//!    inner sockets (a socket keeps the namespace it was made in).
//!
//! The box's life is the supervisor's: when the init exits the supervisor exits, and the
//! agent starts both again. Forwarding costs one copy per byte in user space; measured in
//! BENCHMARKS.md (`bench reset`).

use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

use super::cgroup::{Cgroups, Unit};
use super::init::{Daemon, InitSpec};
use super::net::LabNet;
use super::{BoxSettings, LabRecord, box_dir, devices, load_record, net, process_start_time};

/// Where the box's servers listen on its own loopback.
pub(crate) const INNER_SSH_PORT: u16 = 22;
pub(crate) const INNER_RDP_PORT: u16 = 3389;
/// Where the box's own directory appears inside it (the state dir may lie below a
/// directory the box masks, such as /tmp).
pub(crate) const INNER_DIR: &str = "/run/labrack-box";

fn inner(name: &str) -> String {
    format!("{INNER_DIR}/{name}")
}

/// Runs the supervisor of lab `user` until its box ends.
pub(crate) fn run(state_dir: &Path, user: &str) -> anyhow::Result<()> {
    let dir = box_dir(state_dir, user);
    let pid = std::process::id();
    let started = process_start_time(i32::try_from(pid).unwrap_or(0)).unwrap_or_default();
    std::fs::write(dir.join("supervisor.pid"), format!("{pid} {started}\n"))
        .context("writing supervisor.pid")?;
    let result = supervise(state_dir, user, &dir);
    if let Err(error) = &result {
        // The agent waits on this file: say why, so the provision fails with the reason.
        let _ = std::fs::write(dir.join("ready"), format!("failed: {error:#}\n"));
        eprintln!("labrack-host lab-box {user}: {error:#}");
    }
    result
}

fn supervise(state_dir: &Path, user: &str, dir: &Path) -> anyhow::Result<()> {
    let settings = BoxSettings::load(state_dir)?;
    let record = load_record(state_dir, user)?
        .with_context(|| format!("lab {user} has no record on this host"))?;
    let cgroups = Cgroups::detect()?;
    let proc_devices = std::fs::read_to_string("/proc/devices").unwrap_or_default();
    let rules = devices::lab_rules(&record.grants(), &proc_devices);
    // A box starts from nothing: whatever an earlier one left is killed.
    cgroups.kill(user, Some(&Unit::Box))?;
    cgroups.prepare_lab(user, &record.limits, &rules)?;
    let joins = cgroups.prepare_unit(user, &Unit::Box, None, None, &rules)?;
    let lab_net = LabNet::new(user);
    net::setup(
        &lab_net,
        &record.limits,
        settings.network()?,
        record.slot,
        &settings.host_table,
    )?;
    let spec = write_box_files(&settings, &record, dir, joins)?;
    let listen_ip: std::net::IpAddr = settings
        .listen
        .parse()
        .with_context(|| format!("--lab-listen {:?} is not an IP address", settings.listen))?;
    let rdp = std::net::TcpListener::bind((listen_ip, record.rdp_port))
        .with_context(|| format!("binding the lab's RDP port {}", record.rdp_port))?;
    let ssh = std::net::TcpListener::bind((listen_ip, record.ssh_port))
        .with_context(|| format!("binding the lab's SSH port {}", record.ssh_port))?;
    let connector = Connector::start(&lab_net.netns_path())?;

    let exe = std::env::current_exe().context("finding the labrack-host binary")?;
    let spec_path = dir.join("box.json");
    std::fs::write(&spec_path, serde_json::to_vec_pretty(&spec)?).context("writing box.json")?;
    let argv: Vec<String> = [
        "setpriv",
        "--pdeathsig",
        "KILL",
        "--",
        "nsenter",
        &format!("--net={}", lab_net.netns_path()),
        "--",
        "unshare",
        "--pid",
        "--fork",
        "--kill-child",
        "--mount",
        "--ipc",
        "--uts",
        "--propagation",
        "private",
        "--",
    ]
    .into_iter()
    .map(str::to_owned)
    .chain([
        exe.display().to_string(),
        "lab-init".to_owned(),
        "--spec".to_owned(),
        spec_path.display().to_string(),
    ])
    .collect();
    let argv = cgroups.wrap(user, &Unit::Box, None, &rules, argv);
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("init.log"))?;
    let mut init = Command::new(&argv[0])
        .args(&argv[1..])
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .context("starting the lab's init (setpriv, nsenter and unshare are in util-linux)")?;

    // Ready once both inner servers answer.
    let deadline = Instant::now() + Duration::from_secs(25);
    loop {
        if let Some(status) = init.try_wait()? {
            let tail = std::fs::read_to_string(dir.join("init.log")).unwrap_or_default();
            bail!(
                "the lab's init exited ({status}): {}",
                tail.lines().rev().take(3).collect::<Vec<_>>().join(" | ")
            );
        }
        if connector.connect(INNER_SSH_PORT).is_ok() && connector.connect(INNER_RDP_PORT).is_ok() {
            break;
        }
        if Instant::now() > deadline {
            let _ = init.kill();
            bail!(
                "the lab's sshd and xrdp did not answer within 25 s (see {})",
                dir.display()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    std::fs::write(dir.join("ready"), "ready\n").context("writing the ready mark")?;
    tracing::info!(
        lab = user,
        rdp = record.rdp_port,
        ssh = record.ssh_port,
        "lab box ready"
    );

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let connector = std::sync::Arc::new(connector);
        rdp.set_nonblocking(true)?;
        ssh.set_nonblocking(true)?;
        let rdp = tokio::net::TcpListener::from_std(rdp)?;
        let ssh = tokio::net::TcpListener::from_std(ssh)?;
        let mut terminate =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        let mut watch = tokio::time::interval(Duration::from_millis(500));
        loop {
            tokio::select! {
                accepted = rdp.accept() => forward(accepted, INNER_RDP_PORT, &connector),
                accepted = ssh.accept() => forward(accepted, INNER_SSH_PORT, &connector),
                _ = watch.tick() => {
                    if let Some(status) = init.try_wait()? {
                        bail!("the lab's init exited ({status})");
                    }
                }
                _ = terminate.recv() => {
                    let _ = init.kill();
                    return Ok(());
                }
            }
        }
    })
}

fn forward(
    accepted: std::io::Result<(tokio::net::TcpStream, SocketAddr)>,
    port: u16,
    connector: &std::sync::Arc<Connector>,
) {
    let Ok((mut outer, peer)) = accepted else {
        return;
    };
    let connector = connector.clone();
    tokio::spawn(async move {
        let inner = tokio::task::spawn_blocking(move || connector.connect(port)).await;
        let Ok(Ok(inner)) = inner else {
            tracing::warn!(%peer, port, "the lab's server did not answer; closing the connection");
            return;
        };
        if inner.set_nonblocking(true).is_err() {
            return;
        }
        let Ok(mut inner) = tokio::net::TcpStream::from_std(inner) else {
            return;
        };
        // Desktop input and frames are latency-bound.
        let _ = outer.set_nodelay(true);
        let _ = inner.set_nodelay(true);
        let _ = tokio::io::copy_bidirectional(&mut outer, &mut inner).await;
    });
}

/// A thread that lives in the lab's network namespace and opens connections to the
/// servers on the lab's loopback for the supervisor (a socket keeps its namespace).
struct Connector {
    requests: std::sync::Mutex<mpsc::Sender<(u16, mpsc::Sender<std::io::Result<TcpStream>>)>>,
}

impl Connector {
    fn start(netns_path: &str) -> anyhow::Result<Self> {
        let netns =
            std::fs::File::open(netns_path).with_context(|| format!("opening {netns_path}"))?;
        let (requests, incoming) =
            mpsc::channel::<(u16, mpsc::Sender<std::io::Result<TcpStream>>)>();
        let (entered_tx, entered_rx) = mpsc::channel();
        std::thread::Builder::new()
            .name("lab-connector".into())
            .spawn(move || {
                // setns applies to this thread only.
                let entered = nix::sched::setns(&netns, nix::sched::CloneFlags::CLONE_NEWNET)
                    .map_err(|e| e.to_string());
                let ok = entered.is_ok();
                let _ = entered_tx.send(entered);
                if !ok {
                    return;
                }
                for (port, reply) in incoming {
                    let address = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
                    let _ =
                        reply.send(TcpStream::connect_timeout(&address, Duration::from_secs(2)));
                }
            })?;
        entered_rx
            .recv()
            .context("the connector thread died")?
            .map_err(|e| anyhow::anyhow!("entering the lab's network namespace: {e}"))?;
        Ok(Self {
            requests: std::sync::Mutex::new(requests),
        })
    }

    fn connect(&self, port: u16) -> std::io::Result<TcpStream> {
        let (reply, answer) = mpsc::channel();
        let sent = self
            .requests
            .lock()
            .map(|requests| requests.send((port, reply)).is_ok())
            .unwrap_or(false);
        if !sent {
            return Err(std::io::Error::other("the connector thread is gone"));
        }
        answer
            .recv()
            .unwrap_or_else(|_| Err(std::io::Error::other("the connector thread is gone")))
    }
}

/// Copies a key or certificate into the box's directory, root's alone.
fn copy_private(from: &Path, dir: &Path, name: &str) -> anyhow::Result<()> {
    let bytes = std::fs::read(from).with_context(|| format!("reading {}", from.display()))?;
    crate::identity::write_private(&dir.join(name), &bytes)
}

/// Writes sshd_config, xrdp.ini and sesman.ini for the box (naming paths as the box sees
/// them) and its keys, and returns its init's spec.
fn write_box_files(
    settings: &BoxSettings,
    record: &LabRecord,
    dir: &Path,
    joins: Vec<PathBuf>,
) -> anyhow::Result<InitSpec> {
    let visible = devices::visible_devices(&record.grants());
    copy_private(&settings.ssh_host_key, dir, "ssh_host_key")
        .context("the SSH host key (--ssh-host-key-file)")?;
    copy_private(&settings.rdp_cert, dir, "rdp_cert.pem")
        .context("the RDP certificate (--rdp-cert-file)")?;
    copy_private(&settings.rdp_key, dir, "rdp_key.pem").context("the RDP key (--rdp-key-file)")?;
    std::fs::write(
        dir.join("sshd_config"),
        sshd_config_text(&record.user, &visible),
    )
    .context("writing sshd_config")?;
    let stock_xrdp = std::fs::read_to_string("/etc/xrdp/xrdp.ini")
        .context("reading /etc/xrdp/xrdp.ini (apt package xrdp)")?;
    std::fs::write(dir.join("xrdp.ini"), xrdp_ini_text(&stock_xrdp)).context("writing xrdp.ini")?;
    let stock_sesman = std::fs::read_to_string("/etc/xrdp/sesman.ini")
        .context("reading /etc/xrdp/sesman.ini (apt package xrdp)")?;
    std::fs::write(
        dir.join("sesman.ini"),
        sesman_ini_text(&stock_sesman, &record.user, &visible),
    )
    .context("writing sesman.ini")?;
    let daemon = |name: &str, argv: Vec<String>| Daemon {
        name: name.to_owned(),
        argv,
        log: PathBuf::from(inner(&format!("{name}.log"))),
    };
    Ok(InitSpec {
        joins,
        box_dir: dir.to_path_buf(),
        home: crate::runtime::accounts::lookup(&record.user)?.map_or_else(
            || PathBuf::from(format!("/home/{}", record.user)),
            |a| a.home,
        ),
        hostname: record.user.clone(),
        tmp_mib: record.limits.memory_mib.clamp(64, 4096),
        daemons: vec![
            daemon(
                "sshd",
                vec![
                    "/usr/sbin/sshd".into(),
                    "-D".into(),
                    "-e".into(),
                    "-f".into(),
                    inner("sshd_config"),
                ],
            ),
            daemon(
                "sesman",
                vec![
                    "/usr/sbin/xrdp-sesman".into(),
                    "--nodaemon".into(),
                    "-c".into(),
                    inner("sesman.ini"),
                ],
            ),
            daemon(
                "xrdp",
                vec![
                    "/usr/sbin/xrdp".into(),
                    "--nodaemon".into(),
                    "-c".into(),
                    inner("xrdp.ini"),
                ],
            ),
        ],
    })
}

/// The box's sshd: its one lab user, by password, no forwarding of any kind.
pub(crate) fn sshd_config_text(user: &str, visible_gpus: &str) -> String {
    format!(
        "ListenAddress 127.0.0.1:{INNER_SSH_PORT}\nHostKey {key}\nPidFile none\nAllowUsers {user}\nPermitRootLogin no\n\
         PasswordAuthentication yes\nKbdInteractiveAuthentication no\nPubkeyAuthentication no\nUsePAM no\n\
         X11Forwarding no\nAllowTcpForwarding no\nAllowAgentForwarding no\nAllowStreamLocalForwarding no\nPermitTunnel no\n\
         GatewayPorts no\nPermitUserEnvironment no\nPrintMotd no\nSubsystem sftp internal-sftp\n\
         SetEnv CUDA_VISIBLE_DEVICES={visible_gpus} NVIDIA_VISIBLE_DEVICES={visible_gpus}\n",
        key = inner("ssh_host_key"),
    )
}

/// Sets `key=value` in `[section]` of an INI text, replacing the key if present (commented
/// or not), else adding it at the end of the section.
pub(crate) fn ini_set(text: &str, section: &str, key: &str, value: &str) -> String {
    let mut out = Vec::new();
    let mut in_section = false;
    let mut done = false;
    for line in text.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('[') {
            if in_section && !done {
                out.push(format!("{key}={value}"));
                done = true;
            }
            in_section = trimmed.eq_ignore_ascii_case(&format!("[{section}]"));
        } else if in_section && !done {
            let bare = trimmed.trim_start_matches([';', '#']).trim_start();
            if bare
                .split_once('=')
                .is_some_and(|(k, _)| k.trim().eq_ignore_ascii_case(key))
            {
                out.push(format!("{key}={value}"));
                done = true;
                continue;
            }
        }
        out.push(line.to_owned());
    }
    if !done {
        if !in_section {
            out.push(format!("[{section}]"));
        }
        out.push(format!("{key}={value}"));
    }
    out.join("\n") + "\n"
}

pub(crate) fn xrdp_ini_text(stock: &str) -> String {
    let mut text = ini_set(
        stock,
        "Globals",
        "port",
        &format!("tcp://127.0.0.1:{INNER_RDP_PORT}"),
    );
    text = ini_set(&text, "Globals", "certificate", &inner("rdp_cert.pem"));
    text = ini_set(&text, "Globals", "key_file", &inner("rdp_key.pem"));
    ini_set(&text, "Logging", "LogFile", &inner("xrdp.log"))
}

/// The box's session manager: only its lab user may log in, never root; sessions see only
/// the lab's GPUs.
pub(crate) fn sesman_ini_text(stock: &str, user: &str, visible_gpus: &str) -> String {
    let mut text = ini_set(stock, "Globals", "ListenAddress", "127.0.0.1");
    text = ini_set(&text, "Security", "AllowRootLogin", "false");
    text = ini_set(&text, "Security", "TerminalServerUsers", user);
    text = ini_set(&text, "Security", "AlwaysGroupCheck", "true");
    text = ini_set(&text, "Logging", "LogFile", &inner("sesman.log"));
    text = ini_set(
        &text,
        "SessionVariables",
        "CUDA_VISIBLE_DEVICES",
        visible_gpus,
    );
    ini_set(
        &text,
        "SessionVariables",
        "NVIDIA_VISIBLE_DEVICES",
        visible_gpus,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ini_keys_are_replaced_in_their_section_or_added() {
        let stock = "[Globals]\nport=3389\n;certificate=\n[Logging]\nLogFile=xrdp.log\n[Other]\nport=5900\n";
        let text = ini_set(stock, "Globals", "port", "tcp://127.0.0.1:3389");
        let text = ini_set(&text, "Globals", "certificate", "/etc/c.pem");
        let text = ini_set(&text, "Globals", "key_file", "/etc/k.pem");
        let text = ini_set(&text, "SessionVariables", "CUDA_VISIBLE_DEVICES", "1");
        assert_eq!(
            text,
            "[Globals]\nport=tcp://127.0.0.1:3389\ncertificate=/etc/c.pem\nkey_file=/etc/k.pem\n[Logging]\nLogFile=xrdp.log\n[Other]\nport=5900\n[SessionVariables]\nCUDA_VISIBLE_DEVICES=1\n"
        );
    }

    #[test]
    fn the_box_sshd_admits_its_user_only_and_forwards_nothing() {
        let text = sshd_config_text("lr-a4", "0");
        for line in [
            "AllowUsers lr-a4",
            "PermitRootLogin no",
            "AllowTcpForwarding no",
            "ListenAddress 127.0.0.1:22",
            "SetEnv CUDA_VISIBLE_DEVICES=0",
            "HostKey /run/labrack-box/ssh_host_key",
        ] {
            assert!(text.lines().any(|l| l.starts_with(line)), "{line}: {text}");
        }
    }
}
