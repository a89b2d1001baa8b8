//! Tokenized samples → [`Batch`]es: rows (one sample each, or several packed), a seeded shuffle of
//! the rows per epoch, micro-batches of rows, and the shift from tokens to targets.
//!
//! * **Rows.** Without `--packing` each sample is a row. With it, samples are packed once, before
//!   training, by best-fit decreasing (longest first, each into the fullest row it still fits):
//!   rows come out nearly full and the number of rows per epoch is fixed, so step counts and
//!   resume positions do not depend on the epoch.
//! * **Order.** Epoch `e` visits the rows in a permutation drawn from ChaCha8 seeded with
//!   `--seed`, stream `e`: any epoch's order is computed directly, which is what makes resuming
//!   from a [`DataPosition`] give exactly the batches an uninterrupted run would have seen.
//! * **Padding.** A micro-batch is as long as its longest row (TRL's "pad to longest"; padding to
//!   `max_seq_length` would only add work that carries no loss). Padding takes the PAD id (EOS or
//!   0 when there is none), its own segment, and [`IGNORE`] targets.
//! * **Targets.** `targets[i]` is the next token of the same sample when that token is trainable,
//!   else [`IGNORE`]; the last token of each sample predicts nothing, so packed samples never
//!   learn across their boundary.

use std::collections::BTreeMap;

use anyhow::{bail, Result};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::encode::TokenizedSample;
use crate::engine::{Batch, IGNORE};

/// Where the data stream stands: the next micro-batch to produce is number `index` of epoch
/// `epoch` (both from 0). The trainer stores it in checkpoints.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataPosition {
    pub epoch: u64,
    pub index: u64,
}

impl DataPosition {
    /// Epochs completed as a fraction (e.g. 1.25 = a quarter into the second epoch), for logs
    /// and `trainer_state.json`.
    pub fn epoch_progress(&self, batches_per_epoch: usize) -> f64 {
        self.epoch as f64 + self.index as f64 / batches_per_epoch.max(1) as f64
    }
}

/// How samples become batches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchOptions {
    /// Rows per micro-batch (`--per_device_train_batch_size` / `--per_device_eval_batch_size`).
    pub micro_batch_size: usize,
    /// Longest row (`--max_seq_length`); packing fills rows up to it.
    pub max_seq_length: usize,
    pub packing: bool,
    /// Shuffle rows per epoch (training); evaluation keeps dataset order.
    pub shuffle: bool,
    pub seed: u64,
    pub pad_id: u32,
}

/// A micro-batch with its place in the data stream.
#[derive(Debug, Clone, PartialEq)]
pub struct PositionedBatch {
    /// The position of this batch.
    pub at: DataPosition,
    /// The position right after it: what a checkpoint taken after this batch stores.
    pub next: DataPosition,
    pub batch: Batch,
}

/// Deterministic micro-batches over a fixed set of samples.
pub struct Batcher<'a> {
    samples: &'a [TokenizedSample],
    /// Sample indices of each row.
    rows: Vec<Vec<usize>>,
    options: BatchOptions,
}

impl<'a> Batcher<'a> {
    pub fn new(samples: &'a [TokenizedSample], options: BatchOptions) -> Result<Self> {
        if samples.is_empty() {
            bail!("no samples to batch");
        }
        if options.micro_batch_size == 0 {
            bail!("micro-batch size must be positive");
        }
        if let Some(long) = samples
            .iter()
            .position(|s| s.len() > options.max_seq_length)
        {
            bail!(
                "sample {long} has {} tokens, more than max_seq_length {}",
                samples[long].len(),
                options.max_seq_length
            );
        }
        let rows = if options.packing {
            pack_best_fit_decreasing(samples, options.max_seq_length)
        } else {
            (0..samples.len()).map(|i| vec![i]).collect()
        };
        Ok(Self {
            samples,
            rows,
            options,
        })
    }

    /// Rows (packed or single samples) per epoch.
    pub fn rows(&self) -> usize {
        self.rows.len()
    }

    /// Sample indices of each row (packing layout), for tests and statistics.
    pub fn row_layout(&self) -> &[Vec<usize>] {
        &self.rows
    }

    /// Micro-batches per epoch; the last one may hold fewer rows.
    pub fn batches_per_epoch(&self) -> usize {
        self.rows.len().div_ceil(self.options.micro_batch_size)
    }

    /// The order in which epoch `epoch` visits the rows.
    pub fn epoch_order(&self, epoch: u64) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.rows.len()).collect();
        if self.options.shuffle {
            let mut rng = ChaCha8Rng::seed_from_u64(self.options.seed);
            rng.set_stream(epoch);
            order.shuffle(&mut rng);
        }
        order
    }

    /// Endless micro-batches from `position` on, crossing epochs; the trainer stops taking them
    /// at its step budget. A position past the end of an epoch is an error: the data (or batch
    /// settings) differ from the run that saved it.
    pub fn batches_from(&self, position: DataPosition) -> Result<Batches<'_, 'a>> {
        let per_epoch = self.batches_per_epoch() as u64;
        let position = if position.index == per_epoch {
            DataPosition {
                epoch: position.epoch + 1,
                index: 0,
            }
        } else {
            position
        };
        if position.index > per_epoch {
            bail!(
                "the saved data position (epoch {}, batch {}) is past the end of an epoch of {} \
                 batches: the dataset or --per_device_train_batch_size/--packing/--max_seq_length \
                 changed since the checkpoint was written; resume with the same data and flags",
                position.epoch,
                position.index,
                per_epoch
            );
        }
        Ok(Batches {
            batcher: self,
            order: self.epoch_order(position.epoch),
            position,
        })
    }

    /// One pass over all rows in epoch-0 order (evaluation).
    pub fn one_epoch(&self) -> impl Iterator<Item = Batch> + '_ {
        let order = self.epoch_order(0);
        let per_epoch = self.batches_per_epoch();
        (0..per_epoch).map(move |i| self.batch_of(&order, i))
    }

    fn batch_of(&self, order: &[usize], index: usize) -> Batch {
        let mb = self.options.micro_batch_size;
        let rows: Vec<&Vec<usize>> = order[index * mb..((index + 1) * mb).min(order.len())]
            .iter()
            .map(|&r| &self.rows[r])
            .collect();
        self.assemble(&rows)
    }

    fn assemble(&self, rows: &[&Vec<usize>]) -> Batch {
        let row_len = |row: &Vec<usize>| row.iter().map(|&s| self.samples[s].len()).sum::<usize>();
        let seq_len = rows.iter().map(|r| row_len(r)).max().unwrap_or(0);
        let n = rows.len() * seq_len;
        let mut batch = Batch {
            batch_size: rows.len(),
            seq_len,
            input_ids: Vec::with_capacity(n),
            targets: Vec::with_capacity(n),
            position_ids: Vec::with_capacity(n),
            segment_ids: Vec::with_capacity(n),
        };
        for row in rows {
            for (segment, &s) in row.iter().enumerate() {
                let sample = &self.samples[s];
                let ids = &sample.input_ids;
                for j in 0..ids.len() {
                    batch.input_ids.push(ids[j]);
                    batch.targets.push(match ids.get(j + 1) {
                        Some(&next) if sample.trainable[j + 1] => next as i32,
                        _ => IGNORE,
                    });
                    batch.position_ids.push(j as u32);
                    batch.segment_ids.push(segment as u32);
                }
            }
            let pad = seq_len - row_len(row);
            let pad_segment = row.len() as u32;
            for j in 0..pad {
                batch.input_ids.push(self.options.pad_id);
                batch.targets.push(IGNORE);
                batch.position_ids.push(j as u32);
                batch.segment_ids.push(pad_segment);
            }
        }
        batch
    }
}

/// The endless batch stream of [`Batcher::batches_from`].
pub struct Batches<'b, 'a> {
    batcher: &'b Batcher<'a>,
    order: Vec<usize>,
    position: DataPosition,
}

impl Iterator for Batches<'_, '_> {
    type Item = PositionedBatch;

    fn next(&mut self) -> Option<PositionedBatch> {
        let at = self.position;
        let batch = self.batcher.batch_of(&self.order, at.index as usize);
        let mut next = DataPosition {
            epoch: at.epoch,
            index: at.index + 1,
        };
        if next.index == self.batcher.batches_per_epoch() as u64 {
            next = DataPosition {
                epoch: at.epoch + 1,
                index: 0,
            };
            self.order = self.batcher.epoch_order(next.epoch);
        }
        self.position = next;
        Some(PositionedBatch { at, next, batch })
    }
}

/// Packs samples into rows of at most `capacity` tokens: longest first, each into the row with
/// the least room that still fits it (a new row when none does). Ties keep dataset order, so the
/// layout is a pure function of the sample lengths.
fn pack_best_fit_decreasing(samples: &[TokenizedSample], capacity: usize) -> Vec<Vec<usize>> {
    let mut by_length: Vec<usize> = (0..samples.len()).collect();
    by_length.sort_by_key(|&i| std::cmp::Reverse(samples[i].len()));
    let mut rows: Vec<Vec<usize>> = Vec::new();
    // Room left → rows with exactly that much room, oldest first.
    let mut room: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    for i in by_length {
        let len = samples[i].len();
        let fit = room
            .range_mut(len..)
            .next()
            .map(|(&r, list)| (r, list.remove(0)));
        let (row, left) = match fit {
            Some((r, row)) => {
                if room.get(&r).is_some_and(Vec::is_empty) {
                    room.remove(&r);
                }
                rows[row].push(i);
                (row, r - len)
            }
            None => {
                rows.push(vec![i]);
                (rows.len() - 1, capacity - len)
            }
        };
        if left > 0 {
            room.entry(left).or_default().push(row);
        }
    }
    rows
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAD: u32 = 0;

    fn sample(ids: &[u32], trainable: &[bool]) -> TokenizedSample {
        TokenizedSample {
            input_ids: ids.to_vec(),
            trainable: trainable.to_vec(),
        }
    }

    fn abc() -> Vec<TokenizedSample> {
        vec![
            sample(&[1, 2, 3], &[false, true, true]),
            sample(&[4, 5], &[false, true]),
            sample(&[6, 7, 8, 9], &[false, false, true, true]),
        ]
    }

    fn options(
        micro_batch_size: usize,
        max_seq_length: usize,
        packing: bool,
        shuffle: bool,
    ) -> BatchOptions {
        BatchOptions {
            micro_batch_size,
            max_seq_length,
            packing,
            shuffle,
            seed: 3407,
            pad_id: PAD,
        }
    }

    const I: i32 = IGNORE;

    #[test]
    fn padding_shifts_targets_masks_and_pads_to_the_longest_row() {
        let samples = abc();
        let b = Batcher::new(&samples, options(2, 8, false, false)).unwrap();
        assert_eq!(b.batches_per_epoch(), 2);
        let batches: Vec<Batch> = b.one_epoch().collect();
        assert_eq!(
            batches[0],
            Batch {
                batch_size: 2,
                seq_len: 3,
                input_ids: vec![1, 2, 3, 4, 5, PAD],
                targets: vec![2, 3, I, 5, I, I],
                position_ids: vec![0, 1, 2, 0, 1, 0],
                segment_ids: vec![0, 0, 0, 0, 0, 1],
            }
        );
        assert_eq!(
            batches[1],
            Batch {
                batch_size: 1,
                seq_len: 4,
                input_ids: vec![6, 7, 8, 9],
                targets: vec![I, 8, 9, I],
                position_ids: vec![0, 1, 2, 3],
                segment_ids: vec![0, 0, 0, 0],
            }
        );
        assert_eq!(
            batches[0].trainable_tokens() + batches[1].trainable_tokens(),
            5
        );
    }

    #[test]
    fn packing_fills_rows_best_fit_with_restarting_positions_and_no_cross_sample_targets() {
        let samples = abc();
        let b = Batcher::new(&samples, options(2, 6, true, false)).unwrap();
        assert_eq!(b.row_layout(), &[vec![2, 1], vec![0]]);
        let batch = b.one_epoch().next().unwrap();
        assert_eq!(
            batch,
            Batch {
                batch_size: 2,
                seq_len: 6,
                input_ids: vec![6, 7, 8, 9, 4, 5, 1, 2, 3, PAD, PAD, PAD],
                targets: vec![I, 8, 9, I, 5, I, 2, 3, I, I, I, I],
                position_ids: vec![0, 1, 2, 3, 0, 1, 0, 1, 2, 0, 1, 2],
                segment_ids: vec![0, 0, 0, 0, 1, 1, 0, 0, 0, 1, 1, 1],
            }
        );
    }

    #[test]
    fn packing_never_overfills_and_keeps_every_sample_once() {
        let samples: Vec<TokenizedSample> = (0..200u32)
            .map(|i| {
                let n = 1 + (i * 37 % 61) as usize;
                sample(&vec![i; n], &vec![true; n])
            })
            .collect();
        let b = Batcher::new(&samples, options(3, 64, true, true)).unwrap();
        let mut seen: Vec<usize> = b.row_layout().iter().flatten().copied().collect();
        seen.sort();
        assert_eq!(seen, (0..200).collect::<Vec<_>>());
        for row in b.row_layout() {
            assert!(row.iter().map(|&s| samples[s].len()).sum::<usize>() <= 64);
        }
        let total: usize = samples.iter().map(TokenizedSample::len).sum();
        assert!(
            b.rows() <= total.div_ceil(64) + 2,
            "{} rows for {total} tokens",
            b.rows()
        );
    }

    fn many() -> Vec<TokenizedSample> {
        (0..50u32)
            .map(|i| {
                let n = 2 + (i % 7) as usize;
                sample(&vec![i + 1; n], &vec![true; n])
            })
            .collect()
    }

    fn take(b: &Batcher, from: DataPosition, n: usize) -> Vec<PositionedBatch> {
        b.batches_from(from).unwrap().take(n).collect()
    }

    #[test]
    fn same_seed_same_batches_and_a_restored_position_continues_exactly() {
        let samples = many();
        let a = Batcher::new(&samples, options(4, 16, false, true)).unwrap();
        let b = Batcher::new(&samples, options(4, 16, false, true)).unwrap();
        assert_eq!(a.batches_per_epoch(), 13);
        let run = take(&a, DataPosition::default(), 40);
        assert_eq!(run, take(&b, DataPosition::default(), 40));
        // A checkpoint after batch 16 stores its `next`; resuming there gives batches 17.. again.
        let saved = run[16].next;
        assert_eq!(saved, DataPosition { epoch: 1, index: 4 });
        assert_eq!(take(&b, saved, 23), run[17..].to_vec());
        // Epochs differ in order, and each visits every sample once.
        let first: Vec<u32> = run[..13]
            .iter()
            .flat_map(|p| p.batch.input_ids.clone())
            .collect();
        let second: Vec<u32> = run[13..26]
            .iter()
            .flat_map(|p| p.batch.input_ids.clone())
            .collect();
        assert_ne!(first, second);
        let firsts = |r: &[PositionedBatch]| {
            let mut v: Vec<u32> = r
                .iter()
                .flat_map(|p| {
                    (0..p.batch.batch_size).map(|row| p.batch.input_ids[row * p.batch.seq_len])
                })
                .collect();
            v.sort();
            v
        };
        assert_eq!(firsts(&run[..13]), (1..=50).collect::<Vec<_>>());
        assert_eq!(firsts(&run[13..26]), (1..=50).collect::<Vec<_>>());
    }

    #[test]
    fn another_seed_gives_another_order() {
        let samples = many();
        let a = Batcher::new(&samples, options(4, 16, false, true)).unwrap();
        let mut other = options(4, 16, false, true);
        other.seed = 1;
        let b = Batcher::new(&samples, other).unwrap();
        assert_ne!(a.epoch_order(0), b.epoch_order(0));
        assert_eq!(a.epoch_order(3), a.epoch_order(3));
    }

    #[test]
    fn a_position_past_the_epoch_is_refused_and_the_end_rolls_over() {
        let samples = many();
        let b = Batcher::new(&samples, options(4, 16, false, true)).unwrap();
        let err = b
            .batches_from(DataPosition {
                epoch: 0,
                index: 14,
            })
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("past the end of an epoch of 13 batches"),
            "{err}"
        );
        let first = b
            .batches_from(DataPosition {
                epoch: 0,
                index: 13,
            })
            .unwrap()
            .next()
            .unwrap();
        assert_eq!(first.at, DataPosition { epoch: 1, index: 0 });
        assert!(
            (DataPosition {
                epoch: 2,
                index: 13
            }
            .epoch_progress(26)
                - 2.5)
                .abs()
                < 1e-12
        );
    }

    #[test]
    fn overlong_samples_and_empty_sets_are_errors() {
        let samples = abc();
        assert!(Batcher::new(&samples, options(2, 3, false, false)).is_err());
        assert!(Batcher::new(&[], options(2, 3, false, false)).is_err());
    }
}
