//! The user's pronunciations: words the model says wrong, written as they should sound
//! (`"nginx" = "engine x"` under `[lexicon]` in the config). Only what the model reads changes;
//! sentence offsets still point into the text as sent.

use std::borrow::Cow;

use fancy_regex::{Captures, Regex};

use crate::error::{Error, Result};

#[derive(Debug)]
pub struct Lexicon {
    /// Every written form, longest first, as whole words, ignoring case.
    pattern: Regex,
    /// Lowercased written form → spoken form.
    spoken: std::collections::HashMap<String, String>,
}

impl Lexicon {
    /// `None` for no entries. A written form must not be blank.
    pub fn new<'a>(entries: impl IntoIterator<Item = (&'a str, &'a str)>) -> Result<Option<Self>> {
        let mut spoken = std::collections::HashMap::new();
        for (written, said) in entries {
            let key = written.trim();
            if key.is_empty() {
                return Err(Error::InvalidInput(
                    "a lexicon entry has a blank written form".into(),
                ));
            }
            spoken.insert(key.to_lowercase(), said.to_string());
        }
        if spoken.is_empty() {
            return Ok(None);
        }
        let mut keys: Vec<&String> = spoken.keys().collect();
        keys.sort_by_key(|k| std::cmp::Reverse(k.chars().count()));
        let alternatives: Vec<String> =
            keys.iter().map(|k| fancy_regex::escape(k).into()).collect();
        // Not inside a longer word on either side.
        let pattern = Regex::new(&format!(r"(?i)(?<!\w)(?:{})(?!\w)", alternatives.join("|")))
            .map_err(|e| Error::InvalidInput(format!("lexicon: {e}")))?;
        Ok(Some(Self { pattern, spoken }))
    }

    /// `text` with every listed word replaced by how it is said.
    pub fn apply<'t>(&self, text: &'t str) -> Cow<'t, str> {
        self.pattern.replace_all(text, |c: &Captures| {
            let m = c.get(0).map_or("", |m| m.as_str());
            self.spoken
                .get(&m.to_lowercase())
                .cloned()
                .unwrap_or_else(|| m.to_string())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whole_words_any_case_longest_first() {
        let lex = Lexicon::new([
            ("nginx", "engine x"),
            ("C++", "C plus plus"),
            ("SQL", "sequel"),
            ("SQLite", "S Q lite"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!(
            lex.apply("NGINX and sqlite, not nginxes; C++ or SQL."),
            "engine x and S Q lite, not nginxes; C plus plus or sequel."
        );
        assert!(matches!(lex.apply("nothing here"), Cow::Borrowed(_)));
        assert!(Lexicon::new([]).unwrap().is_none());
        assert!(Lexicon::new([(" ", "x")]).is_err());
    }
}
