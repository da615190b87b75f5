//! Text on its way to the model: sentence splitting, SSML (the interfaces that receive it turn
//! it into plain text with marks), the user's pronunciations, and punctuation said by name. Nothing here knows about the
//! model or the interfaces.

pub mod lexicon;
pub mod punctuation;
pub mod sentences;
pub mod ssml;
