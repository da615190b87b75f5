//! One record per voice, whatever made it: what every interface lists and picks from.

use serde::{Deserialize, Serialize};

use crate::library::{catalogue, language_name, Quality, UserVoice};
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
    /// The user's own, from the voice library (cloned or imported codes).
    User,
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
    /// One line for people choosing a voice (from `voices/presets.toml` for presets).
    pub description: String,
    /// How close a user voice's codes decode to its clip, when it was cloned.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub quality: Option<Quality>,
}

impl Voice {
    /// A preset, described from its name (`fr_female`, `casual_male`, ...).
    pub fn preset(id: &str, language: &str) -> Self {
        let entry = catalogue().preset(id);
        let gender = entry.map(|e| e.gender).or(match id.rsplit('_').next() {
            Some("female") => Some(Gender::Female),
            Some("male") => Some(Gender::Male),
            _ => None,
        });
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
            description: entry.map_or_else(
                || format!("{}, a preset of this checkpoint", language_name(language)),
                |e| e.description.clone(),
            ),
            quality: None,
        }
    }

    /// A voice of the user's library.
    pub fn user(v: &UserVoice) -> Self {
        let how = match v.made {
            crate::library::Made::Clone { .. } => "cloned from a clip",
            crate::library::Made::Import { .. } => "imported codes",
        };
        Self {
            id: v.name.clone(),
            language: v.language.clone(),
            gender: v.gender,
            origin: Origin::User,
            display_name: format!("{} ({})", v.name, language_name(&v.language)),
            description: format!(
                "your voice: {how}, {:.1} s of codes, made {}",
                v.codes.seconds(),
                v.created
            ),
            quality: v.quality.clone(),
        }
    }
}

/// Puts a user voice into the model: its rows from its codes.
pub fn install_user_voice(model: &Voxtral, v: &UserVoice) -> crate::Result<()> {
    let rows = model.voice_rows_from_codes(v.codes.frames())?;
    model.set_user_voice(&v.name, rows)
}

/// The preset voices a model offers.
pub fn of_model(model: &Voxtral) -> Vec<Voice> {
    model
        .voices()
        .map(|v| Voice::preset(&v.name, &v.language))
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
