//! Fuzz targets: each takes arbitrary bytes from a peer and must never panic,
//! hang or allocate without bound. The same functions run under cargo-fuzz
//! (`worker-protocol/fuzz`) and, bounded, as proptests inside `scripts/test`.

use crate::frame::{token_batch_entries, Frame};
use crate::stdio::StdioDecoder;

/// Frame decoding: the first 4 bytes pick the kind and flags, the rest is the
/// payload; hot frames are walked entry by entry, cold frames parsed as JSON.
pub fn frame_decode(data: &[u8]) {
    let (head, payload) = data.split_at(data.len().min(4));
    let mut h = [0u8; 4];
    h[..head.len()].copy_from_slice(head);
    let kind = u16::from_le_bytes([h[0], h[1]]) % 18;
    let flags = u16::from_le_bytes([h[2], h[3]]);
    if let Ok(Frame::TokenBatch(batch)) = Frame::decode(kind, flags, payload) {
        // What decodes must re-encode to the same entries.
        let mut again = Vec::new();
        crate::frame::encode_token_batch(&batch.entries, &mut again);
        let back = crate::frame::decode_token_batch(&again).expect("own encoding decodes");
        assert_eq!(back, batch);
    }
    if let Ok(entries) = token_batch_entries(payload) {
        for entry in entries {
            if entry.is_err() {
                break;
            }
        }
    }
}

/// The stdio stream: the bytes arrive in two arbitrary pieces; every frame that
/// comes out is decoded; EOF is checked at the end.
pub fn stdio_stream(data: &[u8]) {
    let split = data.first().map_or(0, |b| *b as usize).min(data.len());
    let mut decoder = StdioDecoder::new();
    for piece in [&data[..split], &data[split..]] {
        decoder.feed(piece);
        while let Ok(Some((kind, flags, payload))) = decoder.next_raw() {
            let _ = Frame::decode(kind, flags, payload);
        }
    }
    let _ = decoder.finish();
}
