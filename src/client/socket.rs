//! A blocking client of the socket API, for the CLI (`say`, `voices`, `status`, `stop` use a
//! running daemon when there is one) and the Speech Dispatcher module.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context};
use serde_json::Value;

use crate::frontends::protocol::Message;
use crate::settings::Settings;

pub struct Client {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Client {
    /// Connects if a daemon listens at `path`; `None` when nothing is there.
    pub fn connect(path: &Path) -> Option<Self> {
        let s = UnixStream::connect(path).ok()?;
        let _ = s.set_read_timeout(Some(Duration::from_secs(600)));
        let writer = s.try_clone().ok()?;
        Some(Self {
            reader: BufReader::new(s),
            writer,
        })
    }

    /// The running daemon of this user (default config), if there is one.
    pub fn of_this_user() -> Option<Self> {
        let path = Settings::of_this_user().ok()?.socket_path().ok()?;
        Self::connect(&path)
    }

    pub fn send(&mut self, req: &Message) -> anyhow::Result<()> {
        let mut line = serde_json::to_vec(req)?;
        line.push(b'\n');
        self.writer
            .write_all(&line)
            .context("writing to the daemon")?;
        Ok(())
    }

    /// The next message; `None` at end of stream.
    pub fn recv(&mut self) -> anyhow::Result<Option<Value>> {
        let mut line = String::new();
        if self
            .reader
            .read_line(&mut line)
            .context("reading from the daemon")?
            == 0
        {
            return Ok(None);
        }
        let v: Value = serde_json::from_str(&line).context("the daemon sent invalid JSON")?;
        if v["event"] == "error" {
            bail!("daemon: {}", v["error"].as_str().unwrap_or("error"));
        }
        Ok(Some(v))
    }

    /// Sends a request and returns its one reply.
    pub fn call(&mut self, req: Message) -> anyhow::Result<Value> {
        if let Err(e) = self.send(&req) {
            // A daemon that refused the connection said why before closing it.
            self.recv()?;
            return Err(e);
        }
        self.recv()?.context("the daemon closed the connection")
    }

    /// The raw byte stream after an `accepted` reply of an `output: raw` request.
    pub fn into_raw(self) -> impl std::io::Read {
        self.reader
    }
}
