//! Clients of a running daemon, in other processes: the socket client the CLI uses, and the
//! Speech Dispatcher output module (`speechd.rs`), which speaks through it.

pub mod socket;
pub mod speechd;
