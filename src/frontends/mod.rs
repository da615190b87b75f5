//! The interfaces, side by side, each only its protocol: parse what the client sends into a
//! [`crate::service::Request`], call the speech service, encode the events for the client.
//!
//! - `socket.rs` (+ `protocol.rs`, its messages): the per-user Unix socket, JSON lines;
//! - `spiel.rs`: the freedesktop speech provider on D-Bus;
//! - `control.rs`: the daemon's own D-Bus control interface;
//! - `http.rs`: the OpenAI-style speech API;
//! - `wyoming.rs`: the Wyoming protocol, for Home Assistant.

pub mod control;
pub mod http;
pub mod protocol;
pub mod socket;
pub mod spiel;
pub mod wyoming;

use std::sync::Arc;

use crate::service::Speech;

/// The well-known name on the session bus (Spiel clients find providers by its suffix).
pub const BUS_NAME: &str = "org.voxtrald.Speech.Provider";

/// Connects to the session bus, serves the provider and the control interface, and takes the
/// well-known name.
pub async fn serve_dbus(speech: Arc<Speech>) -> zbus::Result<zbus::Connection> {
    let provider = spiel::Provider {
        speech: speech.clone(),
    };
    zbus::connection::Builder::session()
        .serve_at(spiel::PROVIDER_PATH, provider)
        .serve_at(control::CONTROL_PATH, control::Control { speech })
        .name(BUS_NAME)
        .build()
        .await
}
