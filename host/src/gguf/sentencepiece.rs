//! The pieces of a SentencePiece model file (`tokenizer.model`): text, score and type of every
//! id, read straight from the protobuf (`ModelProto.pieces`, field 1, each a `SentencePiece`
//! with `piece` = 1, `score` = 2, `type` = 3), which is all llama.cpp's converter takes from it.

use std::path::Path;

use anyhow::{bail, Context, Result};

/// `SentencePiece.Type` (sentencepiece_model.proto).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PieceType {
    Normal,
    Unknown,
    Control,
    UserDefined,
    Byte,
    Unused,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Piece {
    pub text: String,
    pub score: f32,
    pub kind: PieceType,
}

/// Reads every piece of the SentencePiece model at `path`, in id order.
pub fn read_pieces(path: &Path) -> Result<Vec<Piece>> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    parse_model(&bytes).with_context(|| format!("{} is not a SentencePiece model", path.display()))
}

pub fn parse_model(bytes: &[u8]) -> Result<Vec<Piece>> {
    let mut pieces = Vec::new();
    let mut r = Reader { bytes, pos: 0 };
    while !r.done() {
        let (field, wire) = r.key()?;
        match (field, wire) {
            (1, 2) => pieces.push(parse_piece(r.bytes_field()?)?),
            _ => r.skip(wire)?,
        }
    }
    if pieces.is_empty() {
        bail!("no pieces");
    }
    Ok(pieces)
}

fn parse_piece(bytes: &[u8]) -> Result<Piece> {
    let mut r = Reader { bytes, pos: 0 };
    // proto2 defaults: score 0, type NORMAL.
    let mut piece = Piece {
        text: String::new(),
        score: 0.0,
        kind: PieceType::Normal,
    };
    while !r.done() {
        let (field, wire) = r.key()?;
        match (field, wire) {
            (1, 2) => {
                piece.text =
                    String::from_utf8(r.bytes_field()?.to_vec()).context("a piece is not UTF-8")?
            }
            (2, 5) => piece.score = f32::from_le_bytes(r.fixed32()?),
            (3, 0) => {
                piece.kind = match r.varint()? {
                    1 => PieceType::Normal,
                    2 => PieceType::Unknown,
                    3 => PieceType::Control,
                    4 => PieceType::UserDefined,
                    5 => PieceType::Unused,
                    6 => PieceType::Byte,
                    other => bail!("piece type {other} is not a SentencePiece type"),
                }
            }
            _ => r.skip(wire)?,
        }
    }
    Ok(piece)
}

struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn done(&self) -> bool {
        self.pos >= self.bytes.len()
    }

    fn varint(&mut self) -> Result<u64> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let Some(&b) = self.bytes.get(self.pos) else {
                bail!("truncated varint at byte {}", self.pos);
            };
            self.pos += 1;
            value |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(value);
            }
        }
        bail!("varint longer than 10 bytes at byte {}", self.pos)
    }

    fn key(&mut self) -> Result<(u64, u8)> {
        let key = self.varint()?;
        Ok((key >> 3, (key & 7) as u8))
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.bytes.len())
            .with_context(|| format!("field of {n} bytes at byte {} overruns", self.pos))?;
        let out = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(out)
    }

    fn bytes_field(&mut self) -> Result<&'a [u8]> {
        let n = self.varint()? as usize;
        self.take(n)
    }

    fn fixed32(&mut self) -> Result<[u8; 4]> {
        Ok(self.take(4)?.try_into().expect("4 bytes"))
    }

    fn skip(&mut self, wire: u8) -> Result<()> {
        match wire {
            0 => {
                self.varint()?;
            }
            1 => {
                self.take(8)?;
            }
            2 => {
                self.bytes_field()?;
            }
            5 => {
                self.take(4)?;
            }
            other => bail!("unsupported protobuf wire type {other}"),
        }
        Ok(())
    }
}

/// Encodes pieces as a `ModelProto` (pieces only): the inverse of [`parse_model`], for tests
/// that need a `tokenizer.model`.
pub fn encode_model(pieces: &[Piece]) -> Vec<u8> {
    fn varint(out: &mut Vec<u8>, mut v: u64) {
        while v >= 0x80 {
            out.push((v as u8) | 0x80);
            v >>= 7;
        }
        out.push(v as u8);
    }
    let mut out = Vec::new();
    for p in pieces {
        let mut msg = Vec::new();
        msg.push(1 << 3 | 2);
        varint(&mut msg, p.text.len() as u64);
        msg.extend_from_slice(p.text.as_bytes());
        msg.push(2 << 3 | 5);
        msg.extend_from_slice(&p.score.to_le_bytes());
        let kind = match p.kind {
            PieceType::Normal => 1,
            PieceType::Unknown => 2,
            PieceType::Control => 3,
            PieceType::UserDefined => 4,
            PieceType::Unused => 5,
            PieceType::Byte => 6,
        };
        msg.push(3 << 3);
        varint(&mut msg, kind);
        out.push(1 << 3 | 2);
        varint(&mut out, msg.len() as u64);
        out.extend(msg);
    }
    // A trainer_spec (field 2) the reader must skip.
    out.extend_from_slice(&[2 << 3 | 2, 3, 0x08, 0x96, 0x01]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_round_trip_and_unknown_fields_are_skipped() {
        let pieces = vec![
            Piece {
                text: "<unk>".into(),
                score: 0.0,
                kind: PieceType::Unknown,
            },
            Piece {
                text: "<s>".into(),
                score: 0.0,
                kind: PieceType::Control,
            },
            Piece {
                text: "<0x0A>".into(),
                score: 0.0,
                kind: PieceType::Byte,
            },
            Piece {
                text: "▁the".into(),
                score: -3.25,
                kind: PieceType::Normal,
            },
        ];
        let bytes = encode_model(&pieces);
        assert_eq!(parse_model(&bytes).unwrap(), pieces);
    }

    #[test]
    fn a_piece_without_score_or_type_gets_the_proto_defaults() {
        // pieces { piece: "ab" }
        let bytes = [0x0a, 0x04, 0x0a, 0x02, b'a', b'b'];
        let p = &parse_model(&bytes).unwrap()[0];
        assert_eq!(
            (p.text.as_str(), p.score, p.kind),
            ("ab", 0.0, PieceType::Normal)
        );
    }

    #[test]
    fn truncated_files_are_errors() {
        let bytes = encode_model(&[Piece {
            text: "x".into(),
            score: 1.0,
            kind: PieceType::Normal,
        }]);
        assert!(parse_model(&bytes[..5]).is_err());
        assert!(parse_model(b"").is_err());
    }
}
