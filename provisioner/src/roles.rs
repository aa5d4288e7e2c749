//! Staff roles and the named sets of them that the API's rules use, written once: a rule
//! says which set may act, never a list of its own.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Staff roles, most to least powerful.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// everything, including staff accounts
    Admin,
    /// events, their state, teams and participants
    Organizer,
    /// teams and participants of existing events
    Staff,
    /// read-only
    Judge,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Admin => "admin",
            Self::Organizer => "organizer",
            Self::Staff => "staff",
            Self::Judge => "judge",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "admin" => Some(Self::Admin),
            "organizer" => Some(Self::Organizer),
            "staff" => Some(Self::Staff),
            "judge" => Some(Self::Judge),
            _ => None,
        }
    }
}

/// Every staff member: who may read an event's state, people, labs, checks, scores, hints
/// and hosts, and watch desktops.
pub const ALL_STAFF: [Role; 4] = [Role::Admin, Role::Organizer, Role::Staff, Role::Judge];

/// Who runs the floor: lab actions, check batches, the job queue, terminals, people,
/// the dashboard and the billing ledger's view.
pub const OPERATORS: [Role; 3] = [Role::Admin, Role::Organizer, Role::Staff];

/// Who configures an event: its state, templates, rubric, hosts, hints and ledger entries.
pub const ORGANIZERS: [Role; 2] = [Role::Admin, Role::Organizer];

/// Staff accounts, the audit log's checks, the sync epoch: the admin alone.
pub const ADMINS: [Role; 1] = [Role::Admin];

/// Who may score a team by hand.
pub const JUDGES: [Role; 3] = [Role::Admin, Role::Organizer, Role::Judge];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_round_trip_and_sets_nest() {
        for role in ALL_STAFF {
            assert_eq!(Role::parse(role.as_str()), Some(role));
        }
        assert_eq!(Role::parse("root"), None);
        assert!(
            ORGANIZERS
                .iter()
                .all(|r| OPERATORS.contains(r) && JUDGES.contains(r))
        );
        assert!(OPERATORS.iter().all(|r| ALL_STAFF.contains(r)));
        assert!(!OPERATORS.contains(&Role::Judge) && !JUDGES.contains(&Role::Staff));
    }
}
