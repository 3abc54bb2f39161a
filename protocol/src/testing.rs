//! What the decoders' tests and the fuzz targets (`fuzz/`) share: a stream fed to a decoder
//! read by read, and the check that where reads end cannot change what is decoded. Not part of
//! the wire API.

use std::fmt::Debug;

/// A stream decoder as [`decode_reads`] drives it (each decoder module implements it).
pub trait Decoder {
    /// One step's outcome: a message, a rejected value or a fatal error.
    type Item<'a>
    where
        Self: 'a;

    /// Appends one read.
    fn feed_read(&mut self, read: &[u8]);

    /// The next item, `None` when more bytes are needed.
    fn next_item(&mut self) -> Option<Self::Item<'_>>;

    /// Whether `item` ends the stream (the connection is closed after it).
    fn is_fatal(item: &Self::Item<'_>) -> bool;

    /// At the end of the stream: the error an unfinished value is, if the decoder says so.
    fn end_of_stream(&mut self) -> Option<Self::Item<'_>> {
        None
    }

    /// Asserts what the decoder promises about its buffer after an item, `read_len` being the
    /// size of the read that brought it.
    fn check_buffer(&self, _read_len: usize) {}
}

/// [`Decoder`] for a decoder whose `next()` answers `NeedMore` until a value is complete and
/// gives up with `Fatal` (the app socket's and the TCP listener's); then any further methods.
macro_rules! impl_decoder {
    ($decoder:ty, $decoded:ident $(, { $($more:tt)* })?) => {
        impl $crate::testing::Decoder for $decoder {
            type Item<'a> = $decoded<'a>;

            fn feed_read(&mut self, read: &[u8]) {
                self.input.feed(read);
            }

            fn next_item(&mut self) -> Option<$decoded<'_>> {
                match self.next() {
                    $decoded::NeedMore => None,
                    decoded => Some(decoded),
                }
            }

            fn is_fatal(item: &$decoded<'_>) -> bool {
                matches!(item, $decoded::Fatal(_))
            }

            $($($more)*)?
        }
    };
}
pub(crate) use impl_decoder;

/// Feeds `reads` to `decoder` one at a time, draining it after each, then ends the stream;
/// `each` maps every item up to and including the first fatal one, after which nothing is
/// decoded.
pub fn decode_reads<D: Decoder, T>(
    decoder: &mut D,
    reads: &[&[u8]],
    mut each: impl FnMut(D::Item<'_>) -> T,
) -> Vec<T> {
    let mut out = Vec::new();
    for read in reads {
        decoder.feed_read(read);
        loop {
            let Some(item) = decoder.next_item() else {
                break;
            };
            let fatal = D::is_fatal(&item);
            out.push(each(item));
            if fatal {
                return out;
            }
            decoder.check_buffer(read.len());
        }
    }
    out.extend(decoder.end_of_stream().map(each));
    out
}

/// What `decode` makes of `data` in one read, asserted to be the same when `data` arrives in
/// two, cut where its first byte says (how a fuzz input picks a read boundary).
pub fn same_when_split<T: PartialEq + Debug>(data: &[u8], decode: impl Fn(&[&[u8]]) -> T) -> T {
    let whole = decode(&[data]);
    let at = data
        .first()
        .map_or(0, |b| usize::from(*b) % (data.len() + 1));
    let (a, b) = data.split_at(at);
    assert_eq!(
        whole,
        decode(&[a, b]),
        "decoding depends on how the bytes arrive"
    );
    whole
}

/// Cuts `input` at the given points (taken modulo its length, sorted): the reads a stream
/// might arrive in.
#[cfg(test)]
pub fn chunks<'a>(input: &'a [u8], cuts: &[proptest::sample::Index]) -> Vec<&'a [u8]> {
    let mut at: Vec<usize> = cuts.iter().map(|i| i.index(input.len() + 1)).collect();
    at.sort_unstable();
    let mut out = Vec::with_capacity(at.len() + 1);
    let mut from = 0;
    for to in at {
        out.push(&input[from..to]);
        from = to;
    }
    out.push(&input[from..]);
    out
}

/// Inputs of 1 to `most` `pieces` chosen pseudo-randomly (a fixed seed: the same inputs on every
/// run), each followed by `gap` half of the time, asserted to `run` the same whole and cut into
/// three reads at pseudo-random points: the fuzz targets' property under plain `cargo test`.
#[cfg(test)]
pub fn random_splits_agree<T: PartialEq + Debug>(
    pieces: &[&[u8]],
    most: usize,
    gap: &[u8],
    run: impl Fn(&[&[u8]]) -> T,
) {
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut rnd = |n: usize| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        (seed % n as u64) as usize
    };
    for _ in 0..2000 {
        let mut input = Vec::new();
        for _ in 0..rnd(most) + 1 {
            input.extend_from_slice(pieces[rnd(pieces.len())]);
            if !gap.is_empty() && rnd(2) == 0 {
                input.extend_from_slice(gap);
            }
        }
        let whole = run(&[&input]);
        let (a, b) = (rnd(input.len() + 1), rnd(input.len() + 1));
        let (a, b) = (a.min(b), a.max(b));
        let split = run(&[&input[..a], &input[a..b], &input[b..]]);
        assert_eq!(
            whole,
            split,
            "input {:?} split at {a},{b}",
            String::from_utf8_lossy(&input)
        );
    }
}
