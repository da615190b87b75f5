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
    let connection = zbus::connection::Builder::session()
        .serve_at(spiel::PROVIDER_PATH, provider)
        .serve_at(
            control::CONTROL_PATH,
            control::Control {
                speech: speech.clone(),
            },
        )
        .name(BUS_NAME)
        .build()
        .await?;
    tokio::spawn(announce_voice_changes(speech, connection.clone()));
    Ok(connection)
}

/// Tells D-Bus clients when the voice list changes: Spiel's `Voices` property
/// (`PropertiesChanged`) and the control interface's `VoicesChanged` signal.
async fn announce_voice_changes(speech: Arc<Speech>, connection: zbus::Connection) {
    let mut changes = speech.voice_changes();
    while changes.changed().await.is_ok() {
        let server = connection.object_server();
        if let Ok(provider) = server
            .interface::<_, spiel::Provider>(spiel::PROVIDER_PATH)
            .await
        {
            let emitter = provider.signal_emitter();
            if let Err(e) = provider.get().await.voices_changed(emitter).await {
                tracing::debug!(error = %e, "Voices change not announced");
            }
        }
        if let Ok(emitter) =
            zbus::object_server::SignalEmitter::new(&connection, control::CONTROL_PATH)
        {
            let _ = control::Control::voices_changed(&emitter).await;
        }
    }
}
