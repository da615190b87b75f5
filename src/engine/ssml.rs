//! SSML to plain text, keeping where its `<mark/>`s fall: the model reads plain text, and Speech
//! Dispatcher clients (Orca's say-all) follow the speech by the marks they put before words.

/// A `<mark name="…"/>` and the character offset in the plain text where it stood.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mark {
    pub name: String,
    pub offset: usize,
}

/// Plain text of an SSML document: tags become a space (one between words is enough), the
/// XML entities are decoded, and marks are kept with their offsets (in characters).
pub fn to_text(ssml: &str) -> (String, Vec<Mark>) {
    let mut out = String::with_capacity(ssml.len());
    let mut chars = 0usize;
    let mut marks = Vec::new();
    let mut rest = ssml;
    while let Some(c) = rest.chars().next() {
        match c {
            '<' => {
                let end = rest.find('>').map_or(rest.len(), |i| i + 1);
                let tag = &rest[..end];
                if let Some(name) = mark_name(tag) {
                    marks.push(Mark {
                        name,
                        offset: chars,
                    });
                }
                if !out.is_empty() && !out.ends_with(char::is_whitespace) {
                    out.push(' ');
                    chars += 1;
                }
                rest = &rest[end..];
            }
            '&' => {
                let (decoded, used) = entity(rest).unwrap_or(('&', 1));
                out.push(decoded);
                chars += 1;
                rest = &rest[used..];
            }
            _ => {
                out.push(c);
                chars += 1;
                rest = &rest[c.len_utf8()..];
            }
        }
    }
    (out, marks)
}

/// The `name` of a `<mark …>` tag.
fn mark_name(tag: &str) -> Option<String> {
    let body = tag.strip_prefix("<mark")?;
    if !body.starts_with(|c: char| c.is_whitespace() || c == '/' || c == '>') {
        return None;
    }
    let at = body.find("name")?;
    let after = body[at + 4..].trim_start().strip_prefix('=')?.trim_start();
    let quote = after.chars().next().filter(|q| *q == '"' || *q == '\'')?;
    let value = &after[1..];
    let end = value.find(quote)?;
    Some(to_text(&value[..end]).0)
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
