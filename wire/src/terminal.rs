//! What a browser terminal sends: its hello (the ticket and the window size) and control
//! messages (a resize); keystrokes are raw bytes and need no parsing.

use serde::Deserialize;

/// The first message on a terminal socket.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hello {
    pub ticket: String,
    #[serde(default = "default_cols")]
    pub cols: u16,
    #[serde(default = "default_rows")]
    pub rows: u16,
}

fn default_cols() -> u16 {
    80
}

fn default_rows() -> u16 {
    24
}

/// A control message after the hello (text frames; binary frames are keystrokes).
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Control {
    Resize { cols: u16, rows: u16 },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hellos_and_controls_parse_strictly() {
        let hello: Hello = serde_json::from_str(r#"{"ticket":"t"}"#).expect("hello");
        assert_eq!((hello.cols, hello.rows), (80, 24));
        assert!(serde_json::from_str::<Hello>(r#"{"ticket":"t","cols":70000}"#).is_err());
        assert!(matches!(
            serde_json::from_str::<Control>(r#"{"type":"resize","cols":120,"rows":40}"#),
            Ok(Control::Resize {
                cols: 120,
                rows: 40
            })
        ));
        assert!(
            serde_json::from_str::<Control>(r#"{"type":"resize","cols":1,"rows":1,"x":0}"#)
                .is_err()
        );
    }
}
