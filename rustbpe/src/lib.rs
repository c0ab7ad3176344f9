//! rustbpe: trains a byte-level BPE tokenizer fast, for nanochat.
//!
//! Training has two phases. (1) Counting: text arrives from a Python iterator in batches; each batch is split
//! into chunks by the regex (in parallel, without the GIL) and identical chunks are counted once. (2) Merging:
//! every unique chunk becomes a "word" of token ids with a count. The counts of adjacent pairs live in a hash
//! map and a max-heap; each merge rewrites only the words that contain the merged pair and applies the
//! resulting +/- changes to the pair counts, so no merge ever recounts the corpus. Ties between equal counts go
//! to the smallest pair, which makes the result independent of thread count and hashing order.
//!
//! Python sees `Tokenizer` with train_from_iterator, get_pattern, get_mergeable_ranks, encode, batch_encode.
//! Encoding here exists for checking; nanochat encodes with tiktoken from the exported ranks.

use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::sync::Mutex;
use std::time::Instant;

use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyString};
use rayon::prelude::*;
use regex_automata::{meta, Input};
use rustc_hash::FxHashMap;

/// GPT-4's split pattern with numbers split into runs of at most 2 digits (nanochat's choice).
const DEFAULT_PATTERN: &str =
    r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+";

/// The default pattern without its one look-ahead (`\s+(?!\S)`) and with its possessive quantifiers made greedy,
/// which changes nothing here (no branch can succeed by giving those characters back). The `regex` crate runs it
/// several times faster than fancy-regex runs the original; `Splitter` puts the look-ahead back by hand.
const DEFAULT_PATTERN_WITHOUT_LOOKAHEAD: &str =
    r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]|\s+";

type Pair = (u32, u32);

/// Splits text into the chunks that BPE never merges across.
struct Splitter {
    pattern: String,
    regex: fancy_regex::Regex,
    /// for the default pattern only: the same split, computed faster (see `chunks_fast`)
    fast: Option<meta::Regex>,
    /// a warm cache kept between `encode` calls: a fresh one rebuilds the lazy DFA's states on every text
    spare_cache: Mutex<SplitCache>,
}

/// Per-thread scratch space of the fast regex. Each thread brings its own: the regex's shared cache pool is a
/// point of contention when two threads search millions of short matches.
type SplitCache = Option<meta::Cache>;

impl Splitter {
    fn new(pattern: &str) -> PyResult<Self> {
        let regex = fancy_regex::Regex::new(pattern)
            .map_err(|e| PyValueError::new_err(format!("invalid split pattern {pattern:?}: {e}")))?;
        let fast = (pattern == DEFAULT_PATTERN)
            .then(|| meta::Regex::new(DEFAULT_PATTERN_WITHOUT_LOOKAHEAD).expect("the fast pattern is valid"));
        Ok(Splitter { pattern: pattern.to_string(), regex, fast, spare_cache: Mutex::new(None) })
    }

    fn new_cache(&self) -> SplitCache {
        self.fast.as_ref().map(|fast| fast.create_cache())
    }

    /// The spare cache if no other thread holds it, else a new one; hand it back with `put_cache`.
    fn take_cache(&self) -> SplitCache {
        let spare = self.spare_cache.lock().ok().and_then(|mut spare| spare.take());
        spare.or_else(|| self.new_cache())
    }

    fn put_cache(&self, cache: SplitCache) {
        if let Ok(mut spare) = self.spare_cache.lock() {
            *spare = cache;
        }
    }

    fn for_each_chunk(&self, text: &str, cache: &mut SplitCache, visit: impl FnMut(&str)) -> Result<(), String> {
        match (&self.fast, cache) {
            (Some(fast), Some(cache)) => Self::chunks_fast(fast, cache, text, visit),
            _ => Self::chunks_fancy(&self.regex, text, visit)?,
        }
        Ok(())
    }

    fn chunks_fancy(regex: &fancy_regex::Regex, text: &str, mut visit: impl FnMut(&str)) -> Result<(), String> {
        for found in regex.find_iter(text) {
            visit(found.map_err(|e| format!("the split pattern failed on a text: {e}"))?.as_str());
        }
        Ok(())
    }

    /// `\s+(?!\S)|\s+` takes a run of whitespace but leaves its last character to the word that follows it
    /// (" world" stays one chunk). In the pattern without the look-ahead, a match made only of whitespace and not
    /// ending in a newline can only come from the final `\s+` (the newline branch ends in \r or \n, every other
    /// branch holds a non-space), so: give back its last character when it has several and text follows.
    fn chunks_fast(fast: &meta::Regex, cache: &mut meta::Cache, text: &str, mut visit: impl FnMut(&str)) {
        let mut pos = 0;
        while let Some(found) = fast.search_with(cache, &Input::new(text).range(pos..)) {
            let chunk = &text[found.range()];
            let mut end = found.end();
            if end < text.len() && !chunk.ends_with(['\r', '\n']) && chunk.chars().all(char::is_whitespace) {
                let mut chars = chunk.chars();
                let last = chars.next_back().expect("matches are never empty");
                if chars.next().is_some() {
                    end -= last.len_utf8();
                }
            }
            visit(&text[found.start()..end]);
            pos = end;
        }
    }
}

/// A candidate merge in the heap. Its count may be stale (higher than the pair's current count); stale entries
/// are refreshed when they reach the top. Order: higher count first, then the smaller pair.
#[derive(PartialEq, Eq)]
struct Candidate {
    count: i64,
    pair: Pair,
}

impl Ord for Candidate {
    fn cmp(&self, other: &Self) -> Ordering {
        self.count.cmp(&other.count).then_with(|| other.pair.cmp(&self.pair))
    }
}

impl PartialOrd for Candidate {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// Pair-count changes of one merge step and the words where new pairs (which all contain the new token) appeared.
#[derive(Default)]
struct MergeEffect {
    deltas: FxHashMap<Pair, i64>,
    new_positions: Vec<(Pair, u32)>,
}

impl MergeEffect {
    fn add(&mut self, pair: Pair, delta: i64) {
        *self.deltas.entry(pair).or_default() += delta;
    }

    fn combine(mut self, other: MergeEffect) -> MergeEffect {
        for (pair, delta) in other.deltas {
            self.add(pair, delta);
        }
        self.new_positions.extend(other.new_positions);
        self
    }
}

/// Replaces every (left-to-right, non-overlapping) occurrence of `pair` in `ids` by `new_id`, recording how the
/// counts of the affected pairs change when this word occurs `count` times.
fn merge_word(ids: &mut Vec<u32>, word_index: u32, (a, b): Pair, new_id: u32, count: i64, effect: &mut MergeEffect) {
    let mut out = Vec::with_capacity(ids.len());
    let mut i = 0;
    while i < ids.len() {
        if i + 1 < ids.len() && ids[i] == a && ids[i + 1] == b {
            // The left neighbour is read from `out`, so it is already merged when two occurrences are adjacent
            // ("a b a b" becomes "X X": the (X, a) counted by the first occurrence is undone by the second).
            if let Some(&left) = out.last() {
                effect.add((left, a), -count);
                effect.add((left, new_id), count);
                effect.new_positions.push(((left, new_id), word_index));
            }
            if let Some(&right) = ids.get(i + 2) {
                effect.add((b, right), -count);
                effect.add((new_id, right), count);
                effect.new_positions.push(((new_id, right), word_index));
            }
            effect.add((a, b), -count);
            out.push(new_id);
            i += 2;
        } else {
            out.push(ids[i]);
            i += 1;
        }
    }
    *ids = out;
}

/// Counts the regex chunks of a batch of texts, in parallel.
fn count_chunks(texts: &[String], splitter: &Splitter) -> Result<FxHashMap<Box<str>, i64>, String> {
    texts
        .par_iter()
        .try_fold(
            || (FxHashMap::<Box<str>, i64>::default(), splitter.new_cache()),
            |(mut counts, mut cache), text| {
                splitter.for_each_chunk(text, &mut cache, |chunk| match counts.get_mut(chunk) {
                    Some(count) => *count += 1,
                    None => {
                        counts.insert(chunk.into(), 1);
                    }
                })?;
                Ok((counts, cache))
            },
        )
        .map(|folded| folded.map(|(counts, _)| counts))
        .try_reduce(FxHashMap::default, |a, b| Ok(merge_counts(a, b)))
}

fn merge_counts(a: FxHashMap<Box<str>, i64>, b: FxHashMap<Box<str>, i64>) -> FxHashMap<Box<str>, i64> {
    let (mut big, small) = if a.len() >= b.len() { (a, b) } else { (b, a) };
    for (chunk, count) in small {
        *big.entry(chunk).or_default() += count;
    }
    big
}

fn log(message: &str) {
    eprintln!("rustbpe: {message}");
}

fn seconds_since(start: Instant) -> f64 {
    start.elapsed().as_secs_f64()
}

/// Learns `num_merges` merges from unique words and their counts. Returns them in order (merge i makes id 256+i);
/// fewer if the words run out of pairs.
fn learn_merges(mut words: Vec<Vec<u32>>, counts: &[i64], num_merges: usize) -> Vec<Pair> {
    // Initial pair counts, and for each pair the words that contain it.
    let initial = words
        .par_iter()
        .enumerate()
        .fold(MergeEffect::default, |mut effect, (index, ids)| {
            for window in ids.windows(2) {
                let pair = (window[0], window[1]);
                effect.add(pair, counts[index]);
                effect.new_positions.push((pair, index as u32));
            }
            effect
        })
        .reduce(MergeEffect::default, MergeEffect::combine);
    let mut pair_counts = initial.deltas;
    let mut positions: FxHashMap<Pair, Vec<u32>> = FxHashMap::default();
    for (pair, index) in initial.new_positions {
        positions.entry(pair).or_default().push(index);
    }
    let mut heap: BinaryHeap<Candidate> =
        pair_counts.iter().map(|(&pair, &count)| Candidate { count, pair }).collect();

    let mut merges = Vec::with_capacity(num_merges);
    let log_every = (num_merges / 10).max(1);
    while merges.len() < num_merges {
        let Some(Candidate { count, pair }) = heap.pop() else {
            log(&format!("no pairs left to merge after {} merges", merges.len()));
            break;
        };
        let current = pair_counts.get(&pair).copied().unwrap_or(0);
        if current <= 0 {
            continue;
        }
        if current != count {
            heap.push(Candidate { count: current, pair });
            continue;
        }
        let new_id = 256 + merges.len() as u32;
        merges.push(pair);

        // Rewrite the words that may contain the pair (the list can hold stale and repeated entries).
        let mut indices = positions.remove(&pair).unwrap_or_default();
        indices.sort_unstable();
        indices.dedup();
        let mut taken: Vec<(u32, Vec<u32>)> =
            indices.iter().map(|&i| (i, std::mem::take(&mut words[i as usize]))).collect();
        let effect = taken
            .par_iter_mut()
            .with_min_len(1024)
            .fold(MergeEffect::default, |mut effect, (index, ids)| {
                merge_word(ids, *index, pair, new_id, counts[*index as usize], &mut effect);
                effect
            })
            .reduce(MergeEffect::default, MergeEffect::combine);
        for (index, ids) in taken {
            words[index as usize] = ids;
        }

        for (changed, delta) in effect.deltas {
            if delta == 0 {
                continue;
            }
            let total = pair_counts.entry(changed).or_default();
            *total += delta;
            let total = *total;
            if total <= 0 {
                pair_counts.remove(&changed);
            } else if delta > 0 {
                heap.push(Candidate { count: total, pair: changed });
            }
        }
        for (new_pair, index) in effect.new_positions {
            positions.entry(new_pair).or_default().push(index);
        }
        if merges.len() % log_every == 0 || merges.len() == num_merges {
            log(&format!(
                "merge {}/{} ({}%): {:?} -> {} (count {})",
                merges.len(),
                num_merges,
                100 * merges.len() / num_merges,
                pair,
                new_id,
                count
            ));
        }
    }
    merges
}

/// A byte-level BPE tokenizer: 256 byte tokens followed by the learned merges.
#[pyclass]
struct Tokenizer {
    splitter: Splitter,
    merges: Vec<Pair>,
    /// pair -> id of the token it merges into (ids grow with rank)
    merge_ids: FxHashMap<Pair, u32>,
}

impl Tokenizer {
    fn encode_chunk(&self, bytes: &[u8], out: &mut Vec<u32>) {
        let mut ids: Vec<u32> = bytes.iter().map(|&b| b as u32).collect();
        while ids.len() >= 2 {
            // The pair merged earliest in training goes first; all its occurrences merge, left to right.
            let best = ids.windows(2).filter_map(|w| self.merge_ids.get(&(w[0], w[1])).copied()).min();
            let Some(new_id) = best else { break };
            let (a, b) = self.merges[(new_id - 256) as usize];
            let mut merged = Vec::with_capacity(ids.len());
            let mut i = 0;
            while i < ids.len() {
                if i + 1 < ids.len() && ids[i] == a && ids[i + 1] == b {
                    merged.push(new_id);
                    i += 2;
                } else {
                    merged.push(ids[i]);
                    i += 1;
                }
            }
            ids = merged;
        }
        out.extend(ids);
    }

    fn encode_text(&self, text: &str, cache: &mut SplitCache) -> Result<Vec<u32>, String> {
        let mut out = Vec::with_capacity(text.len() / 3);
        self.splitter.for_each_chunk(text, cache, |chunk| self.encode_chunk(chunk.as_bytes(), &mut out))?;
        Ok(out)
    }
}

#[pymethods]
impl Tokenizer {
    #[new]
    fn new() -> PyResult<Self> {
        Ok(Tokenizer {
            splitter: Splitter::new(DEFAULT_PATTERN)?,
            merges: Vec::new(),
            merge_ids: FxHashMap::default(),
        })
    }

    /// Trains on the str items of `iterator` until it is exhausted, learning `vocab_size - 256` merges.
    /// Texts are pulled `buffer_size` at a time; `pattern` defaults to the GPT-4-style split pattern.
    #[pyo3(signature = (iterator, vocab_size, buffer_size=8192, pattern=None))]
    fn train_from_iterator(
        &mut self,
        py: Python<'_>,
        iterator: &Bound<'_, PyAny>,
        vocab_size: i64,
        buffer_size: i64,
        pattern: Option<String>,
    ) -> PyResult<()> {
        if vocab_size < 256 {
            return Err(PyValueError::new_err(format!(
                "vocab_size must be at least 256 (the single-byte tokens), got {vocab_size}"
            )));
        }
        if buffer_size < 1 {
            return Err(PyValueError::new_err(format!("buffer_size must be at least 1, got {buffer_size}")));
        }
        let splitter = Splitter::new(pattern.as_deref().unwrap_or(DEFAULT_PATTERN))?;
        let items = iterator.try_iter().map_err(|_| {
            PyTypeError::new_err(format!(
                "train_from_iterator expects an iterable of str, got {}",
                iterator.get_type().name().map(|n| n.to_string()).unwrap_or_default()
            ))
        })?;

        let start = Instant::now();
        // Phase 1: pull texts in batches (needs the GIL), count their chunks in parallel (does not).
        let mut chunk_counts: FxHashMap<Box<str>, i64> = FxHashMap::default();
        let mut batch: Vec<String> = Vec::with_capacity(buffer_size as usize);
        let (mut num_texts, mut num_chars) = (0usize, 0usize);
        let mut items = items.peekable();
        while items.peek().is_some() {
            batch.clear();
            while batch.len() < buffer_size as usize {
                let Some(item) = items.next() else { break };
                let item = item?;
                let text = item.downcast::<PyString>().map_err(|_| {
                    PyTypeError::new_err(format!(
                        "train_from_iterator expects str items, but item {} is of type {}",
                        num_texts,
                        item.get_type().name().map(|n| n.to_string()).unwrap_or_default()
                    ))
                })?;
                let text = text.to_str().map_err(|e| {
                    PyValueError::new_err(format!("item {num_texts} is not valid Unicode text: {e}"))
                })?;
                num_chars += text.chars().count();
                num_texts += 1;
                batch.push(text.to_owned());
            }
            let counted = py.allow_threads(|| count_chunks(&batch, &splitter)).map_err(PyValueError::new_err)?;
            chunk_counts = merge_counts(chunk_counts, counted);
            py.check_signals()?; // Ctrl-C works between batches
        }
        log(&format!(
            "counted {} unique chunks in {num_texts} texts ({num_chars} chars) in {:.2}s",
            chunk_counts.len(),
            seconds_since(start)
        ));

        // Phase 2: learn the merges (no GIL needed).
        let num_merges = (vocab_size - 256) as usize;
        let merges = py.allow_threads(move || {
            let (words, counts): (Vec<Vec<u32>>, Vec<i64>) = chunk_counts
                .into_iter()
                .map(|(chunk, count)| (chunk.bytes().map(|b| b as u32).collect(), count))
                .unzip();
            learn_merges(words, &counts, num_merges)
        });
        log(&format!("learned {} merges; training took {:.2}s", merges.len(), seconds_since(start)));
        self.merge_ids = merges.iter().enumerate().map(|(i, &pair)| (pair, 256 + i as u32)).collect();
        self.merges = merges;
        self.splitter = splitter;
        Ok(())
    }

    fn get_pattern(&self) -> String {
        self.splitter.pattern.clone()
    }

    /// [(token bytes, rank)] for every token in rank order: the 256 single bytes, then the merges.
    fn get_mergeable_ranks<'py>(&self, py: Python<'py>) -> Vec<(Bound<'py, PyBytes>, u32)> {
        let mut tokens: Vec<Vec<u8>> = (0..=255u8).map(|b| vec![b]).collect();
        for &(a, b) in &self.merges {
            let token = [tokens[a as usize].as_slice(), tokens[b as usize].as_slice()].concat();
            tokens.push(token);
        }
        tokens.iter().enumerate().map(|(rank, token)| (PyBytes::new(py, token), rank as u32)).collect()
    }

    fn encode(&self, py: Python<'_>, text: &str) -> PyResult<Vec<u32>> {
        py.allow_threads(|| {
            let mut cache = self.splitter.take_cache();
            let ids = self.encode_text(text, &mut cache);
            self.splitter.put_cache(cache);
            ids
        })
        .map_err(PyValueError::new_err)
    }

    /// Encodes many texts in parallel (on as many threads as the process may use).
    fn batch_encode(&self, py: Python<'_>, texts: Vec<String>) -> PyResult<Vec<Vec<u32>>> {
        py.allow_threads(|| {
            texts
                .par_iter()
                .map_init(|| self.splitter.new_cache(), |cache, text| self.encode_text(text, cache))
                .collect::<Result<Vec<_>, _>>()
        })
        .map_err(PyValueError::new_err)
    }
}

#[pymodule]
fn rustbpe(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Tokenizer>()?;
    Ok(())
}
