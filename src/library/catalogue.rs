//! The preset catalogue: `voices/presets.toml`, embedded at build time, is the one place that
//! says each preset's language, gender, style and description.

use std::collections::BTreeMap;
use std::sync::OnceLock;

use serde::Deserialize;

use crate::service::voices::Gender;

const PRESETS_TOML: &str = include_str!("../../voices/presets.toml");

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PresetEntry {
    pub id: String,
    /// ISO 639-1 code.
    pub language: String,
    pub gender: Gender,
    pub style: String,
    pub description: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Catalogue {
    /// ISO 639-1 code to English name.
    pub languages: BTreeMap<String, String>,
    #[serde(rename = "voice")]
    pub voices: Vec<PresetEntry>,
}

impl Catalogue {
    pub fn preset(&self, id: &str) -> Option<&PresetEntry> {
        self.voices.iter().find(|v| v.id == id)
    }

    /// The language of a preset: from the catalogue, else from a `xx_` prefix of its name if
    /// that is a known language, else English (the release's unprefixed voices are English).
    pub fn language_of(&self, id: &str) -> String {
        if let Some(p) = self.preset(id) {
            return p.language.clone();
        }
        match id.split_once('_') {
            Some((prefix, _)) if self.languages.contains_key(prefix) => prefix.into(),
            _ => "en".into(),
        }
    }
}

/// The catalogue, parsed once. It is part of the build, so a parse failure is a bug caught
/// by the tests, not a user's input.
pub fn catalogue() -> &'static Catalogue {
    static CATALOGUE: OnceLock<Catalogue> = OnceLock::new();
    CATALOGUE.get_or_init(|| {
        toml::from_str(PRESETS_TOML).unwrap_or_else(|e| {
            tracing::error!("voices/presets.toml is invalid: {e}");
            Catalogue {
                languages: BTreeMap::new(),
                voices: Vec::new(),
            }
        })
    })
}

/// The English name of a language code, or the code itself when the catalogue lacks it.
pub fn language_name(code: &str) -> String {
    catalogue()
        .languages
        .get(code)
        .cloned()
        .unwrap_or_else(|| code.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::random::RELEASE_VOICES;

    #[test]
    fn the_catalogue_parses_and_lists_every_release_voice_once() {
        let c: Catalogue = toml::from_str(PRESETS_TOML).expect("voices/presets.toml parses");
        assert_eq!(c.voices.len(), RELEASE_VOICES.len());
        for (id, _) in RELEASE_VOICES {
            let p = c.preset(id).unwrap_or_else(|| panic!("{id} missing"));
            assert!(
                c.languages.contains_key(&p.language),
                "{id}: {}",
                p.language
            );
            assert!(!p.description.is_empty());
            let g = if id.ends_with("_female") {
                Gender::Female
            } else {
                Gender::Male
            };
            assert_eq!(p.gender, g, "{id}");
        }
        let mut ids: Vec<_> = c.voices.iter().map(|v| &v.id).collect();
        ids.dedup();
        assert_eq!(ids.len(), c.voices.len());
    }

    #[test]
    fn languages_come_from_the_catalogue_then_the_name() {
        let c = catalogue();
        assert_eq!(c.language_of("fr_male"), "fr");
        assert_eq!(c.language_of("neutral_female"), "en");
        assert_eq!(c.language_of("de_someone_new"), "de");
        assert_eq!(c.language_of("zz_unknown"), "en");
        assert_eq!(language_name("hi"), "Hindi");
        assert_eq!(language_name("xx"), "xx");
    }
}
