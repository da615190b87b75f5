//! `voxtrald sd-module`: a Speech Dispatcher output module. speech-dispatcher starts it (as
//! `sd_voxtrald`, which `voxtrald install --user` puts where modules are found) and talks the
//! module protocol over stdin/stdout. The speech comes from the running daemon over its
//! socket, so the model stays loaded and warm for Orca, Firefox, Qt and `spd-say` alike. The
//! audio goes back to speech-dispatcher, which plays it (server-side audio, speechd 0.11 and
//! later); a server that does not offer that gets the daemon's own output instead.

use std::collections::HashMap;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::Context;
use base64::Engine as _;

use super::socket::Client;
use crate::frontends::protocol::{Message, Output, Speak};
use crate::service::scales;
use crate::service::voices::{Gender, Voice};
use crate::text::punctuation;
use crate::text::ssml::{self, Mark};

/// How long `INIT` waits for a daemon that is still starting (e.g. by systemd).
const CONNECT_WAIT: Duration = Duration::from_secs(5);

/// What the module writes, and which utterance may still write: a `STOP` moves `current` on,
/// so the stopped utterance's thread writes nothing more.
struct Out {
    w: Box<dyn Write + Send>,
    current: u64,
    /// The current utterance still owes its end event.
    open: bool,
    /// The daemon's job for the current utterance, once accepted.
    job: Option<u64>,
}

impl Out {
    fn line(&mut self, s: &str) -> std::io::Result<()> {
        self.w.write_all(s.as_bytes())?;
        self.w.write_all(b"\n")?;
        self.w.flush()
    }

    fn mark(&mut self, name: &str) -> std::io::Result<()> {
        self.line(&format!("700-{name}\n700 INDEX MARK"))
    }

    fn marks(&mut self, marks: &[Mark]) -> std::io::Result<()> {
        marks.iter().try_for_each(|m| self.mark(&m.name))
    }

    /// One `705` block of 16-bit mono PCM, HDLC-escaped so that the data holds no newline.
    fn audio(&mut self, pcm: &[u8], rate: u32) -> std::io::Result<()> {
        let mut block = format!(
            "705-bits=16\n705-num_channels=1\n705-sample_rate={rate}\n705-num_samples={}\n\
             705-big_endian=0\n705-AUDIO\0",
            pcm.len() / 2
        )
        .into_bytes();
        block.reserve(pcm.len() + pcm.len() / 64 + 16);
        for &b in pcm {
            if b == b'\n' || b == 0x7d {
                block.extend([0x7d, b ^ 0x20]);
            } else {
                block.push(b);
            }
        }
        block.extend_from_slice(b"\n705 AUDIO\n");
        self.w.write_all(&block)?;
        self.w.flush()
    }
}

/// Speech Dispatcher's per-client settings, as `SET` sends them.
#[derive(Debug, Default, Clone)]
struct Settings {
    values: HashMap<String, String>,
}

impl Settings {
    fn get(&self, key: &str) -> Option<&str> {
        self.values
            .get(key)
            .map(String::as_str)
            .filter(|v| !v.is_empty() && *v != "NULL")
    }

    fn number(&self, key: &str) -> f32 {
        self.get(key)
            .and_then(|v| v.trim().parse::<f32>().ok())
            .unwrap_or(0.0)
            .clamp(-100.0, 100.0)
    }

    /// `rate` −100…100, relative to the daemon's configured rate.
    fn rate(&self) -> f32 {
        scales::ssip_rate(self.number("rate"))
    }

    /// `pitch` −100…100, relative to the daemon's configured pitch.
    fn pitch(&self) -> f32 {
        scales::ssip_pitch(self.number("pitch"))
    }

    /// The characters to say by name for `punctuation_mode` (none, some, most, all), from
    /// `punctuation_some` / `punctuation_most` where the client set them.
    fn punctuation(&self) -> Option<String> {
        let set = match self.get("punctuation_mode")? {
            "all" => punctuation::ALL,
            "most" => self.get("punctuation_most").unwrap_or(punctuation::MOST),
            "some" => self.get("punctuation_some").unwrap_or(punctuation::SOME),
            _ => return None,
        };
        Some(set.to_string())
    }

    /// `volume` −100…100 as a gain; applied by the daemon to the audio it hands over.
    fn gain(&self) -> f32 {
        match self.get("volume") {
            None => 1.0,
            Some(_) => scales::ssip_volume(self.number("volume")),
        }
    }

    /// The daemon voice for these settings: the synthesis voice if it is one of ours, else a
    /// voice of the language (and of the symbolic voice's gender where there is a choice),
    /// else none (the daemon's default).
    fn voice(&self, voices: &[Voice]) -> Option<String> {
        if let Some(v) = self.get("synthesis_voice") {
            if voices.iter().any(|voice| voice.id == v) {
                return Some(v.to_string());
            }
        }
        let lang = self.get("language")?.to_lowercase();
        let primary = lang.split(['-', '_']).next().unwrap_or("");
        let of_lang: Vec<&Voice> = voices.iter().filter(|v| v.language == primary).collect();
        let symbolic = self.get("voice").unwrap_or("").to_lowercase();
        let gender = if symbolic.contains("female") {
            Some(Gender::Female)
        } else if symbolic.contains("male") {
            Some(Gender::Male)
        } else {
            None
        };
        of_lang
            .iter()
            .find(|v| gender.is_some() && v.gender == gender)
            .or(of_lang.first())
            .map(|v| v.id.clone())
    }
}

struct Module {
    /// The daemon's socket, or why it could not be worked out.
    socket: Result<PathBuf, String>,
    out: Arc<Mutex<Out>>,
    control: Option<Client>,
    voices: Vec<Voice>,
    settings: Settings,
    server_audio: bool,
}

fn lock(out: &Mutex<Out>) -> MutexGuard<'_, Out> {
    out.lock().unwrap_or_else(|e| e.into_inner())
}

/// Runs the module protocol until `QUIT` or the end of `input`.
pub fn run(socket: anyhow::Result<PathBuf>) -> anyhow::Result<()> {
    let stdin = std::io::stdin();
    serve(stdin.lock(), Box::new(std::io::stdout()), socket)
}

fn serve(
    mut input: impl BufRead,
    output: Box<dyn Write + Send>,
    socket: anyhow::Result<PathBuf>,
) -> anyhow::Result<()> {
    let out = Arc::new(Mutex::new(Out {
        w: output,
        current: 0,
        open: false,
        job: None,
    }));
    let mut m = Module {
        socket: socket.map_err(|e| format!("{e:#}")),
        out,
        control: None,
        voices: Vec::new(),
        settings: Settings::default(),
        server_audio: false,
    };
    loop {
        let Some(line) = read_line(&mut input).context("reading from speech-dispatcher")? else {
            m.stop(None);
            return Ok(());
        };
        let cmd = line.trim_end_matches(['\n', '\r']);
        tracing::debug!(cmd, "speech-dispatcher");
        match cmd {
            "INIT" => {
                if let Err(e) = m.init() {
                    let msg = format!("{e:#}").replace('\n', " ");
                    lock(&m.out).line(&format!("399-{msg}\n399 ERR CANT INIT MODULE"))?;
                    return Err(e);
                }
            }
            "SPEAK" | "CHAR" | "KEY" | "SOUND_ICON" => {
                let mut o = lock(&m.out);
                o.line("202 OK RECEIVING MESSAGE")?;
                let data = read_block(&mut input)?;
                o.line("200 OK SPEAKING")?;
                drop(o);
                m.speak(cmd, &data.join("\n"))?;
            }
            "STOP" => m.stop(Some("703 STOP")),
            "PAUSE" => m.stop(Some("704 PAUSE")),
            "SET" => {
                let mut o = lock(&m.out);
                o.line("203 OK RECEIVING SETTINGS")?;
                for kv in read_block(&mut input)? {
                    if let Some((k, v)) = kv.split_once('=') {
                        m.settings.values.insert(k.to_string(), v.to_string());
                    }
                }
                o.line("203 OK SETTINGS RECEIVED")?;
            }
            "AUDIO" => {
                let mut o = lock(&m.out);
                o.line("207 OK RECEIVING AUDIO SETTINGS")?;
                let block = read_block(&mut input)?;
                m.server_audio = block.iter().any(|kv| kv == "audio_output_method=server");
                if !m.server_audio {
                    tracing::info!("no server-side audio offered; the daemon plays the speech");
                }
                o.line("203 OK AUDIO INITIALIZED")?;
            }
            "LOGLEVEL" => {
                let mut o = lock(&m.out);
                o.line("207 OK RECEIVING LOGLEVEL SETTINGS")?;
                read_block(&mut input)?;
                o.line("203 OK LOGLEVEL SET")?;
            }
            "QUIT" => {
                m.stop(None);
                lock(&m.out).line("210 OK QUIT")?;
                return Ok(());
            }
            _ if cmd.starts_with("LIST VOICES") => {
                let mut o = lock(&m.out);
                if m.voices.is_empty() {
                    o.line("304 CANT LIST VOICES")?;
                } else {
                    for v in &m.voices {
                        o.line(&format!("200-{}\t{}\tnone", v.id, v.language))?;
                    }
                    o.line("200 OK VOICE LIST SENT")?;
                }
            }
            _ if cmd.starts_with("DEBUG") => {
                let on = !cmd.ends_with("OFF");
                let reply = if on {
                    "200 OK DEBUGGING ON"
                } else {
                    "200 OK DEBUGGING OFF"
                };
                lock(&m.out).line(reply)?;
            }
            _ => lock(&m.out).line("300 ERR UNKNOWN COMMAND")?,
        }
    }
}

/// One line, `None` at the end of input. Bytes that are not UTF-8 become U+FFFD: a garbled
/// line is answered as an unknown command, it does not end the module.
fn read_line(input: &mut impl BufRead) -> std::io::Result<Option<String>> {
    let mut raw = Vec::new();
    if input.read_until(b'\n', &mut raw)? == 0 {
        return Ok(None);
    }
    Ok(Some(match String::from_utf8(raw) {
        Ok(s) => s,
        Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
    }))
}

/// Lines up to a lone `.`, with the leading dot of `..` lines removed.
fn read_block(input: &mut impl BufRead) -> anyhow::Result<Vec<String>> {
    let mut lines = Vec::new();
    loop {
        let Some(line) = read_line(input)? else {
            anyhow::bail!("speech-dispatcher closed the pipe inside a block");
        };
        let line = line.trim_end_matches(['\n', '\r']);
        if line == "." {
            return Ok(lines);
        }
        lines.push(
            line.strip_prefix('.')
                .filter(|_| line.starts_with(".."))
                .unwrap_or(line)
                .to_string(),
        );
    }
}

impl Module {
    fn socket(&self) -> anyhow::Result<&Path> {
        self.socket
            .as_deref()
            .map_err(|e| anyhow::anyhow!("cannot find the daemon's socket: {e}"))
    }

    fn init(&mut self) -> anyhow::Result<()> {
        let start = Instant::now();
        let socket = self.socket()?.to_path_buf();
        let mut c = loop {
            if let Some(c) = Client::connect(&socket) {
                break c;
            }
            if start.elapsed() > CONNECT_WAIT {
                anyhow::bail!(
                    "no voxtrald daemon at {}: start it with `systemctl --user start voxtrald` \
                     or `voxtrald serve`",
                    socket.display()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        let v = c.call(Message::Voices)?;
        self.voices = serde_json::from_value(v["voices"].clone())
            .context("the daemon sent a voice list this module cannot read")?;
        let n = self.voices.len();
        self.control = Some(c);
        lock(&self.out).line(&format!(
            "299-voxtrald: {n} voices from the daemon at {}\n299 OK LOADED SUCCESSFULLY",
            socket.display()
        ))?;
        Ok(())
    }

    /// Ends the current utterance at once: no more of its audio or events are written, its
    /// daemon job is cancelled, and `event` (if any) tells speech-dispatcher.
    fn stop(&mut self, event: Option<&str>) {
        let job = {
            let mut o = lock(&self.out);
            o.current += 1;
            if o.open {
                o.open = false;
                if let Some(ev) = event {
                    let _ = o.line(ev);
                }
            }
            o.job.take()
        };
        if let Some(job) = job {
            self.cancel(job);
        }
    }

    fn cancel(&mut self, job: u64) {
        let req = Message::Cancel { job };
        let done = self
            .control
            .as_mut()
            .is_some_and(|c| c.call(req.clone()).is_ok());
        if !done {
            // The daemon restarted or the connection broke: one more try on a fresh one.
            self.control = self.socket().ok().and_then(Client::connect);
            if let Some(c) = self.control.as_mut() {
                let _ = c.call(req);
            }
        }
    }

    fn speak(&mut self, kind: &str, data: &str) -> anyhow::Result<()> {
        // A new message replaces one still speaking (the server normally stops it first).
        self.stop(Some("703 STOP"));
        // SSML goes to the daemon as it is: the daemon reports each mark where it is spoken.
        let (text, ssml) = match kind {
            // Spelling mode reads letter by letter, as `say-as characters` does.
            "SPEAK" if self.settings.get("spelling_mode") == Some("on") => (
                format!("<say-as interpret-as=\"characters\">{data}</say-as>"),
                true,
            ),
            "SPEAK" => (data.to_string(), true),
            // A character or a key name such as `shift_a`; `space` reads as the word.
            "CHAR" | "KEY" => (data.replace('_', " "), false),
            // No sound icons: an empty message that begins and ends.
            _ => (String::new(), false),
        };
        // Nothing to say (maybe marks only): answered here, without the daemon.
        let (blank, marks) = if ssml {
            let (plain, marks) = ssml::to_text(&text);
            (plain.trim().is_empty(), marks)
        } else {
            (text.trim().is_empty(), Vec::new())
        };
        let n = {
            let mut o = lock(&self.out);
            o.open = true;
            o.current
        };
        if blank {
            let mut o = lock(&self.out);
            o.line("701 BEGIN")?;
            o.marks(&marks)?;
            o.line("702 END")?;
            o.open = false;
            return Ok(());
        }
        let output = if self.server_audio {
            Output::Stream
        } else {
            Output::Play
        };
        let req = Message::Speak(Speak {
            text,
            ssml,
            output,
            voice: self.settings.voice(&self.voices),
            punctuation: self.settings.punctuation(),
            relative_rate: Some(self.settings.rate()),
            relative_pitch: Some(self.settings.pitch()),
            volume: Some(self.settings.gain()),
            ..Speak::default()
        });
        let utterance = Utterance {
            n,
            out: self.out.clone(),
            sample_rate: None,
            begun: false,
        };
        let socket = self.socket()?.to_path_buf();
        std::thread::spawn(move || utterance.run(&socket, req));
        Ok(())
    }
}

/// One message being spoken, on its own connection to the daemon.
struct Utterance {
    n: u64,
    out: Arc<Mutex<Out>>,
    /// From the daemon's `accepted` line.
    sample_rate: Option<u32>,
    begun: bool,
}

impl Utterance {
    fn run(mut self, socket: &Path, req: Message) {
        let outcome = self.relay(socket, req);
        let mut o = lock(&self.out);
        if o.current != self.n || !o.open {
            return;
        }
        if let Err(e) = &outcome {
            tracing::warn!(error = %format!("{e:#}"), "speaking failed");
        }
        // Ended (or failed): speech-dispatcher still hears the message begin and end.
        if !self.begun {
            let _ = o.line("701 BEGIN");
        }
        let _ = o.line("702 END");
        o.open = false;
        o.job = None;
    }

    /// Moves the daemon's events to speech-dispatcher until the job ends or is stopped.
    fn relay(&mut self, socket: &Path, req: Message) -> anyhow::Result<()> {
        let mut c = Client::connect(socket).context("no voxtrald daemon is running")?;
        c.send(&req)?;
        while let Some(ev) = c.recv()? {
            let mut o = lock(&self.out);
            if o.current != self.n {
                // Stopped: dropping the connection also cancels the job.
                return Ok(());
            }
            match ev["event"].as_str().unwrap_or("") {
                "accepted" => {
                    o.job = ev["job"].as_u64();
                    self.sample_rate = ev["sample_rate"].as_u64().map(|r| r as u32);
                }
                "started" => {
                    o.line("701 BEGIN")?;
                    self.begun = true;
                }
                // In its place among the audio blocks: the server reports it as playback
                // reaches it.
                "mark" => o.mark(ev["name"].as_str().unwrap_or(""))?,
                "audio" => {
                    let pcm = base64::engine::general_purpose::STANDARD
                        .decode(ev["pcm"].as_str().unwrap_or(""))
                        .context("the daemon sent bad audio")?;
                    let rate = self
                        .sample_rate
                        .context("the daemon sent audio without its sample rate")?;
                    o.audio(&pcm, rate)?;
                }
                "finished" => return Ok(()),
                "failed" | "cancelled" => {
                    anyhow::bail!("{}", ev["reason"].as_str().unwrap_or("the job ended early"))
                }
                _ => {}
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(kv: &[(&str, &str)]) -> Settings {
        Settings {
            values: kv
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    #[test]
    fn blocks_end_at_a_lone_dot_and_unescape_leading_dots() {
        let mut input = std::io::Cursor::new("one\n..two\n.\nrest\n");
        assert_eq!(read_block(&mut input).unwrap(), ["one", ".two"]);
        let mut cut = std::io::Cursor::new("one\n");
        assert!(read_block(&mut cut).is_err());
        let mut garbled = std::io::Cursor::new(b"o\xffne\n.\n".to_vec());
        assert_eq!(read_block(&mut garbled).unwrap(), ["o\u{fffd}ne"]);
    }

    #[test]
    fn speechd_settings_map_to_the_daemons() {
        let voices: Vec<Voice> = [
            ("casual_female", "en"),
            ("casual_male", "en"),
            ("fr_male", "fr"),
            ("fr_female", "fr"),
        ]
        .iter()
        .map(|(a, b)| Voice::preset(a, b))
        .collect();
        let s = settings(&[("language", "fr-FR"), ("voice", "FEMALE1")]);
        assert_eq!(s.voice(&voices).as_deref(), Some("fr_female"));
        let s = settings(&[("language", "fr"), ("voice", "MALE2")]);
        assert_eq!(s.voice(&voices).as_deref(), Some("fr_male"));
        let s = settings(&[("language", "en"), ("synthesis_voice", "fr_male")]);
        assert_eq!(s.voice(&voices).as_deref(), Some("fr_male"));
        let s = settings(&[("language", "ja"), ("synthesis_voice", "NULL")]);
        assert_eq!(s.voice(&voices), None);
        let s = settings(&[("rate", "-100"), ("pitch", "100")]);
        assert_eq!((s.rate(), s.pitch()), (0.25, 2.0));
        let s = settings(&[("rate", "100"), ("pitch", "-100")]);
        assert_eq!((s.rate(), s.pitch()), (4.0, 0.5));
        let s = settings(&[("rate", "0"), ("pitch", "junk")]);
        assert_eq!((s.rate(), s.pitch(), s.gain()), (1.0, 1.0, 1.0));
        let s = settings(&[("volume", "0")]);
        assert_eq!(s.gain(), 0.5);
        assert_eq!(settings(&[("volume", "-100")]).gain(), 0.0);
        assert_eq!(
            settings(&[("punctuation_mode", "none")]).punctuation(),
            None
        );
        assert_eq!(settings(&[]).punctuation(), None);
        assert_eq!(
            settings(&[("punctuation_mode", "all")])
                .punctuation()
                .as_deref(),
            Some(punctuation::ALL)
        );
        let s = settings(&[("punctuation_mode", "some"), ("punctuation_some", "@#")]);
        assert_eq!(s.punctuation().as_deref(), Some("@#"));
    }
}
