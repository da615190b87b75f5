//! SSML to plain text, keeping what the markup says about it: where its `<mark/>`s fall (Speech
//! Dispatcher clients and Orca's say-all follow the speech by the marks they put before words),
//! the silences of `<break/>`, and the spans of `<prosody>`. The model reads plain text; the
//! engine applies the rest.

/// A `<mark name="…"/>` and the character offset in the plain text where it stood.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mark {
    pub name: String,
    pub offset: usize,
}

/// A `<break/>`: this much silence at this character offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Break {
    pub offset: usize,
    pub millis: u32,
}

/// A `<prosody>` span (nested ones already multiplied out): factors on the request's rate,
/// pitch and volume for the characters in `range`.
#[derive(Debug, Clone, PartialEq)]
pub struct Span {
    pub range: std::ops::Range<usize>,
    pub rate: f32,
    pub pitch: f32,
    pub volume: f32,
}

/// What an SSML document says beyond its text, in character offsets of that text.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Markup {
    pub marks: Vec<Mark>,
    pub breaks: Vec<Break>,
    /// Only the spans whose factors are not all 1, in text order, not overlapping.
    pub spans: Vec<Span>,
}

impl Markup {
    pub fn is_empty(&self) -> bool {
        self.marks.is_empty() && self.breaks.is_empty() && self.spans.is_empty()
    }

    /// Offsets where speech must be cut into separate pieces: each break, and each end of a
    /// prosody span.
    pub fn cuts(&self) -> Vec<usize> {
        let mut cuts: Vec<usize> = self.breaks.iter().map(|b| b.offset).collect();
        cuts.extend(self.spans.iter().flat_map(|s| [s.range.start, s.range.end]));
        cuts.sort_unstable();
        cuts.dedup();
        cuts
    }

    /// The prosody factors (rate, pitch, volume) at character `at`.
    pub fn prosody_at(&self, at: usize) -> (f32, f32, f32) {
        self.spans
            .iter()
            .find(|s| s.range.contains(&at))
            .map_or((1.0, 1.0, 1.0), |s| (s.rate, s.pitch, s.volume))
    }
}

/// The longest `<break/>` honoured; longer ones are cut to this.
pub const MAX_BREAK_MS: u32 = 10_000;

/// Plain text of an SSML document and what its markup says (see [`to_text`] for the text).
pub fn parse(ssml: &str) -> (String, Markup) {
    let mut t = Text::default();
    walk(ssml, &mut t);
    t.close_span();
    let markup = Markup {
        marks: t.marks,
        breaks: t.breaks,
        spans: t.spans,
    };
    (t.out, markup)
}

/// Plain text of an SSML document: tags become a space (one between words is enough), the
/// XML entities are decoded, and marks are kept with their offsets (in characters). What the
/// model cannot read as written is rewritten: `<sub alias="…">` speaks its alias, and
/// `<say-as interpret-as="characters">` (or `spell-out`) spaces the letters out.
pub fn to_text(ssml: &str) -> (String, Vec<Mark>) {
    let (text, markup) = parse(ssml);
    (text, markup.marks)
}

fn walk(ssml: &str, t: &mut Text) {
    let mut spelling = false;
    let mut rest = ssml;
    while let Some(c) = rest.chars().next() {
        match c {
            '<' => {
                let end = rest.find('>').map_or(rest.len(), |i| i + 1);
                let tag = &rest[..end];
                rest = &rest[end..];
                t.space();
                match tag_name(tag) {
                    "mark" => {
                        if let Some(name) = attribute(tag, "name") {
                            t.marks.push(Mark {
                                name,
                                offset: t.chars,
                            });
                        }
                    }
                    "sub" => {
                        if let Some(alias) = attribute(tag, "alias") {
                            // The alias replaces the content, up to the closing tag.
                            let close = rest.find("</sub").unwrap_or(rest.len());
                            rest = &rest[close..];
                            alias.chars().for_each(|c| t.push(c));
                        }
                    }
                    "say-as" => {
                        spelling = matches!(
                            attribute(tag, "interpret-as").as_deref(),
                            Some("characters" | "spell-out")
                        );
                    }
                    "/say-as" => spelling = false,
                    "break" => {
                        let millis = break_millis(tag);
                        if millis > 0 {
                            t.breaks.push(Break {
                                offset: t.chars,
                                millis,
                            });
                        }
                    }
                    "prosody" => {
                        let top = t.prosody.last().copied().unwrap_or((1.0, 1.0, 1.0));
                        let factor = |name, scale: fn(&str) -> Option<f32>| {
                            attribute(tag, name)
                                .and_then(|v| scale(v.trim()))
                                .unwrap_or(1.0)
                        };
                        let next = (
                            top.0 * factor("rate", rate_factor),
                            top.1 * factor("pitch", pitch_factor),
                            top.2 * factor("volume", volume_factor),
                        );
                        // A self-closing `<prosody/>` holds nothing.
                        if !tag.ends_with("/>") {
                            t.close_span();
                            t.prosody.push(next);
                        }
                    }
                    "/prosody" => {
                        t.close_span();
                        t.prosody.pop();
                    }
                    _ => {}
                }
            }
            _ => {
                let (c, used) = if c == '&' {
                    entity(rest).unwrap_or(('&', 1))
                } else {
                    (c, c.len_utf8())
                };
                rest = &rest[used..];
                if spelling && !c.is_whitespace() {
                    t.space();
                }
                t.push(c);
            }
        }
    }
}

/// The plain text being built, counted in characters for the marks.
#[derive(Default)]
struct Text {
    out: String,
    chars: usize,
    marks: Vec<Mark>,
    breaks: Vec<Break>,
    spans: Vec<Span>,
    /// Open `<prosody>` elements, each with its factors multiplied by the enclosing ones.
    prosody: Vec<(f32, f32, f32)>,
    /// Where the innermost open prosody's current stretch began.
    span_start: usize,
}

impl Text {
    /// Ends the stretch of text under the innermost prosody; the next one starts here.
    fn close_span(&mut self) {
        if let Some(&(rate, pitch, volume)) = self.prosody.last() {
            let default = rate == 1.0 && pitch == 1.0 && volume == 1.0;
            if self.chars > self.span_start && !default {
                self.spans.push(Span {
                    range: self.span_start..self.chars,
                    rate,
                    pitch,
                    volume,
                });
            }
        }
        self.span_start = self.chars;
    }

    fn push(&mut self, c: char) {
        self.out.push(c);
        self.chars += 1;
    }

    /// A word boundary, unless there is one already.
    fn space(&mut self) {
        if !self.out.is_empty() && !self.out.ends_with(char::is_whitespace) {
            self.push(' ');
        }
    }
}

/// `mark` for `<mark …>`, `/say-as` for `</say-as>`.
fn tag_name(tag: &str) -> &str {
    let body = tag.trim_start_matches('<');
    let end = body
        .find(|c: char| c.is_whitespace() || c == '>' || (c == '/' && !body.starts_with('/')))
        .unwrap_or(body.len());
    &body[..end]
}

/// The value of attribute `name` in a tag, entities decoded.
fn attribute(tag: &str, name: &str) -> Option<String> {
    let mut from = 0;
    while let Some(i) = tag[from..].find(name) {
        let at = from + i;
        from = at + name.len();
        // A whole attribute name, not the end of another one.
        if !tag[..at].ends_with(char::is_whitespace) {
            continue;
        }
        let Some(after) = tag[from..].trim_start().strip_prefix('=') else {
            continue;
        };
        let after = after.trim_start();
        let quote = after.chars().next().filter(|q| *q == '"' || *q == '\'')?;
        let value = &after[1..];
        let end = value.find(quote)?;
        return Some(to_text(&value[..end]).0);
    }
    None
}

/// A `<break>`'s length: `time` ("500ms", "1.5s") wins over `strength`; a bare `<break/>` is a
/// medium pause. The strengths follow the common engines' lengths (none 0, x-weak 100 ms, weak
/// 250, medium 500, strong 1000, x-strong 1500).
fn break_millis(tag: &str) -> u32 {
    if let Some(time) = attribute(tag, "time") {
        let time = time.trim();
        let ms = if let Some(v) = time.strip_suffix("ms") {
            v.trim().parse::<f64>().ok()
        } else if let Some(v) = time.strip_suffix('s') {
            v.trim().parse::<f64>().ok().map(|s| s * 1000.0)
        } else {
            None
        };
        if let Some(ms) = ms.filter(|m| m.is_finite() && *m >= 0.0) {
            return ms.min(MAX_BREAK_MS as f64).round() as u32;
        }
    }
    match attribute(tag, "strength").as_deref().map(str::trim) {
        Some("none") => 0,
        Some("x-weak") => 100,
        Some("weak") => 250,
        Some("strong") => 1000,
        Some("x-strong") => 1500,
        _ => 500,
    }
}

/// A relative or absolute percentage: "150%" is 1.5, "+20%" and "-20%" change by that much.
fn percent(v: &str) -> Option<f32> {
    let n = v.strip_suffix('%')?.trim();
    let x: f32 = n.parse().ok()?;
    let f = if n.starts_with(['+', '-']) {
        1.0 + x / 100.0
    } else {
        x / 100.0
    };
    (f.is_finite() && f >= 0.0).then_some(f)
}

/// `<prosody rate>`: the named steps, a percentage, or a bare multiplier.
fn rate_factor(v: &str) -> Option<f32> {
    match v {
        "x-slow" => Some(0.5),
        "slow" => Some(0.75),
        "medium" | "default" => Some(1.0),
        "fast" => Some(1.25),
        "x-fast" => Some(1.75),
        _ => percent(v).or_else(|| v.parse::<f32>().ok().filter(|f| f.is_finite() && *f > 0.0)),
    }
}

/// `<prosody pitch>`: the named steps, a percentage, or semitones ("+2st"). Absolute hertz
/// cannot apply to a voice of unknown pitch and is ignored.
fn pitch_factor(v: &str) -> Option<f32> {
    match v {
        "x-low" => Some(0.75),
        "low" => Some(0.87),
        "medium" | "default" => Some(1.0),
        "high" => Some(1.15),
        "x-high" => Some(1.33),
        _ => percent(v).or_else(|| {
            let st: f32 = v.strip_suffix("st")?.trim().parse().ok()?;
            Some(2f32.powf(st / 12.0)).filter(|f| f.is_finite())
        }),
    }
}

/// `<prosody volume>` as a gain: the named steps, a percentage, or decibels ("-6dB"). The
/// request's volume is the loudest there is, so "loud" keeps it.
fn volume_factor(v: &str) -> Option<f32> {
    match v {
        "silent" => Some(0.0),
        "x-soft" => Some(0.25),
        "soft" => Some(0.5),
        "medium" => Some(0.75),
        "loud" | "x-loud" | "default" => Some(1.0),
        _ => percent(v).or_else(|| {
            let db: f32 = v.strip_suffix("dB")?.trim().parse().ok()?;
            Some(10f32.powf(db / 20.0)).filter(|f| f.is_finite())
        }),
    }
    .map(|f| f.min(1.0))
}

/// Decodes the entity at the start of `s`: the five XML ones and numeric references.
fn entity(s: &str) -> Option<(char, usize)> {
    let end = s.get(..12).unwrap_or(s).find(';')?;
    let name = &s[1..end];
    let c = match name {
        "lt" => '<',
        "gt" => '>',
        "amp" => '&',
        "quot" => '"',
        "apos" => '\'',
        _ => {
            let n = name.strip_prefix('#')?;
            let code = match n.strip_prefix(['x', 'X']) {
                Some(hex) => u32::from_str_radix(hex, 16).ok()?,
                None => n.parse().ok()?,
            };
            char::from_u32(code)?
        }
    };
    Some((c, end + 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn orca_style_marks_keep_their_offsets() {
        let (text, marks) = to_text(
            r#"<speak><mark name="0:5"/>Hello <mark name="6:11"/>world &amp; more.</speak>"#,
        );
        assert_eq!(text.trim(), "Hello world & more.");
        let words: Vec<String> = marks
            .iter()
            .map(|m| {
                let rest: String = text.chars().skip(m.offset).collect();
                rest.split_whitespace().next().unwrap_or("").to_string()
            })
            .collect();
        assert_eq!(marks[0].name, "0:5");
        assert_eq!(marks[1].name, "6:11");
        assert_eq!(words, ["Hello", "world"]);
    }

    #[test]
    fn sub_and_say_as_characters_are_spoken_as_meant() {
        let (text, marks) = to_text(
            r#"<speak><sub alias="World Wide Web">WWW</sub> and <say-as interpret-as="characters">NVDA</say-as><mark name="m"/> done</speak>"#,
        );
        assert_eq!(
            text.split_whitespace().collect::<Vec<_>>().join(" "),
            "World Wide Web and N V D A done"
        );
        let after: String = text.chars().skip(marks[0].offset).collect();
        assert_eq!(after.trim(), "done");
        assert_eq!(
            to_text("<say-as interpret-as='date'>1/2</say-as>").0.trim(),
            "1/2"
        );
    }

    #[test]
    fn entities_and_odd_input() {
        assert_eq!(
            to_text("a &lt;b&gt; &#233;t&#xE9; &bogus; &").0,
            "a <b> été &bogus; &"
        );
        assert_eq!(to_text("<p>one</p><p>two</p>").0, "one two ");
        assert_eq!(to_text("<unclosed").0, "");
        assert!(to_text("<marker name='x'/>a").1.is_empty());
        assert_eq!(to_text("<mark name='it''s'/>").1[0].name, "it");
    }

    #[test]
    fn breaks_take_their_time_or_strength() {
        let (text, m) = parse(
            r#"one<break time="300ms"/>two<break time="1.5s"/>three<break strength="weak"/>four<break/>five<break time="99s"/>six<break strength="none"/>"#,
        );
        // Each break stands where the next word starts.
        let after = |b: &Break| {
            text.chars()
                .skip(b.offset)
                .take_while(|c| c.is_alphabetic())
                .collect::<String>()
        };
        let got: Vec<(String, u32)> = m.breaks.iter().map(|b| (after(b), b.millis)).collect();
        let want = [
            ("two", 300),
            ("three", 1500),
            ("four", 250),
            ("five", 500),
            ("six", MAX_BREAK_MS),
        ];
        assert_eq!(got, want.map(|(w, ms)| (w.to_string(), ms)));
    }

    #[test]
    fn prosody_spans_nest_and_multiply() {
        let (text, m) = parse(
            r#"a <prosody rate="slow">b <prosody pitch="+12st" volume="-6dB">c</prosody> d</prosody> e <prosody rate="150%" pitch="200Hz">f</prosody>"#,
        );
        let spoken = |s: &Span| {
            text.chars()
                .skip(s.range.start)
                .take(s.range.len())
                .collect::<String>()
        };
        assert_eq!(m.spans.len(), 4, "{:?}", m.spans);
        assert_eq!(spoken(&m.spans[0]).trim(), "b");
        assert_eq!(
            (m.spans[0].rate, m.spans[0].pitch, m.spans[0].volume),
            (0.75, 1.0, 1.0)
        );
        assert_eq!(spoken(&m.spans[1]).trim(), "c");
        assert_eq!(m.spans[1].rate, 0.75);
        assert!((m.spans[1].pitch - 2.0).abs() < 1e-5);
        assert!((m.spans[1].volume - 0.501).abs() < 1e-3);
        assert_eq!(spoken(&m.spans[2]).trim(), "d");
        assert_eq!(spoken(&m.spans[3]).trim(), "f");
        assert_eq!((m.spans[3].rate, m.spans[3].pitch), (1.5, 1.0));
        assert_eq!(m.prosody_at(0), (1.0, 1.0, 1.0));
        let cuts = m.cuts();
        assert!(cuts.windows(2).all(|w| w[0] < w[1]));
        assert!(cuts.contains(&m.spans[1].range.start));
        // Unclosed or junk prosody never panics and never gives a negative factor.
        for junk in [
            "<prosody rate='-500%'>x",
            "<prosody volume='+99dB'>y</prosody></prosody>",
            "</prosody>z",
        ] {
            let (_, m) = parse(junk);
            assert!(m.spans.iter().all(|s| s.rate > 0.0 && s.volume <= 1.0));
        }
    }
}
