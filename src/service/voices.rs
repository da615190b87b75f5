//! One record per voice, whatever made it: what every interface lists and picks from.

use serde::{Deserialize, Serialize};

use crate::model::Voxtral;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Gender {
    Female,
    Male,
}

/// Where a voice comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Origin {
    /// Shipped with the checkpoint (`voice_embedding/`).
    Preset,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Voice {
    pub id: String,
    /// ISO 639-1 code.
    pub language: String,
    pub gender: Option<Gender>,
    pub origin: Origin,
    /// A name for people: "Voxtral Casual Female (English)".
    pub display_name: String,
}

/// English names of the model's languages.
pub fn language_name(code: &str) -> &'static str {
    match code {
        "fr" => "French",
        "es" => "Spanish",
        "de" => "German",
        "it" => "Italian",
        "pt" => "Portuguese",
        "nl" => "Dutch",
        "ar" => "Arabic",
        "hi" => "Hindi",
        "en" => "English",
        _ => "Unknown language",
    }
}

impl Voice {
    /// A preset, described from its name (`fr_female`, `casual_male`, ...).
    pub fn preset(id: &str, language: &str) -> Self {
        let gender = match id.rsplit('_').next() {
            Some("female") => Some(Gender::Female),
            Some("male") => Some(Gender::Male),
            _ => None,
        };
        let mut words: Vec<String> = id
            .split('_')
            .filter(|w| w.len() > 2)
            .map(|w| {
                let mut c = w.chars();
                c.next()
                    .map(|f| f.to_uppercase().collect::<String>() + c.as_str())
                    .unwrap_or_default()
            })
            .collect();
        if words.is_empty() {
            words.push(id.to_string());
        }
        Self {
            id: id.into(),
            language: language.into(),
            gender,
            origin: Origin::Preset,
            display_name: format!("Voxtral {} ({})", words.join(" "), language_name(language)),
        }
    }
}

/// The voices a model offers.
pub fn of_model(model: &Voxtral) -> Vec<Voice> {
    model
        .voices()
        .map(|v| Voice::preset(&v.name, v.language))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_are_described_from_their_names() {
        let v = Voice::preset("fr_female", "fr");
        assert_eq!(v.gender, Some(Gender::Female));
        assert_eq!(v.display_name, "Voxtral Female (French)");
        let v = Voice::preset("casual_male", "en");
        assert_eq!(v.gender, Some(Gender::Male));
        assert_eq!(v.display_name, "Voxtral Casual Male (English)");
    }
}
