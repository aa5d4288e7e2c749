//! The browser terminal's SSH side: log in to a lab user's shell with ssh2, with a PTY of
//! the browser's size, and pump bytes both ways on a thread of its own.
//!
//! The caller (the appliance's WebSocket handler) never sees the credentials' use beyond
//! [`TerminalTarget`]; the host key must match the one the lab host reported, so a machine
//! that takes over the host's address cannot collect the password.

use std::io::{ErrorKind, Read as _, Write as _};
use std::net::{TcpStream, ToSocketAddrs as _};
use std::time::Duration;

use base64::Engine as _;

/// Where to log in. `Debug` hides the password.
#[derive(Clone)]
pub struct TerminalTarget {
    pub host: String,
    pub port: u16,
    pub username: String,
    pub password: String,
    /// the host's public key as an OpenSSH line (`ssh-ed25519 AAAA… comment`)
    pub host_key: String,
}

impl std::fmt::Debug for TerminalTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TerminalTarget")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TerminalError {
    #[error("cannot reach the lab's SSH server at {address}: {source}")]
    Connect {
        address: String,
        source: std::io::Error,
    },
    #[error("SSH handshake with the lab failed: {0}")]
    Handshake(ssh2::Error),
    #[error("the lab's SSH host key does not match the one its host reported")]
    HostKeyMismatch,
    #[error("the reported SSH host key is not an OpenSSH public key line")]
    BadReportedKey,
    #[error("the lab refused the login")]
    Auth,
    #[error("SSH: {0}")]
    Ssh(#[from] ssh2::Error),
    #[error("reading the command's output failed (it may have run past its time): {0}")]
    Read(std::io::Error),
}

/// From the browser to the shell.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TerminalInput {
    Data(Vec<u8>),
    Resize {
        cols: u16,
        rows: u16,
    },
    /// the tab closed: end the shell
    Close,
}

/// From the shell to the browser.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TerminalOutput {
    Data(Vec<u8>),
    /// the shell ended with this status
    Exit(Option<i32>),
    Error(String),
}

/// An open terminal: send input, receive output. Dropping `input` ends the shell.
#[derive(Debug)]
pub struct Terminal {
    /// bounded: when the shell does not read its input, senders wait (backpressure) rather
    /// than the appliance buffering a keystroke flood
    pub input: tokio::sync::mpsc::Sender<TerminalInput>,
    pub output: tokio::sync::mpsc::Receiver<TerminalOutput>,
}

fn key_bytes(line: &str) -> Result<Vec<u8>, TerminalError> {
    let blob = line
        .split_whitespace()
        .nth(1)
        .ok_or(TerminalError::BadReportedKey)?;
    base64::engine::general_purpose::STANDARD
        .decode(blob)
        .map_err(|_| TerminalError::BadReportedKey)
}

/// Terminal sizes the PTY accepts.
pub fn clamp_size(cols: u16, rows: u16) -> (u16, u16) {
    (cols.clamp(10, 500), rows.clamp(4, 200))
}

/// Connects, checks the host key against the reported one and logs in. Blocking.
pub fn connect(target: &TerminalTarget) -> Result<ssh2::Session, TerminalError> {
    let address = format!("{}:{}", target.host, target.port);
    let connect_error = |source| TerminalError::Connect {
        address: address.clone(),
        source,
    };
    let socket_address = address
        .to_socket_addrs()
        .map_err(connect_error)?
        .next()
        .ok_or_else(|| connect_error(std::io::Error::new(ErrorKind::NotFound, "no address")))?;
    let tcp = TcpStream::connect_timeout(&socket_address, Duration::from_secs(5))
        .map_err(connect_error)?;
    let _ = tcp.set_nodelay(true);
    let mut session = ssh2::Session::new()?;
    session.set_tcp_stream(tcp);
    session.set_timeout(10_000);
    session.handshake().map_err(TerminalError::Handshake)?;
    let expected = key_bytes(&target.host_key)?;
    match session.host_key() {
        Some((seen, _)) if seen == expected.as_slice() => {}
        _ => return Err(TerminalError::HostKeyMismatch),
    }
    session
        .userauth_password(&target.username, &target.password)
        .map_err(|_| TerminalError::Auth)?;
    if !session.authenticated() {
        return Err(TerminalError::Auth);
    }
    Ok(session)
}

/// What a command run over SSH printed and how it ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandOutput {
    /// none when the remote side reported no status (killed by a signal)
    pub exit_code: Option<i32>,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

/// Runs one command (no PTY) as the target's user and collects at most `limit` bytes of
/// each stream; gives up after `timeout`. Blocking.
pub fn run_command(
    target: &TerminalTarget,
    command: &str,
    stdin: &[u8],
    timeout: Duration,
    limit: usize,
) -> Result<CommandOutput, TerminalError> {
    use std::io::Write as _;
    let session = connect(target)?;
    session.set_timeout(u32::try_from(timeout.as_millis()).unwrap_or(u32::MAX));
    let mut channel = session.channel_session()?;
    channel.exec(command)?;
    // What the remote program reads on stdin (a forced command takes its input there).
    channel.write_all(stdin).map_err(TerminalError::Read)?;
    channel.send_eof()?;
    let read_capped = |stream: &mut dyn std::io::Read| -> Result<Vec<u8>, TerminalError> {
        let mut kept = Vec::new();
        let mut buffer = [0_u8; 16 * 1024];
        loop {
            let n = stream.read(&mut buffer).map_err(TerminalError::Read)?;
            if n == 0 {
                return Ok(kept);
            }
            let room = limit.saturating_sub(kept.len());
            kept.extend_from_slice(&buffer[..n.min(room)]);
        }
    };
    let stdout = read_capped(&mut channel)?;
    let stderr = read_capped(&mut channel.stderr())?;
    channel.wait_close()?;
    let exit_code = channel.exit_status().ok();
    Ok(CommandOutput {
        exit_code,
        stdout,
        stderr,
    })
}

/// Connects, checks the host key, logs in and starts a login shell on a PTY. Blocking:
/// call it from a blocking task.
pub fn open(target: &TerminalTarget, cols: u16, rows: u16) -> Result<Terminal, TerminalError> {
    let address = format!("{}:{}", target.host, target.port);
    let session = connect(target)?;
    let mut channel = session.channel_session()?;
    let (cols, rows) = clamp_size(cols, rows);
    channel.request_pty(
        "xterm-256color",
        None,
        Some((u32::from(cols), u32::from(rows), 0, 0)),
    )?;
    channel.shell()?;
    session.set_timeout(0);
    session.set_blocking(false);

    let (input_tx, input_rx) = tokio::sync::mpsc::channel(INPUT_MESSAGES);
    let (output_tx, output_rx) = tokio::sync::mpsc::channel(64);
    std::thread::Builder::new()
        .name("ssh-terminal".into())
        .spawn(move || {
            let mut input_rx = input_rx;
            pump(&session, channel, &mut input_rx, &output_tx);
        })
        .map_err(|e| TerminalError::Connect { address, source: e })?;
    Ok(Terminal {
        input: input_tx,
        output: output_rx,
    })
}

/// Input messages queued for the shell before senders wait.
const INPUT_MESSAGES: usize = 64;
/// Input bytes taken from the queue but not yet written to the shell: past this the pump
/// stops taking more until the shell reads.
const MAX_PENDING_INPUT: usize = 64 * 1024;

/// Moves bytes until the shell exits or the browser goes away. Idle, it wakes every 10 ms.
fn pump(
    session: &ssh2::Session,
    mut channel: ssh2::Channel,
    input: &mut tokio::sync::mpsc::Receiver<TerminalInput>,
    output: &tokio::sync::mpsc::Sender<TerminalOutput>,
) {
    let mut buffer = [0_u8; 16 * 1024];
    let mut pending: Vec<u8> = Vec::new();
    loop {
        let mut busy = false;
        match channel.read(&mut buffer) {
            Ok(0) if channel.eof() => break,
            Ok(0) => {}
            Ok(n) => {
                busy = true;
                if output
                    .blocking_send(TerminalOutput::Data(buffer[..n].to_vec()))
                    .is_err()
                {
                    break; // the browser side is gone
                }
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            Err(e) => {
                let _ = output.blocking_send(TerminalOutput::Error(e.to_string()));
                break;
            }
        }
        // The browser side is gone while the shell reads nothing: the queue cannot be
        // drained to its end, so look at the senders instead.
        if pending.len() >= MAX_PENDING_INPUT && input.is_closed() {
            close(session, &mut channel);
            return;
        }
        while pending.len() < MAX_PENDING_INPUT {
            match input.try_recv() {
                Ok(TerminalInput::Data(bytes)) => pending.extend_from_slice(&bytes),
                Ok(TerminalInput::Resize { cols, rows }) => {
                    let (cols, rows) = clamp_size(cols, rows);
                    // Non-blocking: retry until the request is sent.
                    while let Err(e) =
                        channel.request_pty_size(u32::from(cols), u32::from(rows), None, None)
                    {
                        if e.code() != ssh2::ErrorCode::Session(-37) {
                            break;
                        }
                        std::thread::sleep(Duration::from_millis(2));
                    }
                }
                Ok(TerminalInput::Close)
                | Err(tokio::sync::mpsc::error::TryRecvError::Disconnected) => {
                    close(session, &mut channel);
                    return;
                }
                Err(tokio::sync::mpsc::error::TryRecvError::Empty) => break,
            }
        }
        if !pending.is_empty() {
            match channel.write(&pending) {
                Ok(n) => {
                    busy = true;
                    pending.drain(..n);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(e) => {
                    let _ = output.blocking_send(TerminalOutput::Error(e.to_string()));
                    break;
                }
            }
        }
        if !busy {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    let status = channel.exit_status().ok();
    let _ = output.blocking_send(TerminalOutput::Exit(status));
    close(session, &mut channel);
}

fn close(session: &ssh2::Session, channel: &mut ssh2::Channel) {
    session.set_blocking(true);
    session.set_timeout(2_000);
    let _ = channel.close();
    let _ = session.disconnect(None, "terminal closed", None);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reported_keys_parse_and_sizes_are_clamped() {
        assert_eq!(
            key_bytes("ssh-ed25519 AAEC host").expect("key"),
            vec![0, 1, 2]
        );
        assert!(matches!(
            key_bytes("ssh-ed25519"),
            Err(TerminalError::BadReportedKey)
        ));
        assert!(matches!(
            key_bytes("ssh-ed25519 !!!"),
            Err(TerminalError::BadReportedKey)
        ));
        assert_eq!(clamp_size(0, 0), (10, 4));
        assert_eq!(clamp_size(80, 24), (80, 24));
        assert_eq!(clamp_size(9999, 9999), (500, 200));
    }

    #[test]
    fn debug_hides_the_password() {
        let target = TerminalTarget {
            host: "h".into(),
            port: 22,
            username: "u".into(),
            password: "sekret".into(),
            host_key: String::new(),
        };
        assert!(!format!("{target:?}").contains("sekret"));
    }
}
