//! An event's life: draft → live ⇄ frozen → ended → archived, and what each state allows.
//! The API serves the legal next states, so no UI keeps its own table.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Where an event is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum EventState {
    Draft,
    Live,
    Frozen,
    Ended,
    Archived,
}

impl EventState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Draft => "draft",
            Self::Live => "live",
            Self::Frozen => "frozen",
            Self::Ended => "ended",
            Self::Archived => "archived",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.as_str() == text)
    }

    /// Every state, in the order of an event's life.
    pub const ALL: [Self; 5] = [
        Self::Draft,
        Self::Live,
        Self::Frozen,
        Self::Ended,
        Self::Archived,
    ];

    /// The states this one may become, in life order.
    pub fn next_states(self) -> Vec<Self> {
        Self::ALL
            .into_iter()
            .filter(|to| self.can_become(*to))
            .collect()
    }

    /// The legal transitions; everything else is refused.
    pub fn can_become(self, to: Self) -> bool {
        use EventState::{Archived, Draft, Ended, Frozen, Live};
        matches!(
            (self, to),
            (Draft, Live)
                | (Live, Frozen)
                | (Frozen, Live)
                | (Live | Frozen, Ended)
                | (Ended, Archived)
        )
    }

    /// Whether teams and participants may still be added or changed.
    pub fn accepts_changes(self) -> bool {
        matches!(self, Self::Draft | Self::Live | Self::Frozen)
    }

    /// Whether participants may still work in their labs (type, open a terminal, reset);
    /// from `ended` on they only watch, while judges look.
    pub fn participants_work(self) -> bool {
        matches!(self, Self::Draft | Self::Live | Self::Frozen)
    }
}

#[cfg(test)]
mod tests {
    use super::EventState::{self, *};

    #[test]
    fn transition_table() {
        let all = [Draft, Live, Frozen, Ended, Archived];
        let legal = [
            (Draft, Live),
            (Live, Frozen),
            (Frozen, Live),
            (Live, Ended),
            (Frozen, Ended),
            (Ended, Archived),
        ];
        for from in all {
            for to in all {
                assert_eq!(
                    from.can_become(to),
                    legal.contains(&(from, to)),
                    "{from:?} -> {to:?}"
                );
            }
        }
        assert!(
            all.iter()
                .all(|s| EventState::parse(s.as_str()) == Some(*s))
        );
        assert_eq!(Live.next_states(), vec![Frozen, Ended]);
        assert!(Archived.next_states().is_empty());
    }
}
