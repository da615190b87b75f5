//! SSML to plain text, keeping where its `<mark/>`s fall: the model reads plain text, and Speech
//! Dispatcher clients (Orca's say-all) follow the speech by the marks they put before words.

/// A `<mark name="…"/>` and the character offset in the plain text where it stood.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mark {
    pub name: String,
    pub offset: usize,
}

/// Plain text of an SSML document: tags become a space (one between words is enough), the
/// XML entities are decoded, and marks are kept with their offsets (in characters). What the
/// model cannot read as written is rewritten: `<sub alias="…">` speaks its alias, and
/// `<say-as interpret-as="characters">` (or `spell-out`) spaces the letters out.
pub fn to_text(ssml: &str) -> (String, Vec<Mark>) {
    let mut t = Text::default();
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
    (t.out, t.marks)
}

/// The plain text being built, counted in characters for the marks.
#[derive(Default)]
struct Text {
    out: String,
    chars: usize,
    marks: Vec<Mark>,
}

impl Text {
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
}
