//! Cloning a voice from a clip without the withheld codec encoder: codes are searched by
//! gradient descent through the released decoder until their decoding sounds like the clip.
