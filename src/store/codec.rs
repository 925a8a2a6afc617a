//! How the store keeps a value on disk: compressed, when that makes it smaller.
//!
//! Owns the value encoding of stores of format 2 ([`super::Format::Compressed`]): an empty
//! value is stored empty (most index keys); any other value is one tag byte and then either
//! the value itself ([`RAW`]) or its LZ4 block compressed against a fixed dictionary
//! ([`LZ4_DICTIONARY_1`]: the uncompressed length as 4 little-endian bytes, then the block).
//! Values are small (a resource version, an audit record: 0.1–2 KB), too small for a
//! compressor to find much repetition inside one; the dictionary supplies what they share.
//!
//! The dictionary (`dictionary-1.txt`) is sample values of the shapes the gateway stores,
//! from the benchmark's synthetic referrals (see its header). A value compressed with it
//! can only be read with it, byte for byte: it must never change. A better dictionary is a
//! new tag beside this one, and both stay readable.
//!
//! Must not: decide anything from what a value means (it sees bytes), or return a value it
//! could not decode as if it were one (a damaged value is an error).

use lz4_flex::block;

/// The value follows as it is.
pub const RAW: u8 = 0;
/// LZ4 block against [`DICTIONARY_1`], after the value's length (u32, little-endian).
pub const LZ4_DICTIONARY_1: u8 = 1;

/// The dictionary of [`LZ4_DICTIONARY_1`]. LZ4 reaches back 64 KiB at most; it is less.
const DICTIONARY_1: &[u8] = include_bytes!("dictionary-1.txt");

/// Values shorter than this are stored raw: there is little to gain and a tag to pay.
const MIN_TO_COMPRESS: usize = 48;

/// The stored form of `value`.
pub fn encode(value: &[u8]) -> Vec<u8> {
    if value.is_empty() {
        return Vec::new();
    }
    if value.len() >= MIN_TO_COMPRESS {
        if let Ok(len) = u32::try_from(value.len()) {
            let mut out = Vec::with_capacity(5 + block::get_maximum_output_size(value.len()));
            out.push(LZ4_DICTIONARY_1);
            out.extend_from_slice(&len.to_le_bytes());
            out.resize(5 + block::get_maximum_output_size(value.len()), 0);
            if let Ok(n) = block::compress_into_with_dict(value, &mut out[5..], DICTIONARY_1) {
                if 5 + n < value.len() + 1 {
                    out.truncate(5 + n);
                    return out;
                }
            }
        }
    }
    let mut out = Vec::with_capacity(value.len() + 1);
    out.push(RAW);
    out.extend_from_slice(value);
    out
}

/// The value whose stored form is `stored`; values longer than `max_len` are refused
/// (a damaged length must not make the store allocate gigabytes).
pub fn decode(stored: &[u8], max_len: usize) -> Result<Vec<u8>, String> {
    let Some((&tag, rest)) = stored.split_first() else {
        return Ok(Vec::new());
    };
    match tag {
        RAW => Ok(rest.to_vec()),
        LZ4_DICTIONARY_1 => {
            let (len, compressed) = rest
                .split_first_chunk::<4>()
                .ok_or("a compressed value shorter than its length")?;
            let len = u32::from_le_bytes(*len) as usize;
            if len > max_len {
                return Err(format!(
                    "a compressed value claims {len} bytes, over the {max_len} a value may have"
                ));
            }
            let mut out = vec![0; len];
            let n = block::decompress_into_with_dict(compressed, &mut out, DICTIONARY_1)
                .map_err(|e| format!("a compressed value does not decompress: {e}"))?;
            if n != len {
                return Err(format!(
                    "a compressed value decompressed to {n} bytes, not the {len} it claims"
                ));
            }
            Ok(out)
        }
        other => Err(format!(
            "a value has encoding {other}, which this gateway does not know (a newer \
             gateway's store?)"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_value_reads_back_as_written() {
        let json = br#"{"resourceType":"Task","id":"6f1c","meta":{"versionId":"2"},"status":"accepted","intent":"order"}"#;
        for v in [&b""[..], b"1", b"12345", &json[..], &[0u8, 1, 2, 255][..]] {
            assert_eq!(decode(&encode(v), 1 << 20).expect("decodes"), v);
        }
        let long = json.repeat(40);
        let stored = encode(&long);
        assert_eq!(stored[0], LZ4_DICTIONARY_1);
        assert!(
            stored.len() < long.len() / 5,
            "{} of {}",
            stored.len(),
            long.len()
        );
        assert_eq!(decode(&stored, 1 << 20).expect("decodes"), long);
    }

    #[test]
    fn damaged_values_are_errors_not_values() {
        let mut stored = encode(&br#"{"resourceType":"Patient","gender":"female"}"#.repeat(8));
        assert!(decode(&stored, 100).is_err(), "over the length limit");
        stored.truncate(stored.len() / 2);
        assert!(decode(&stored, 1 << 20).is_err(), "truncated");
        assert!(decode(&[9, 1, 2], 1 << 20).is_err(), "unknown tag");
        assert!(
            decode(&[LZ4_DICTIONARY_1, 1], 1 << 20).is_err(),
            "no length"
        );
    }
}
