//! Punctuation said by name, for screen-reader users who ask for it (Speech Dispatcher's
//! punctuation modes): each character of a chosen set becomes its name in the voice's
//! language in what the model reads. Like the lexicon, only what the model reads changes; the
//! offsets reported to clients still point into the text as sent.

use std::borrow::Cow;

/// The characters Speech Dispatcher's `some` mode names when the client sets none.
pub const SOME: &str = "#$%&*+/<=>@\\^_|~";
/// `most`: every ASCII punctuation mark but those that shape a sentence.
pub const MOST: &str = "\"#$%&()*+/<=>@[\\]^_`{|}~";
/// `all`: every ASCII punctuation mark.
pub const ALL: &str = "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~";

/// Names, per language (ISO 639-1); English for languages without a table.
fn name(c: char, language: &str) -> Option<&'static str> {
    let en = match c {
        '!' => "exclamation mark",
        '"' => "quote",
        '#' => "hash",
        '$' => "dollar",
        '%' => "percent",
        '&' => "and",
        '\'' => "apostrophe",
        '(' => "left paren",
        ')' => "right paren",
        '*' => "star",
        '+' => "plus",
        ',' => "comma",
        '-' => "dash",
        '.' => "dot",
        '/' => "slash",
        ':' => "colon",
        ';' => "semicolon",
        '<' => "less than",
        '=' => "equals",
        '>' => "greater than",
        '?' => "question mark",
        '@' => "at",
        '[' => "left bracket",
        '\\' => "backslash",
        ']' => "right bracket",
        '^' => "caret",
        '_' => "underscore",
        '`' => "backtick",
        '{' => "left brace",
        '|' => "bar",
        '}' => "right brace",
        '~' => "tilde",
        _ => return None,
    };
    let local = match language {
        "fr" => match c {
            '!' => "point d'exclamation",
            '"' => "guillemet",
            '#' => "dièse",
            '%' => "pour cent",
            '&' => "et",
            '\'' => "apostrophe",
            '(' => "parenthèse ouvrante",
            ')' => "parenthèse fermante",
            '*' => "étoile",
            '+' => "plus",
            ',' => "virgule",
            '-' => "tiret",
            '.' => "point",
            '/' => "barre oblique",
            ':' => "deux-points",
            ';' => "point-virgule",
            '<' => "inférieur à",
            '=' => "égal",
            '>' => "supérieur à",
            '?' => "point d'interrogation",
            '@' => "arobase",
            '_' => "souligné",
            _ => en,
        },
        "de" => match c {
            '!' => "Ausrufezeichen",
            '"' => "Anführungszeichen",
            '#' => "Raute",
            '%' => "Prozent",
            '&' => "und",
            '(' => "Klammer auf",
            ')' => "Klammer zu",
            '*' => "Stern",
            ',' => "Komma",
            '-' => "Strich",
            '.' => "Punkt",
            '/' => "Schrägstrich",
            ':' => "Doppelpunkt",
            ';' => "Semikolon",
            '=' => "gleich",
            '?' => "Fragezeichen",
            '@' => "at",
            '_' => "Unterstrich",
            _ => en,
        },
        "es" => match c {
            '!' => "exclamación",
            '"' => "comillas",
            '#' => "almohadilla",
            '%' => "por ciento",
            '&' => "y",
            '(' => "abre paréntesis",
            ')' => "cierra paréntesis",
            '*' => "asterisco",
            ',' => "coma",
            '-' => "guion",
            '.' => "punto",
            '/' => "barra",
            ':' => "dos puntos",
            ';' => "punto y coma",
            '=' => "igual",
            '?' => "interrogación",
            '@' => "arroba",
            '_' => "guion bajo",
            _ => en,
        },
        _ => en,
    };
    Some(local)
}

/// A set of characters to say by name, in one language.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpokenPunctuation {
    chars: Vec<char>,
    language: String,
}

impl SpokenPunctuation {
    /// `None` when nothing in `chars` has a name (mode `none`, or an empty set).
    pub fn new(chars: &str, language: &str) -> Option<Self> {
        let chars: Vec<char> = chars
            .chars()
            .filter(|&c| name(c, language).is_some())
            .collect();
        (!chars.is_empty()).then(|| Self {
            chars,
            language: language.to_string(),
        })
    }

    /// The text with each chosen character replaced by its name, set off by spaces.
    pub fn apply<'t>(&self, text: &'t str) -> Cow<'t, str> {
        if !text.chars().any(|c| self.chars.contains(&c)) {
            return Cow::Borrowed(text);
        }
        let mut out = String::with_capacity(text.len() + 16);
        for c in text.chars() {
            match self
                .chars
                .contains(&c)
                .then(|| name(c, &self.language))
                .flatten()
            {
                Some(n) => {
                    if !out.is_empty() && !out.ends_with(' ') {
                        out.push(' ');
                    }
                    out.push_str(n);
                    out.push(' ');
                }
                None => out.push(c),
            }
        }
        Cow::Owned(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chosen_marks_are_named_in_the_voices_language() {
        let all = SpokenPunctuation::new(ALL, "en").unwrap();
        assert_eq!(all.apply("Hi, you!"), "Hi comma  you exclamation mark ");
        let some = SpokenPunctuation::new(SOME, "en").unwrap();
        assert_eq!(some.apply("a@b.c"), "a at b.c");
        assert_eq!(
            some.apply("plain, text."),
            "plain, text.",
            "nothing to name"
        );
        let fr = SpokenPunctuation::new(ALL, "fr").unwrap();
        assert_eq!(fr.apply("Oui?"), "Oui point d'interrogation ");
        let hi = SpokenPunctuation::new("%", "hi").unwrap();
        assert_eq!(
            hi.apply("5%"),
            "5 percent ",
            "English where there is no table"
        );
        assert!(SpokenPunctuation::new("", "en").is_none());
        assert!(SpokenPunctuation::new("é", "en").is_none());
    }
}
