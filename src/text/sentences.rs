//! Splitting text into sentences for sentence-by-sentence synthesis: terminal punctuation of
//! the model's languages (Latin, Arabic, Devanagari and CJK marks), no split after common
//! abbreviations or initials, and over-long sentences cut at clause boundaries, then at spaces.
//! Ranges are character (Unicode scalar) offsets into the original text.

use std::ops::Range;

/// Abbreviations that end in a period without ending a sentence (compared lowercase, without
/// the final period).
const ABBREVIATIONS: &[&str] = &[
    "dr", "mr", "mrs", "ms", "prof", "st", "jr", "sr", "vs", "etc", "e.g", "i.e", "no", "fig",
    "approx", "a.m", "p.m", "mt", "cf", "al", "inc", "ltd", "co", "dept", "est", "vol", "p", "pp",
    "ca", "gen", "col", "lt", "sgt", "capt", "rev", "hon", "ave", "blvd", "jan", "feb", "mar",
    "apr", "jun", "jul", "aug", "sep", "sept", "oct", "nov", "dec", // English
    "m", "mme", "mlle", "me", "env", "av", // French
    "sra", "srta", "dra", "ud", "uds", "pág", "núm", // Spanish
    "z.b", "u.a", "usw", "bzw", "ggf", "evtl", "nr", "s", "hr", "fr", // German
    "sig", "dott", "ing", "pag", // Italian
    "dna", "exmo", "exma", // Portuguese
    "dhr", "mevr", "bijv", "o.a", // Dutch
];

fn is_terminal(c: char) -> bool {
    matches!(
        c,
        '.' | '!'
            | '?'
            | '…'
            | '。'
            | '！'
            | '？'
            | '؟'
            | '۔'
            | '।'
            | '॥'
            | '‼'
            | '⁇'
            | '⁈'
            | '⁉'
    )
}

/// Marks that end a sentence even without a following space.
fn is_wide_terminal(c: char) -> bool {
    matches!(c, '。' | '！' | '？' | '।' | '॥')
}

fn is_closing(c: char) -> bool {
    matches!(
        c,
        '"' | '\'' | '”' | '’' | '»' | ')' | ']' | '}' | '›' | '」' | '』' | '）'
    )
}

fn is_clause(c: char) -> bool {
    matches!(
        c,
        ',' | ';' | ':' | '—' | '–' | '،' | '؛' | '、' | '，' | '；' | '：'
    )
}

/// The word before position `dot` (exclusive), lowercase.
fn word_before(chars: &[char], dot: usize) -> String {
    let mut s = dot;
    while s > 0 && !chars[s - 1].is_whitespace() && !matches!(chars[s - 1], '(' | '"' | '“' | '«')
    {
        s -= 1;
    }
    chars[s..dot].iter().collect::<String>().to_lowercase()
}

fn is_abbreviation(chars: &[char], dot: usize) -> bool {
    let w = word_before(chars, dot);
    if w.is_empty() {
        return false;
    }
    // Initials such as "J." or "J.R.R."
    let letters: Vec<char> = w.chars().filter(|c| *c != '.').collect();
    if letters.len() == 1 && letters[0].is_alphabetic() {
        return true;
    }
    ABBREVIATIONS.contains(&w.as_str())
}

/// Sentence ranges (character offsets, whitespace trimmed) covering all non-blank text.
pub fn split_sentences(text: &str, max_chars: usize) -> Vec<Range<usize>> {
    let chars: Vec<char> = text.chars().collect();
    let mut out = Vec::new();
    let mut start = 0;
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let mut end = None;
        if c == '\n' && chars.get(i + 1) == Some(&'\n') {
            end = Some(i);
        } else if is_terminal(c) {
            let mut j = i + 1;
            while j < chars.len() && (is_terminal(chars[j]) || is_closing(chars[j])) {
                j += 1;
            }
            let at_break = j == chars.len() || chars[j].is_whitespace() || is_wide_terminal(c);
            if at_break && !(c == '.' && j == i + 1 && is_abbreviation(&chars, i)) {
                end = Some(j);
            }
            i = j - 1;
        }
        if let Some(e) = end {
            push_trimmed(&chars, start..e, max_chars, &mut out);
            start = e;
        }
        i += 1;
    }
    push_trimmed(&chars, start..chars.len(), max_chars, &mut out);
    out
}

fn push_trimmed(chars: &[char], r: Range<usize>, max_chars: usize, out: &mut Vec<Range<usize>>) {
    let (mut s, mut e) = (r.start, r.end);
    while s < e && chars[s].is_whitespace() {
        s += 1;
    }
    while e > s && chars[e - 1].is_whitespace() {
        e -= 1;
    }
    if s == e {
        return;
    }
    if e - s <= max_chars.max(1) {
        out.push(s..e);
        return;
    }
    // Too long: cut after the last clause mark (then the last space) that keeps the head short.
    let limit = s + max_chars.max(1);
    let cut = (s + 1..limit)
        .rev()
        .find(|&k| is_clause(chars[k - 1]) && chars[k].is_whitespace())
        .or_else(|| (s + 1..limit).rev().find(|&k| chars[k].is_whitespace()))
        .unwrap_or(limit);
    push_trimmed(chars, s..cut, max_chars, out);
    push_trimmed(chars, cut..e, max_chars, out);
}

/// `sentences` cut further at each offset in `cuts` (sorted) that falls inside one, each piece
/// trimmed of whitespace; pieces of nothing but whitespace are dropped. SSML breaks and prosody
/// spans start and end at such cuts.
pub fn cut_at(text: &str, sentences: &[Range<usize>], cuts: &[usize]) -> Vec<Range<usize>> {
    if cuts.is_empty() {
        return sentences.to_vec();
    }
    let chars: Vec<char> = text.chars().collect();
    let mut out = Vec::new();
    for r in sentences {
        let mut start = r.start;
        for &c in cuts.iter().filter(|&&c| c > r.start && c < r.end) {
            push_trimmed(&chars, start..c, usize::MAX, &mut out);
            start = c;
        }
        push_trimmed(&chars, start..r.end, usize::MAX, &mut out);
    }
    out
}

/// The words of `sentence`, as character ranges counted from `first` (the sentence's own
/// offset in its text): runs of non-space characters, and each CJK character on its own (those
/// scripts put no spaces between words).
pub fn words(sentence: &str, first: usize) -> Vec<Range<usize>> {
    let mut out = Vec::new();
    let mut start = None;
    let mut end = first;
    for (i, c) in (first..).zip(sentence.chars()) {
        end = i + 1;
        if c.is_whitespace() || is_ideograph(c) {
            if let Some(s) = start.take() {
                out.push(s..i);
            }
            if !c.is_whitespace() {
                out.push(i..i + 1);
            }
        } else if start.is_none() {
            start = Some(i);
        }
    }
    if let Some(s) = start {
        out.push(s..end);
    }
    out
}

/// Han and kana: scripts written without spaces between words.
fn is_ideograph(c: char) -> bool {
    matches!(c as u32, 0x3040..=0x30FF | 0x3400..=0x4DBF | 0x4E00..=0x9FFF | 0xF900..=0xFAFF)
}

/// The substring for a character range.
pub fn char_slice(text: &str, r: &Range<usize>) -> String {
    text.chars().skip(r.start).take(r.end - r.start).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cuts_and_words() {
        let t = "Hello there world. Next one";
        let s = split_sentences(t, 400);
        let cut = cut_at(t, &s, &[6, 11, 18, 19]);
        let got: Vec<String> = cut.iter().map(|r| char_slice(t, r)).collect();
        assert_eq!(got, ["Hello", "there", "world.", "Next one"]);
        let w: Vec<String> = words(t, 0).iter().map(|r| char_slice(t, r)).collect();
        assert_eq!(w, ["Hello", "there", "world.", "Next", "one"]);
        let j = "日本 go";
        let w: Vec<String> = words(j, 0).iter().map(|r| char_slice(j, r)).collect();
        assert_eq!(w, ["日", "本", "go"]);
        // Counted from the sentence's place in its text.
        assert_eq!(words("ab cd", 10), [10..12, 13..15]);
    }

    fn split(t: &str) -> Vec<String> {
        split_sentences(t, 300)
            .iter()
            .map(|r| char_slice(t, r))
            .collect()
    }

    #[test]
    fn splits_on_terminal_punctuation() {
        assert_eq!(
            split("Hello there. How are you? Fine!  Thanks…"),
            ["Hello there.", "How are you?", "Fine!", "Thanks…"]
        );
        assert_eq!(
            split("He said \"stop.\" Then left."),
            ["He said \"stop.\"", "Then left."]
        );
        assert_eq!(split("Wait?! Really."), ["Wait?!", "Really."]);
    }

    #[test]
    fn abbreviations_and_initials_do_not_split() {
        assert_eq!(
            split("Dr. Smith met Mrs. Jones, e.g. at 3.30 p.m. today. J. R. R. Tolkien wrote it."),
            [
                "Dr. Smith met Mrs. Jones, e.g. at 3.30 p.m. today.",
                "J. R. R. Tolkien wrote it."
            ]
        );
        assert_eq!(
            split("Version 2.5 is out. Next."),
            ["Version 2.5 is out.", "Next."]
        );
        assert_eq!(split("Das ist z.B. gut. Ja."), ["Das ist z.B. gut.", "Ja."]);
    }

    #[test]
    fn other_scripts() {
        assert_eq!(
            split("これはペンです。あれは本です。"),
            ["これはペンです。", "あれは本です。"]
        );
        assert_eq!(split("यह किताब है। वह कलम है।"), ["यह किताब है।", "वह कलम है।"]);
        assert_eq!(split("هل أنت بخير؟ نعم."), ["هل أنت بخير؟", "نعم."]);
        assert_eq!(split("¿Qué tal? ¡Muy bien!"), ["¿Qué tal?", "¡Muy bien!"]);
    }

    #[test]
    fn paragraphs_and_blank_text() {
        assert_eq!(split("Title\n\nBody text"), ["Title", "Body text"]);
        assert!(split("   \n\n  ").is_empty());
    }

    #[test]
    fn long_sentences_split_at_clauses_then_spaces() {
        let t = "one two three, four five six; seven eight nine ten";
        let parts: Vec<String> = split_sentences(t, 20)
            .iter()
            .map(|r| char_slice(t, r))
            .collect();
        assert_eq!(
            parts,
            ["one two three,", "four five six;", "seven eight nine ten"]
        );
        let t = "x".repeat(25);
        let parts = split_sentences(&t, 10);
        assert_eq!(parts, [0..10, 10..20, 20..25]);
    }

    #[test]
    fn offsets_are_characters_of_the_original() {
        let t = "Café. Naïve!";
        let r = split_sentences(t, 300);
        assert_eq!(r, [0..5, 6..12]);
    }
}
