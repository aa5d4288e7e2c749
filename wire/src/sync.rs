//! The appliance↔cloud sync protocol, on one bidirectional QUIC stream: length-prefixed
//! frames of a type byte and a body. Batches are deflated JSON; everything else is JSON.
//!
//! ```text
//! appliance                                  cloud
//!   Hello {version, name, token?,  ───────▶   (checks the client certificate: enrolled,
//!          epoch, base, last_seq}              or enrolled now with a valid token)
//!                                  ◀───────   Welcome {appliance_id, acked, epoch} | Refused {reason, code?}
//!   Batch {rows: seq > acked, in order} ──▶   applies idempotently by (appliance, epoch, seq)
//!                                  ◀───────   Ack {acked: highest contiguous seq}
//! ```
//!
//! Epochs: each side's database has a random epoch id. The appliance's numbers its outbox
//! rows; a database restored from a backup would number new rows with sequences the cloud
//! already holds, and the cloud refuses it (`epoch_mismatch`) until staff start a new epoch
//! (a new stream from the rows the appliance still has). The appliance refuses a cloud that
//! acknowledges more than was sent, or less than it already pruned (a cloud restored from
//! a backup): either would silently lose rows.

use std::io::{Read as _, Write as _};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

pub const VERSION: u32 = 2;
/// ALPN of the sync link.
pub const ALPN: &[u8] = b"labrack-sync/1";
/// The largest frame either side accepts (after decompression for batches).
pub const MAX_FRAME: usize = 64 * 1024 * 1024;
/// The largest frame other than a batch (hello, welcome, ack, refusal): checked from the
/// length and type, before any of the body is read.
pub const MAX_CONTROL_FRAME: usize = 64 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hello {
    pub version: u32,
    pub name: String,
    /// a one-time enrolment token; needed only until the cloud knows this appliance
    pub token: Option<String>,
    /// the appliance database's sync epoch (absent from a version 1 hello, which the cloud
    /// refuses for its version)
    #[serde(default)]
    pub epoch: String,
    /// the sequence the epoch starts after (its first row is `base + 1`)
    #[serde(default)]
    pub base: i64,
    /// the highest sequence this appliance has written
    #[serde(default)]
    pub last_seq: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Welcome {
    pub appliance_id: i64,
    /// the highest sequence number the cloud holds with none missing below it, in the
    /// appliance's epoch
    pub acked: i64,
    /// the cloud database's epoch
    pub epoch: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Row {
    pub seq: i64,
    pub kind: String,
    pub entity: String,
    /// the change as JSON text, exactly as the appliance wrote it
    pub body: String,
    pub created_ms: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Batch {
    pub rows: Vec<Row>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Ack {
    pub acked: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Refused {
    pub reason: String,
    /// what a program may act on: `epoch_mismatch` (the appliance's database went back)
    #[serde(default)]
    pub code: Option<String>,
}

/// [`Refused::code`] when the cloud holds more of an epoch than the appliance wrote.
pub const EPOCH_MISMATCH: &str = "epoch_mismatch";

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    Hello(Hello),
    Welcome(Welcome),
    Batch(Batch),
    Ack(Ack),
    Refused(Refused),
}

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("the link closed")]
    Closed,
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("a {0}-byte frame is larger than {MAX_FRAME} bytes")]
    TooLarge(usize),
    #[error("unknown frame type {0}")]
    UnknownType(u8),
    #[error("malformed frame: {0}")]
    Malformed(#[from] serde_json::Error),
}

impl Frame {
    fn type_byte(&self) -> u8 {
        match self {
            Self::Hello(_) => 1,
            Self::Welcome(_) => 2,
            Self::Batch(_) => 3,
            Self::Ack(_) => 4,
            Self::Refused(_) => 5,
        }
    }

    /// The frame's bytes: `u32` length (big-endian) of what follows, the type, the body.
    pub fn encode(&self) -> Result<Vec<u8>, FrameError> {
        let body = match self {
            Self::Hello(m) => serde_json::to_vec(m)?,
            Self::Welcome(m) => serde_json::to_vec(m)?,
            Self::Ack(m) => serde_json::to_vec(m)?,
            Self::Refused(m) => serde_json::to_vec(m)?,
            Self::Batch(m) => {
                let json = serde_json::to_vec(m)?;
                let mut encoder =
                    flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::fast());
                encoder.write_all(&json)?;
                encoder.finish()?
            }
        };
        let length = body.len() + 1;
        if length > MAX_FRAME {
            return Err(FrameError::TooLarge(length));
        }
        let mut bytes = Vec::with_capacity(length + 4);
        bytes.extend_from_slice(&u32::try_from(length).unwrap_or(u32::MAX).to_be_bytes());
        bytes.push(self.type_byte());
        bytes.extend_from_slice(&body);
        Ok(bytes)
    }

    /// Parses a frame's type and body (without the length prefix).
    pub fn decode(kind: u8, body: &[u8]) -> Result<Self, FrameError> {
        Ok(match kind {
            1 => Self::Hello(serde_json::from_slice(body)?),
            2 => Self::Welcome(serde_json::from_slice(body)?),
            3 => {
                let mut json = Vec::new();
                // Bounded: a small frame must not inflate into gigabytes.
                flate2::read::DeflateDecoder::new(body)
                    .take(MAX_FRAME as u64 + 1)
                    .read_to_end(&mut json)?;
                if json.len() > MAX_FRAME {
                    return Err(FrameError::TooLarge(json.len()));
                }
                Self::Batch(serde_json::from_slice(&json)?)
            }
            4 => Self::Ack(serde_json::from_slice(body)?),
            5 => Self::Refused(serde_json::from_slice(body)?),
            other => return Err(FrameError::UnknownType(other)),
        })
    }
}

pub async fn write_frame(
    stream: &mut (impl tokio::io::AsyncWrite + Unpin),
    frame: &Frame,
) -> Result<(), FrameError> {
    stream.write_all(&frame.encode()?).await?;
    Ok(())
}

pub async fn read_frame(
    stream: &mut (impl tokio::io::AsyncRead + Unpin),
) -> Result<Frame, FrameError> {
    let mut length = [0u8; 4];
    match stream.read_exact(&mut length).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Err(FrameError::Closed),
        Err(e) => return Err(e.into()),
    }
    let length = u32::from_be_bytes(length) as usize;
    if length == 0 || length > MAX_FRAME {
        return Err(FrameError::TooLarge(length));
    }
    let mut kind = [0u8; 1];
    stream.read_exact(&mut kind).await?;
    let limit = if kind[0] == 3 {
        MAX_FRAME
    } else {
        MAX_CONTROL_FRAME
    };
    if length > limit {
        return Err(FrameError::TooLarge(length));
    }
    // Grown as bytes arrive, never from the length alone: a peer that claims 64 MiB and
    // sends nothing costs nothing.
    let mut body = Vec::with_capacity((length - 1).min(MAX_CONTROL_FRAME));
    let read = stream
        .take(u64::try_from(length - 1).unwrap_or(u64::MAX))
        .read_to_end(&mut body)
        .await?;
    if read != length - 1 {
        return Err(FrameError::Closed);
    }
    Frame::decode(kind[0], &body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn frames_round_trip_and_bad_ones_are_refused() {
        let rows = (1..=500)
            .map(|seq| Row {
                seq,
                kind: "ledger".into(),
                entity: format!("ledger:{seq}"),
                body: "{\"amount_cents\":-100}".into(),
                created_ms: seq,
            })
            .collect();
        let frames = vec![
            Frame::Hello(Hello {
                version: VERSION,
                name: "rack-1".into(),
                token: Some("lrc_x".into()),
                epoch: "e1".into(),
                base: 0,
                last_seq: 500,
            }),
            Frame::Welcome(Welcome {
                appliance_id: 3,
                acked: 41,
                epoch: "c1".into(),
            }),
            Frame::Batch(Batch { rows }),
            Frame::Ack(Ack { acked: 500 }),
            Frame::Refused(Refused {
                reason: "not enrolled".into(),
                code: None,
            }),
        ];
        let mut wire = Vec::new();
        for frame in &frames {
            wire.extend(frame.encode().expect("encode"));
        }
        let batch_bytes = frames[2].encode().expect("encode").len();
        assert!(
            batch_bytes < 500 * 40,
            "batches are compressed: {batch_bytes} bytes"
        );
        let mut reader = wire.as_slice();
        for frame in &frames {
            assert_eq!(&read_frame(&mut reader).await.expect("decode"), frame);
        }
        assert!(matches!(
            read_frame(&mut reader).await,
            Err(FrameError::Closed)
        ));
        assert!(matches!(
            Frame::decode(9, b"{}"),
            Err(FrameError::UnknownType(9))
        ));
        assert!(matches!(
            Frame::decode(4, br#"{"acked":1,"extra":2}"#),
            Err(FrameError::Malformed(_))
        ));
        let mut huge: &[u8] = &[0xff, 0xff, 0xff, 0xff, 1];
        assert!(matches!(
            read_frame(&mut huge).await,
            Err(FrameError::TooLarge(_))
        ));
        // A hello may not be a megabyte, whatever follows; a batch may.
        let mut big_hello: &[u8] = &[0x00, 0x10, 0x00, 0x00, 1];
        assert!(matches!(
            read_frame(&mut big_hello).await,
            Err(FrameError::TooLarge(_))
        ));
        let mut cut_batch: &[u8] = &[0x00, 0x10, 0x00, 0x00, 3, 1, 2, 3];
        assert!(
            matches!(read_frame(&mut cut_batch).await, Err(FrameError::Closed)),
            "a cut-off frame is the link closing"
        );
    }
}
