//! One viewer of a desktop over WebRTC (webrtc 0.21): the browser offers (receive-only video
//! plus an "input" data channel), the appliance answers with host candidates only (venue
//! LAN, no STUN/TURN) and sends the desktop's shared H.264 stream. PLI/FIR from the browser
//! asks the encoder for a keyframe. Input from an interactive viewer reaches the desktop;
//! input from a view-only viewer is dropped and counted.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rtc::interceptor::{
    Attribute, Interceptor, Packet as InterceptorPacket, Slot, StreamInfo, TaggedPacket,
};
use rtc::media_stream::MediaStreamTrack;
use rtc::peer_connection::configuration::interceptor_registry::{
    configure_nack, configure_rtcp_reports,
};
use rtc::peer_connection::configuration::media_engine::{MIME_TYPE_H264, MIME_TYPE_VP8};
use rtc::rtcp::payload_feedbacks::full_intra_request::FullIntraRequest;
use rtc::rtcp::payload_feedbacks::picture_loss_indication::PictureLossIndication;
use rtc::rtcp::payload_feedbacks::receiver_estimated_maximum_bitrate::ReceiverEstimatedMaximumBitrate;
use rtc::rtcp::receiver_report::ReceiverReport;
use rtc::rtp_transceiver::rtp_sender::{
    RTCPFeedback, RTCRtpCodec, RTCRtpCodecParameters, RTCRtpCodingParameters,
    RTCRtpEncodingParameters, RtpCodecKind,
};
use rtc::sansio::Protocol;
use tokio::sync::mpsc;
use webrtc::data_channel::{DataChannel, DataChannelEvent};
use webrtc::media_stream::Track as _;
use webrtc::media_stream::track_local::static_rtp::TrackLocalStaticRTP;
use webrtc::media_stream::track_local::{TrackLocal, TrackLocalEvent};
use webrtc::peer_connection::{
    MediaEngine, PeerConnection, PeerConnectionBuilder, PeerConnectionEventHandler,
    RTCConfigurationBuilder, RTCIceGatheringState, RTCPeerConnectionState, RTCSessionDescription,
    Registry, SettingEngineBuilder,
};

use crate::desktop::DesktopStream;
use crate::encode::Codec;
use crate::rate::{RateController, RateLimits};

#[derive(Debug, thiserror::Error)]
pub enum ViewerError {
    #[error("WebRTC: {0}")]
    WebRtc(String),
    #[error("the offer has neither H.264 nor VP8 video, the codecs the appliance can send")]
    NoCodec,
}

fn webrtc_error(error: impl std::fmt::Display) -> ViewerError {
    ViewerError::WebRtc(error.to_string())
}

/// What a viewer did, for the stats overlay and the audit log.
#[derive(Debug, Default)]
pub struct ViewerStats {
    pub frames_sent: AtomicU64,
    pub bytes_sent: AtomicU64,
    pub keyframe_requests: AtomicU64,
    pub inputs_applied: AtomicU64,
    /// input messages from a view-only viewer, dropped
    pub inputs_dropped: AtomicU64,
    pub inputs_malformed: AtomicU64,
    /// the last receiver report's loss for this viewer, in 1/256
    pub fraction_lost: AtomicU64,
    /// the browser's last bandwidth estimate (REMB), if it sends one
    pub remb_bps: AtomicU64,
    /// the bitrate this viewer's feedback asks for
    pub target_bps: AtomicU64,
}

enum Event {
    GatheringComplete,
    State(RTCPeerConnectionState),
    DataChannel(Arc<dyn DataChannel>),
}

struct Handler {
    events: mpsc::UnboundedSender<Event>,
}

#[async_trait::async_trait]
impl PeerConnectionEventHandler for Handler {
    async fn on_ice_gathering_state_change(&self, state: RTCIceGatheringState) {
        if state == RTCIceGatheringState::Complete {
            let _ = self.events.send(Event::GatheringComplete);
        }
    }

    async fn on_connection_state_change(&self, state: RTCPeerConnectionState) {
        let _ = self.events.send(Event::State(state));
    }

    async fn on_data_channel(&self, channel: Arc<dyn DataChannel>) {
        let _ = self.events.send(Event::DataChannel(channel));
    }
}

/// Inbound RTCP is consumed by the interceptor chain and dropped at its end unless marked
/// for the application: this marks picture-loss and intra-frame requests, and the receiver
/// reports and bitrate estimates the rate controller follows.
#[derive(Default)]
struct KeyframeRequests {
    reads: VecDeque<TaggedPacket>,
    writes: VecDeque<TaggedPacket>,
}

impl Protocol<TaggedPacket, TaggedPacket, ()> for KeyframeRequests {
    type Rout = TaggedPacket;
    type Wout = TaggedPacket;
    type Eout = ();
    type Error = rtc::shared::error::Error;
    type Time = Instant;

    fn handle_read(&mut self, mut message: TaggedPacket) -> Result<(), Self::Error> {
        if let InterceptorPacket::Rtcp(packets) = &message.message.packet {
            let wanted: Vec<Box<dyn rtc::rtcp::Packet>> = packets
                .iter()
                .filter(|p| {
                    let any = p.as_any();
                    any.is::<PictureLossIndication>()
                        || any.is::<FullIntraRequest>()
                        || any.is::<ReceiverReport>()
                        || any.is::<ReceiverEstimatedMaximumBitrate>()
                })
                .cloned()
                .collect();
            if wanted.is_empty() {
                return Ok(());
            }
            message.message.packet = InterceptorPacket::Rtcp(wanted);
            message.message.add(Attribute::DeliverToApplication);
        }
        self.reads.push_back(message);
        Ok(())
    }

    fn poll_read(&mut self) -> Option<TaggedPacket> {
        self.reads.pop_front()
    }

    fn handle_write(&mut self, message: TaggedPacket) -> Result<(), Self::Error> {
        self.writes.push_back(message);
        Ok(())
    }

    fn poll_write(&mut self) -> Option<TaggedPacket> {
        self.writes.pop_front()
    }
}

impl Interceptor for KeyframeRequests {
    fn bind_local_stream(&mut self, _: &StreamInfo) {}
    fn unbind_local_stream(&mut self, _: &StreamInfo) {}
    fn bind_remote_stream(&mut self, _: &StreamInfo) {}
    fn unbind_remote_stream(&mut self, _: &StreamInfo) {}
}

/// A connected (or connecting) viewer. [`Viewer::closed`] resolves when it is gone.
pub struct Viewer {
    pc: Arc<dyn PeerConnection>,
    /// the codec this browser gets
    pub codec: Codec,
    pub stats: Arc<ViewerStats>,
    done: tokio::sync::watch::Receiver<bool>,
}

impl std::fmt::Debug for Viewer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Viewer")
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl Viewer {
    /// Answers a browser's offer; returns the viewer and the answer SDP (all candidates in it).
    /// `udp_bind` is where this viewer's UDP socket binds, e.g. `0.0.0.0:0` (one socket per
    /// LAN interface) or `127.0.0.1:0`.
    pub async fn answer(
        offer_sdp: String,
        stream: DesktopStream,
        interactive: bool,
        udp_bind: String,
    ) -> Result<(Self, String), ViewerError> {
        let codec = choose_codec(&offer_sdp).ok_or(ViewerError::NoCodec)?;
        let feedback = vec![
            RTCPFeedback {
                typ: "ccm".into(),
                parameter: "fir".into(),
            },
            RTCPFeedback {
                typ: "goog-remb".into(),
                parameter: String::new(),
            },
        ];
        let video = match codec {
            Codec::H264 => RTCRtpCodecParameters {
                rtp_codec: RTCRtpCodec {
                    mime_type: MIME_TYPE_H264.to_owned(),
                    clock_rate: 90_000,
                    channels: 0,
                    sdp_fmtp_line:
                        "level-asymmetry-allowed=1;packetization-mode=1;profile-level-id=42e01f"
                            .to_owned(),
                    rtcp_feedback: feedback,
                },
                payload_type: 102,
            },
            Codec::Vp8 => RTCRtpCodecParameters {
                rtp_codec: RTCRtpCodec {
                    mime_type: MIME_TYPE_VP8.to_owned(),
                    clock_rate: 90_000,
                    channels: 0,
                    sdp_fmtp_line: String::new(),
                    rtcp_feedback: feedback,
                },
                payload_type: 96,
            },
        };
        let mut media_engine = MediaEngine::default();
        media_engine
            .register_codec(video.clone(), RtpCodecKind::Video)
            .map_err(webrtc_error)?;
        let registry = configure_rtcp_reports(configure_nack(Registry::new(), &mut media_engine))
            .with(Slot::from(14_000), KeyframeRequests::default());
        let settings = SettingEngineBuilder::new()
            .with_multicast_dns_mode(rtc::ice::mdns::MulticastDnsMode::QueryOnly)
            .build();
        let (events_tx, mut events) = mpsc::unbounded_channel();
        let pc: Arc<dyn PeerConnection> = Arc::new(
            PeerConnectionBuilder::new()
                .with_configuration(RTCConfigurationBuilder::new().build())
                .with_media_engine(media_engine)
                .with_setting_engine(settings)
                .with_interceptor_registry(registry)
                .with_handler(Arc::new(Handler { events: events_tx }))
                .with_udp_addrs(vec![udp_bind])
                .build()
                .await
                .map_err(webrtc_error)?,
        );
        let ssrc: u32 = rand::random();
        let track = Arc::new(TrackLocalStaticRTP::new(MediaStreamTrack::new(
            "desktop".to_owned(),
            "desktop-video".to_owned(),
            "desktop".to_owned(),
            RtpCodecKind::Video,
            vec![RTCRtpEncodingParameters {
                rtp_coding_parameters: RTCRtpCodingParameters {
                    ssrc: Some(ssrc),
                    ..Default::default()
                },
                codec: video.rtp_codec.clone(),
                active: true,
                ..Default::default()
            }],
        )));
        let sender = pc
            .add_track(track.clone() as Arc<dyn TrackLocal>)
            .await
            .map_err(webrtc_error)?;
        let result = async {
            pc.set_remote_description(
                RTCSessionDescription::offer(offer_sdp).map_err(webrtc_error)?,
            )
            .await
            .map_err(webrtc_error)?;
            let answer = pc.create_answer(None).await.map_err(webrtc_error)?;
            pc.set_local_description(answer)
                .await
                .map_err(webrtc_error)?;
            Ok::<_, ViewerError>(())
        }
        .await;
        if let Err(error) = result {
            let _ = pc.close().await;
            return Err(error);
        }
        let mut early = VecDeque::new();
        let gathered = tokio::time::timeout(Duration::from_secs(5), async {
            while let Some(event) = events.recv().await {
                match event {
                    Event::GatheringComplete => return true,
                    other => early.push_back(other),
                }
            }
            false
        })
        .await;
        let answer = match (gathered, pc.local_description().await) {
            (Ok(true), Some(answer)) => answer.sdp,
            _ => {
                let _ = pc.close().await;
                return Err(ViewerError::WebRtc("ICE gathering did not finish".into()));
            }
        };
        let payload_type = match sender
            .get_parameters()
            .await
            .map_err(webrtc_error)?
            .rtp_parameters
            .codecs
            .first()
        {
            Some(codec) => codec.payload_type,
            None => {
                let _ = pc.close().await;
                return Err(ViewerError::NoCodec);
            }
        };
        let ssrc = track.ssrcs().await.first().copied().unwrap_or(ssrc);
        let stats = Arc::new(ViewerStats::default());
        let (done_tx, done) = tokio::sync::watch::channel(false);

        // Keyframe requests and receiver feedback from the browser.
        let viewer_id: u64 = rand::random();
        tokio::spawn({
            let (track, stream, stats) = (track.clone(), stream.clone(), stats.clone());
            async move {
                let mut rate = RateController::new(RateLimits::default());
                while let Some(TrackLocalEvent::OnRtcpPacket(packets)) = track.poll().await {
                    if packets.iter().any(|p| {
                        p.as_any().is::<PictureLossIndication>()
                            || p.as_any().is::<FullIntraRequest>()
                    }) {
                        stats.keyframe_requests.fetch_add(1, Ordering::Relaxed);
                        stream.request_keyframe();
                    }
                    let mut target = None;
                    for packet in &packets {
                        let now = Instant::now();
                        if let Some(report) = packet.as_any().downcast_ref::<ReceiverReport>() {
                            for block in report.reports.iter().filter(|block| block.ssrc == ssrc) {
                                stats
                                    .fraction_lost
                                    .store(u64::from(block.fraction_lost), Ordering::Relaxed);
                                target = Some(rate.on_loss(block.fraction_lost, now));
                            }
                        } else if let Some(remb) = packet
                            .as_any()
                            .downcast_ref::<ReceiverEstimatedMaximumBitrate>()
                        {
                            stats.remb_bps.store(remb.bitrate as u64, Ordering::Relaxed);
                            target = Some(rate.on_remb(remb.bitrate, now));
                        }
                    }
                    if let Some(target) = target {
                        stats.target_bps.store(u64::from(target), Ordering::Relaxed);
                        stream.set_viewer_bitrate(viewer_id, target);
                    }
                }
                stream.forget_viewer(viewer_id);
            }
        });

        // Connection state, data channels and the media pump.
        tokio::spawn({
            let (pc, stats) = (pc.clone(), stats.clone());
            async move {
                let mut media: Option<tokio::task::JoinHandle<()>> = None;
                loop {
                    let event = match early.pop_front() {
                        Some(event) => event,
                        None => match events.recv().await {
                            Some(event) => event,
                            None => break,
                        },
                    };
                    match event {
                        Event::State(RTCPeerConnectionState::Connected) if media.is_none() => {
                            media = Some(tokio::spawn(pump_media(
                                track.clone(),
                                stream.clone(),
                                video.rtp_codec.clone(),
                                codec,
                                ssrc,
                                payload_type,
                                stats.clone(),
                            )));
                        }
                        Event::State(
                            RTCPeerConnectionState::Failed | RTCPeerConnectionState::Closed,
                        ) => break,
                        Event::DataChannel(channel) => {
                            let (stream, stats, done_tx) =
                                (stream.clone(), stats.clone(), done_tx.clone());
                            tokio::spawn(async move {
                                while let Some(event) = channel.poll().await {
                                    match event {
                                        DataChannelEvent::OnMessage(message)
                                            if !message.is_string =>
                                        {
                                            if !interactive {
                                                stats
                                                    .inputs_dropped
                                                    .fetch_add(1, Ordering::Relaxed);
                                                continue;
                                            }
                                            match crate::input::decode(&message.data) {
                                                Ok(events) => {
                                                    stats
                                                        .inputs_applied
                                                        .fetch_add(1, Ordering::Relaxed);
                                                    stream.input(events);
                                                }
                                                Err(_) => {
                                                    stats
                                                        .inputs_malformed
                                                        .fetch_add(1, Ordering::Relaxed);
                                                }
                                            }
                                        }
                                        // The tab went away: much sooner than ICE notices.
                                        DataChannelEvent::OnClose => {
                                            let _ = done_tx.send(true);
                                            break;
                                        }
                                        _ => {}
                                    }
                                }
                            });
                        }
                        _ => {}
                    }
                }
                if let Some(media) = media {
                    media.abort();
                }
                let _ = done_tx.send(true);
                let _ = pc.close().await;
                stream.forget_viewer(viewer_id);
            }
        });
        Ok((
            Self {
                pc,
                codec,
                stats,
                done,
            },
            answer,
        ))
    }

    /// Resolves once the browser left (data channel closed, ICE failed) or the viewer was closed.
    pub async fn closed(&mut self) {
        let _ = self.done.wait_for(|done| *done).await;
    }

    pub async fn close(&self) {
        let _ = self.pc.close().await;
    }
}

/// RTP payload size: under a LAN's 1500-byte MTU with room for IP, UDP, SRTP and extensions.
const RTP_MTU: usize = 1200;

/// H.264 when the browser offers it (cheaper to encode here), else VP8 (Firefox without
/// its OpenH264 plugin); None when it offers neither.
fn choose_codec(offer_sdp: &str) -> Option<Codec> {
    let offered = |name: &str| {
        offer_sdp.lines().any(|line| {
            line.starts_with("a=rtpmap:")
                && line
                    .split_whitespace()
                    .nth(1)
                    .is_some_and(|codec| codec.eq_ignore_ascii_case(&format!("{name}/90000")))
        })
    };
    if offered("H264") {
        Some(Codec::H264)
    } else if offered("VP8") {
        Some(Codec::Vp8)
    } else {
        None
    }
}

/// Sends the desktop's frames as they come; the first one is a keyframe.
///
/// Each frame's RTP timestamp is its capture time on the 90 kHz clock. (A sample writer
/// stamps a frame with the previous frame's duration, so the first frame after an idle
/// spell looked seconds late to the browser, whose jitter buffer then held every frame
/// about a second: measured 1.1 s glass to glass before this.)
async fn pump_media(
    track: Arc<TrackLocalStaticRTP>,
    stream: DesktopStream,
    rtp_codec: RTCRtpCodec,
    codec: Codec,
    ssrc: u32,
    payload_type: u8,
    stats: Arc<ViewerStats>,
) {
    use rtc::rtp::packetizer::Packetizer as _;
    let Ok(payloader) = rtp_codec.payloader() else {
        tracing::warn!(codec = codec.name(), "no RTP payloader for the codec");
        return;
    };
    let mut packetizer = rtc::rtp::packetizer::new_packetizer(
        Instant::now(),
        RTP_MTU,
        payload_type,
        ssrc,
        payloader,
        Box::new(rtc::rtp::sequence::new_random_sequencer()),
        90_000,
    );
    let clock_base: u32 = rand::random();
    let mut clock_start: Option<Instant> = None;
    let mut frames = stream.subscribe(codec);
    let mut waiting_for_keyframe = true;
    loop {
        let frame = match frames.recv().await {
            Ok(frame) => frame,
            Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                // Fell behind: skip to the next keyframe rather than show corruption.
                waiting_for_keyframe = true;
                stream.request_keyframe();
                continue;
            }
            Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
        };
        if waiting_for_keyframe && !frame.encoded.keyframe {
            continue;
        }
        waiting_for_keyframe = false;
        let since_start = frame
            .captured
            .saturating_duration_since(*clock_start.get_or_insert(frame.captured));
        let timestamp =
            clock_base.wrapping_add((since_start.as_secs_f64() * 90_000.0) as u64 as u32);
        let packets =
            match packetizer.packetize(frame.captured, &Bytes::from(frame.encoded.data.clone()), 0)
            {
                Ok(packets) => packets,
                Err(error) => {
                    tracing::warn!(%error, "packetizing a frame failed");
                    continue;
                }
            };
        for mut packet in packets {
            packet.header.timestamp = timestamp;
            packet.header.payload_type = payload_type;
            if track.write_rtp_with_extensions(packet, &[]).await.is_err() {
                return;
            }
        }
        stats.frames_sent.fetch_add(1, Ordering::Relaxed);
        stats
            .bytes_sent
            .fetch_add(frame.encoded.data.len() as u64, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn h264_is_preferred_and_vp8_is_the_fallback() {
        let both = "v=0\r\nm=video 9 UDP/TLS/RTP/SAVPF 96 102\r\na=rtpmap:96 VP8/90000\r\na=rtpmap:102 H264/90000\r\n";
        assert_eq!(choose_codec(both), Some(Codec::H264));
        let vp8_only = "v=0\r\nm=video 9 UDP/TLS/RTP/SAVPF 96\r\na=rtpmap:96 VP8/90000\r\n";
        assert_eq!(choose_codec(vp8_only), Some(Codec::Vp8));
        assert_eq!(choose_codec("v=0\r\na=rtpmap:98 VP9/90000\r\n"), None);
        assert_eq!(choose_codec("v=0"), None);
    }
}
