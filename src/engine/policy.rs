//! Speech Dispatcher's rules for the daemon's own output, as pure functions: which waiting or
//! speaking job a new request displaces, and in which order waiting jobs are taken. Jobs whose
//! audio goes back to their client are never displaced; their priority only orders them.

use super::request::Priority;

/// Admission order: lower goes first.
pub(super) fn rank(p: Priority) -> u8 {
    match p {
        Priority::Important => 0,
        Priority::Message => 1,
        Priority::Text => 2,
        // Progress reports are worth more than ephemeral notifications.
        Priority::Progress => 3,
        Priority::Notification => 4,
    }
}

/// A notification is not spoken at all while anything else waits or speaks.
pub(super) fn dropped_on_arrival(new: Priority, speaker_busy: bool) -> bool {
    new == Priority::Notification && speaker_busy
}

/// Whether a new request of priority `new` cancels a speaker job of priority `old`, waiting
/// or speaking.
pub(super) fn displaces(new: Priority, old: Priority) -> bool {
    match new {
        Priority::Important | Priority::Text | Priority::Progress => old == Priority::Notification,
        Priority::Message => matches!(old, Priority::Text | Priority::Notification),
        Priority::Notification => false,
    }
}

/// Whether a new request removes a waiting speaker job: what it displaces, and older progress
/// reports (only the latest of a series is kept, so the last one is always spoken).
pub(super) fn replaces_waiting(new: Priority, old: Priority) -> bool {
    displaces(new, old) || (new == Priority::Progress && old == Priority::Progress)
}

pub(super) fn displaced_reason(by: Priority) -> String {
    format!("displaced by a {by:?} request").to_lowercase()
}
