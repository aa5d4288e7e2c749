//! The viewer's input messages (binary, on the "input" data channel) and their RDP form.
//!
//! Every message starts with a type byte; numbers are little-endian:
//!
//! | type | bytes | meaning |
//! | --- | --- | --- |
//! | 1 | `1, flags, scancode` | key by set-1 scancode; flags bit 0 = down, bit 1 = extended (E0) |
//! | 2 | `2, flags, u16 code unit` | Unicode key (text the layout cannot type); bit 0 = down |
//! | 3 | `3, u16 x, u16 y` | pointer moved to (x, y) in desktop pixels |
//! | 4 | `4, button, down, u16 x, u16 y` | button 0 left, 1 middle, 2 right |
//! | 5 | `5, i16 delta, u16 x, u16 y` | vertical wheel, positive away from the user |
//!
//! Several messages may be concatenated in one data-channel message. Consecutive pointer
//! moves in one message become the last of them: only where the pointer ends up matters
//! (a browser sends one message per frame), and a flood of moves then costs the desktop one.

use ironrdp_pdu::input::fast_path::{FastPathInputEvent, KeyboardFlags};
use ironrdp_pdu::input::mouse::{MousePdu, PointerFlags};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InputError {
    #[error("unknown input message type {0}")]
    UnknownType(u8),
    #[error("input message of type {kind} is cut short")]
    Truncated { kind: u8 },
    #[error("unknown mouse button {0}")]
    Button(u8),
}

fn u16_at(bytes: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([bytes[at], bytes[at + 1]])
}

/// Decodes one data-channel message into RDP input events; all or nothing.
pub fn decode(mut bytes: &[u8]) -> Result<Vec<FastPathInputEvent>, InputError> {
    let mut events = Vec::new();
    while let Some(&kind) = bytes.first() {
        let len = match kind {
            1 => 3,
            2 => 4,
            3 => 5,
            4 => 7,
            5 => 7,
            other => return Err(InputError::UnknownType(other)),
        };
        if bytes.len() < len {
            return Err(InputError::Truncated { kind });
        }
        let message = &bytes[..len];
        events.push(match kind {
            1 => {
                let mut flags = KeyboardFlags::empty();
                if message[1] & 1 == 0 {
                    flags |= KeyboardFlags::RELEASE;
                }
                if message[1] & 2 != 0 {
                    flags |= KeyboardFlags::EXTENDED;
                }
                FastPathInputEvent::KeyboardEvent(flags, message[2])
            }
            2 => {
                let flags = if message[1] & 1 == 0 {
                    KeyboardFlags::RELEASE
                } else {
                    KeyboardFlags::empty()
                };
                FastPathInputEvent::UnicodeKeyboardEvent(flags, u16_at(message, 2))
            }
            3 => FastPathInputEvent::MouseEvent(MousePdu {
                flags: PointerFlags::MOVE,
                number_of_wheel_rotation_units: 0,
                x_position: u16_at(message, 1),
                y_position: u16_at(message, 3),
            }),
            4 => {
                let mut flags = match message[1] {
                    0 => PointerFlags::LEFT_BUTTON,
                    1 => PointerFlags::MIDDLE_BUTTON_OR_WHEEL,
                    2 => PointerFlags::RIGHT_BUTTON,
                    other => return Err(InputError::Button(other)),
                };
                if message[2] != 0 {
                    flags |= PointerFlags::DOWN;
                }
                FastPathInputEvent::MouseEvent(MousePdu {
                    flags,
                    number_of_wheel_rotation_units: 0,
                    x_position: u16_at(message, 3),
                    y_position: u16_at(message, 5),
                })
            }
            _ => {
                let delta = i16::from_le_bytes([message[1], message[2]]);
                FastPathInputEvent::MouseEvent(MousePdu {
                    flags: PointerFlags::VERTICAL_WHEEL,
                    number_of_wheel_rotation_units: delta.clamp(
                        *MousePdu::WHEEL_ROTATION_RANGE.start(),
                        *MousePdu::WHEEL_ROTATION_RANGE.end(),
                    ),
                    x_position: u16_at(message, 3),
                    y_position: u16_at(message, 5),
                })
            }
        });
        bytes = &bytes[len..];
        let moves = |e: Option<&FastPathInputEvent>| matches!(e, Some(FastPathInputEvent::MouseEvent(m)) if m.flags == PointerFlags::MOVE);
        if events.len() >= 2 && moves(events.last()) && moves(events.get(events.len() - 2)) {
            let last = events.pop();
            if let (Some(previous), Some(last)) = (events.last_mut(), last) {
                *previous = last;
            }
        }
    }
    Ok(events)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consecutive_pointer_moves_become_the_last_one() {
        let mut message = Vec::new();
        for x in 0..100_u16 {
            message.push(3);
            message.extend_from_slice(&x.to_le_bytes());
            message.extend_from_slice(&[7, 0]);
        }
        let at = |x: u16, y: u16| {
            FastPathInputEvent::MouseEvent(MousePdu {
                flags: PointerFlags::MOVE,
                number_of_wheel_rotation_units: 0,
                x_position: x,
                y_position: y,
            })
        };
        assert_eq!(decode(&message).expect("valid"), [at(99, 7)]);
        // a button between moves keeps its place, and the moves either side of it
        message.extend_from_slice(&[4, 0, 1, 99, 0, 7, 0]);
        message.extend_from_slice(&[3, 1, 0, 2, 0, 3, 5, 0, 6, 0]);
        let events = decode(&message).expect("valid");
        assert_eq!(events.len(), 3, "{events:?}");
        assert_eq!(events[0], at(99, 7));
        assert_eq!(events[2], at(5, 6));
    }

    #[test]
    fn keys_pointer_and_wheel_decode() {
        let mut message = vec![1, 1, 0x1e, 1, 0, 0x1e, 1, 3, 0x48];
        message.extend_from_slice(&[3, 0x10, 0, 0x20, 0]);
        message.extend_from_slice(&[4, 2, 1, 5, 0, 6, 0]);
        message.extend_from_slice(&[5, 0xf6, 0xff, 1, 0, 2, 0]);
        message.extend_from_slice(&[2, 1, 0xe9, 0]);
        let events = decode(&message).expect("valid");
        assert_eq!(
            events[0],
            FastPathInputEvent::KeyboardEvent(KeyboardFlags::empty(), 0x1e),
            "'a' down"
        );
        assert_eq!(
            events[1],
            FastPathInputEvent::KeyboardEvent(KeyboardFlags::RELEASE, 0x1e),
            "'a' up"
        );
        assert_eq!(
            events[2],
            FastPathInputEvent::KeyboardEvent(KeyboardFlags::EXTENDED, 0x48),
            "arrow up down"
        );
        assert_eq!(
            events[3],
            FastPathInputEvent::MouseEvent(MousePdu {
                flags: PointerFlags::MOVE,
                number_of_wheel_rotation_units: 0,
                x_position: 16,
                y_position: 32
            })
        );
        assert_eq!(
            events[4],
            FastPathInputEvent::MouseEvent(MousePdu {
                flags: PointerFlags::RIGHT_BUTTON | PointerFlags::DOWN,
                number_of_wheel_rotation_units: 0,
                x_position: 5,
                y_position: 6
            })
        );
        assert_eq!(
            events[5],
            FastPathInputEvent::MouseEvent(MousePdu {
                flags: PointerFlags::VERTICAL_WHEEL,
                number_of_wheel_rotation_units: -10,
                x_position: 1,
                y_position: 2
            })
        );
        assert_eq!(
            events[6],
            FastPathInputEvent::UnicodeKeyboardEvent(KeyboardFlags::empty(), 0xe9)
        );
    }

    #[test]
    fn bad_messages_are_refused_whole() {
        assert_eq!(decode(&[9]), Err(InputError::UnknownType(9)));
        assert_eq!(
            decode(&[1, 1, 0x1e, 3, 0]),
            Err(InputError::Truncated { kind: 3 })
        );
        assert_eq!(decode(&[4, 7, 1, 0, 0, 0, 0]), Err(InputError::Button(7)));
        assert_eq!(decode(&[]), Ok(Vec::new()));
        assert_eq!(
            decode(&[5, 0xff, 0x7f, 0, 0, 0, 0]).map(|e| e.len()),
            Ok(1),
            "huge wheel deltas are clamped"
        );
    }
}
