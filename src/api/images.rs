//! Images in requests, the same for every dialect: each dialect's image form (an
//! OpenAI `image_url`, a Responses `input_image`, an Anthropic `image` block, an
//! Ollama `images` entry) becomes the file's bytes, checked here before anything
//! is loaded: base64 that decodes, a size within the limit, and the file signature
//! of a format the worker decodes (PNG, JPEG, WebP, GIF). The worker gets the bytes
//! (not base64) and decodes the pixels (refusing a decompression bomb by its
//! header) off the engine thread. An http(s) URL stays in the request's images as
//! the URL's text until core fetches it from an allowed host
//! (src/api/image_urls.rs); other schemes are refused.

use base64::Engine as _;
use bytes::Bytes;
use worker_protocol::frame::ContentPart;

use crate::error::Error;

/// The largest image file a request may carry (decoded bytes).
pub const MAX_IMAGE_BYTES: usize = 20 << 20;
/// Images in one request.
pub const MAX_IMAGES: usize = 32;

/// A turn's text and images as the client ordered them, and the request's images.
#[derive(Default)]
pub struct Images {
    /// Every image of the request, the file's bytes, in the order first seen; an
    /// http(s) URL's text where the image is still to be fetched (no image file
    /// starts with "http": each was checked for its format's signature).
    pub files: Vec<Bytes>,
}

/// One turn's pieces while a dialect reads them.
#[derive(Default)]
pub struct Turn {
    text: String,
    parts: Vec<ContentPart>,
    images: bool,
}

impl Turn {
    pub fn push_text(&mut self, text: &str) {
        self.text.push_str(text);
        match self.parts.last_mut() {
            Some(ContentPart::Text { text: last }) => last.push_str(text),
            _ => self.parts.push(ContentPart::Text { text: text.into() }),
        }
    }

    pub fn push_image(&mut self, image: u32) {
        self.images = true;
        self.parts.push(ContentPart::Image { image });
    }

    /// The text and no parts for a text-only turn; no text and the parts (which
    /// hold it) for a turn with images, so that the frame carries its text once.
    pub fn finish(self) -> (String, Vec<ContentPart>) {
        if self.images {
            (String::new(), self.parts)
        } else {
            (self.text, Vec::new())
        }
    }
}

impl Images {
    /// An image given as a URL: `data:image/png;base64,...`, or an http(s) URL
    /// fetched later if its host is allowed; `field` names where it was in the
    /// request's errors.
    pub fn add_url(&mut self, url: &str, field: &str) -> Result<u32, Error> {
        if super::image_urls::is_pending(url.as_bytes()) {
            self.room(field)?;
            self.files.push(Bytes::copy_from_slice(url.as_bytes()));
            return Ok((self.files.len() - 1) as u32);
        }
        let Some(rest) = url.strip_prefix("data:") else {
            let shown: String = url.chars().take(60).collect();
            return Err(Error::invalid(
                format!(
                    "image URL {shown:?}: only data: and http(s) URLs are taken; send the \
                     image inline as data:image/png;base64,..."
                ),
                Some(field),
            ));
        };
        let Some((_, data)) = rest.split_once(";base64,") else {
            return Err(Error::invalid(
                "an image data: URL must be base64 (data:image/png;base64,...)",
                Some(field),
            ));
        };
        self.add_base64(data, field)
    }

    fn room(&self, field: &str) -> Result<(), Error> {
        if self.files.len() >= MAX_IMAGES {
            return Err(Error::invalid(
                format!("a request takes at most {MAX_IMAGES} images"),
                Some(field),
            ));
        }
        Ok(())
    }

    /// An image given as its file's bytes in base64.
    pub fn add_base64(&mut self, data: &str, field: &str) -> Result<u32, Error> {
        self.room(field)?;
        let data = data.trim();
        if data.len() / 4 * 3 > MAX_IMAGE_BYTES + 3 {
            return Err(too_large(field));
        }
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(data)
            .map_err(|e| {
                Error::invalid(format!("an image is not valid base64: {e}"), Some(field))
            })?;
        check_file(&bytes, field)?;
        self.files.push(Bytes::from(bytes));
        Ok((self.files.len() - 1) as u32)
    }
}

/// An image file's size and signature, checked before the worker sees it.
pub fn check_file(bytes: &[u8], field: &str) -> Result<(), Error> {
    if bytes.len() > MAX_IMAGE_BYTES {
        return Err(too_large(field));
    }
    if let Some(what) = unsupported(bytes) {
        return Err(Error::invalid(
            format!("an image is {what}; send PNG, JPEG, WebP or GIF"),
            Some(field),
        ));
    }
    Ok(())
}

pub fn too_large(field: &str) -> Error {
    Error::invalid(
        format!("an image is larger than {} MiB", MAX_IMAGE_BYTES >> 20),
        Some(field),
    )
}

/// Why a file is not an image the worker decodes, from its signature; None: it
/// is one (the worker still decodes it, and refuses a corrupt one).
fn unsupported(bytes: &[u8]) -> Option<&'static str> {
    let png = bytes.starts_with(b"\x89PNG\r\n\x1a\n");
    let jpeg = bytes.starts_with(&[0xFF, 0xD8, 0xFF]);
    let gif = bytes.starts_with(b"GIF87a") || bytes.starts_with(b"GIF89a");
    let webp = bytes.len() >= 12 && &bytes[..4] == b"RIFF" && &bytes[8..12] == b"WEBP";
    if png || jpeg || gif || webp {
        return None;
    }
    let head = String::from_utf8_lossy(&bytes[..bytes.len().min(256)]).to_ascii_lowercase();
    Some(if head.contains("<svg") || head.contains("<?xml") {
        "SVG (a vector drawing, not a picture)"
    } else {
        "not a PNG, JPEG, WebP or GIF file"
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const PNG_1X1: &str = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg==";

    #[test]
    fn data_urls_and_base64_become_files_and_bad_ones_are_named() {
        let mut images = Images::default();
        let url = format!("data:image/png;base64,{PNG_1X1}");
        assert_eq!(images.add_url(&url, "messages").unwrap(), 0);
        assert_eq!(images.add_base64(PNG_1X1, "images").unwrap(), 1);
        let err = |r: Result<u32, Error>| r.unwrap_err().to_string();
        assert!(
            err(images.add_url("ftp://127.0.0.1/x.png", "m")).contains("only data: and http(s)")
        );
        assert!(err(images.add_base64("!!!", "m")).contains("base64"));
        let svg = base64::engine::general_purpose::STANDARD.encode("<svg xmlns='x'/>");
        assert!(err(images.add_base64(&svg, "m")).contains("SVG"));
        let big = base64::engine::general_purpose::STANDARD.encode(vec![0u8; MAX_IMAGE_BYTES + 1]);
        assert!(err(images.add_base64(&big, "m")).contains("larger than"));
        assert_eq!(images.add_url("https://example.com/x.png", "m").unwrap(), 2);
        assert_eq!(images.files.len(), 3);
    }

    #[test]
    fn a_turn_keeps_its_order_and_a_text_turn_has_no_parts() {
        let mut turn = Turn::default();
        turn.push_image(1);
        turn.push_text("left ");
        turn.push_text("right");
        turn.push_image(0);
        let (text, parts) = turn.finish();
        assert_eq!(text, "");
        assert_eq!(parts.len(), 3);
        assert!(matches!(&parts[1], ContentPart::Text { text } if text == "left right"));
        let mut plain = Turn::default();
        plain.push_text("hi");
        assert!(plain.finish().1.is_empty());
    }
}
